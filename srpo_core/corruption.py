"""Image corruption for the perception contrast ``ℓ̃_t = log π(y_t | q, Ĩ, y_<t)``.

Two entry points:

- :func:`corrupt_pixel_values` works in the processed layout a trainer already holds for Qwen2/2.5/3-VL:
  ``pixel_values: [Σ t·h·w, C·T·P·P]`` with ``image_grid_thw: [num_images, 3]``. Rows are the ``P×P`` patches of
  each image in turn (``t·h·w`` rows each), ordered ``(t, h/M, w/M, M, M)`` so that every ``M×M = 4`` consecutive
  rows form one merged visual token; inside a row the values are ordered ``(C, T, P, P)``. True black in this space
  is ``−mean_c / std_c`` for channel ``c`` (the processor normalises ``(x − mean) / std`` after scaling to [0, 1]).
  The token layout (``input_ids``, ``image_grid_thw``, position ids) never changes.
- :func:`corrupt_images` works on raw images before the processor (PIL images or ``[C, H, W]`` tensors), blacking
  random ``P×P`` patches as VPPO and PAPO do.
"""

from __future__ import annotations

import numpy as np
import torch

from srpo_core._validate import brief, describe, refuse_meta, require_tensor

# OpenAI CLIP statistics: the defaults of Qwen2VLImageProcessor (and Qwen2.5-VL's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("black", "mean", "noise")


def _check_common(op: str, mode: str, p: float) -> None:
    if mode not in MODES:
        raise ValueError(f"{op}: `mode` must be one of {MODES}, got {brief(mode)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: `p` must be a probability in [0, 1], got {brief(p)}")


def corrupt_pixel_values(
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    *,
    mode: str = "black",
    p: float = 0.5,
    patch: str = "merged",
    generator: torch.Generator | None = None,
    group_index: torch.Tensor | None = None,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
    temporal_patch_size: int = 2,
    patch_size: int = 14,
    merge_size: int = 2,
    return_mask: bool = False,
):
    """Corrupt a random subset of visual patches of Qwen-VL ``pixel_values`` (a new tensor; the input is untouched).

    Args:
        pixel_values: ``[R, C·T·P·P]`` with ``R = Σ_images t·h·w`` (Qwen2-VL: ``C=3, T=2, P=14`` → 1176 columns).
        image_grid_thw: ``int [num_images, 3]``, ``(t, h, w)`` of each image in patches.
        mode: ``"black"`` (true black, ``−mean_c/std_c``), ``"mean"`` (the normalisation mean colour, i.e. 0) or
            ``"noise"`` (standard normal values, i.e. pixel noise with the normalisation's mean and spread).
        p: probability that a unit is corrupted.
        patch: the unit: ``"merged"`` (one merged visual token = ``M×M`` consecutive rows, the default) or ``"raw"``
            (one ``P×P`` patch = one row).
        generator: drawn from for the masks and the noise (a CPU generator is fine for any device).
        group_index: ``int [num_images]``: images with the same value get the same mask (and noise) — pass the
            prompt index (× images per prompt) so the responses of one prompt see the same corrupted image. The
            images of one group must have the same grid.
        image_mean / image_std: the processor's per-channel statistics (defaults: Qwen2-VL's, OpenAI CLIP's).
        temporal_patch_size / patch_size / merge_size: the processor's ``T``, ``P``, ``M``.
        return_mask: also return ``bool [R]``, the corrupted rows.
    """
    op = "corrupt_pixel_values"
    mean_t, std_t = _check_pixel_args(op, pixel_values, image_grid_thw, mode, p, patch, image_mean, image_std,
                                      group_index, temporal_patch_size, patch_size, merge_size)
    channels = mean_t.numel()
    row = channels * temporal_patch_size * patch_size * patch_size
    grids, rows_per_image = _image_rows(op, pixel_values, image_grid_thw, patch, channels, temporal_patch_size,
                                        patch_size, merge_size)
    unit = merge_size * merge_size if patch == "merged" else 1
    groups = _image_groups(op, group_index, grids.shape[0])
    row_mask, noise = _draw_row_mask(op, pixel_values, grids, rows_per_image, groups, group_index, mode, p, unit,
                                     row, generator)
    row_mask = row_mask.to(pixel_values.device)
    fill = _fill_values(op, pixel_values, mode, mean_t, std_t, noise, row)
    out = torch.where(row_mask[:, None], fill, pixel_values)
    return (out, row_mask) if return_mask else out


def _check_pixel_args(op: str, pixel_values, image_grid_thw, mode, p, patch, image_mean, image_std, group_index,
                      temporal_patch_size, patch_size, merge_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the options, the two tensors' kinds and the processor statistics → ``(mean, std)``, ``float64 [C]``."""
    _check_common(op, mode, p)
    if patch not in ("merged", "raw"):
        raise ValueError(f"{op}: `patch` must be 'merged' or 'raw', got {brief(patch)}")
    require_tensor(op, "pixel_values", pixel_values, kind="float", ndim=2)
    require_tensor(op, "image_grid_thw", image_grid_thw, kind="int", ndim=2)
    if image_grid_thw.shape[-1] != 3:
        raise ValueError(f"{op}: `image_grid_thw` must be [num_images, 3], got {describe(image_grid_thw)}")
    for name, value in (("temporal_patch_size", temporal_patch_size), ("patch_size", patch_size),
                        ("merge_size", merge_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: `{name}` must be a positive int, got {brief(value)}")
    mean_t = _channel_stats(op, "image_mean", image_mean, positive=False)
    std_t = _channel_stats(op, "image_std", image_std, positive=True)
    channels = mean_t.numel()
    if std_t.numel() != channels:
        raise ValueError(f"{op}: `image_mean` and `image_std` must have one entry per channel, got "
                         f"{mean_t.numel()} and {std_t.numel()}")
    refuse_meta(op, pixel_values=pixel_values, image_grid_thw=image_grid_thw, group_index=group_index)
    return mean_t, std_t


def _image_rows(op: str, pixel_values, image_grid_thw, patch, channels, temporal_patch_size, patch_size,
                merge_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that the grids describe ``pixel_values`` → ``(grids int64 [N, 3] on CPU, rows per image [N])``."""
    row = channels * temporal_patch_size * patch_size * patch_size
    if pixel_values.shape[1] != row:
        raise ValueError(f"{op}: `pixel_values` must have C·T·P·P = {channels}·{temporal_patch_size}·{patch_size}·"
                         f"{patch_size} = {row} columns, got {describe(pixel_values)}")
    grids = image_grid_thw.detach().cpu().to(torch.int64)
    if bool((grids < 0).any()):
        raise ValueError(f"{op}: `image_grid_thw` must hold non-negative (t, h, w), got {describe(grids.tolist())}")
    rows_per_image = grids.prod(-1)
    if int(rows_per_image.sum()) != pixel_values.shape[0]:
        raise ValueError(f"{op}: `image_grid_thw` describes Σ t·h·w = {int(rows_per_image.sum())} rows, but "
                         f"`pixel_values` has {pixel_values.shape[0]}")
    if patch == "merged" and bool(((grids[:, 1] % merge_size) | (grids[:, 2] % merge_size)).any()):
        raise ValueError(f"{op}: `patch`='merged' needs h and w of `image_grid_thw` divisible by "
                         f"merge_size={merge_size}, got grids {grids.tolist()}")
    return grids, rows_per_image


def _image_groups(op: str, group_index, num_images: int) -> torch.Tensor:
    """Each image's group, ``int [num_images]`` numbered by sorted ``group_index`` (each image its own by default)."""
    if group_index is None:
        return torch.arange(num_images)
    require_tensor(op, "group_index", group_index, kind="int", ndim=1)
    if group_index.numel() != num_images:
        raise ValueError(f"{op}: `group_index` must have one entry per image ({num_images}), got "
                         f"{describe(group_index)}")
    _, groups = torch.unique(group_index.detach().cpu(), return_inverse=True)
    return groups


def _draw_row_mask(op: str, pixel_values, grids, rows_per_image, groups, group_index, mode, p, unit, row,
                   generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one mask (and noise) per group → ``(bool [R] on CPU, float32 [R, row] noise or an empty tensor)``."""
    # One mask (and one noise draw) per group, in order of first appearance, so the draw does not depend on how
    # the images of a group are spread over the batch.
    row_mask = torch.zeros(pixel_values.shape[0], dtype=torch.bool)
    noise = torch.empty(0) if mode != "noise" else torch.zeros(pixel_values.shape, dtype=torch.float32)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), rows_per_image.cumsum(0)])
    drawn: dict[int, tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]] = {}
    for i in range(grids.shape[0]):
        g = int(groups[i])
        n_rows = int(rows_per_image[i])
        grid = tuple(grids[i].tolist())
        if g not in drawn:
            units = torch.rand(n_rows // unit, generator=generator) < p
            vals = torch.randn(n_rows, row, generator=generator) if mode == "noise" else None
            drawn[g] = (units.repeat_interleave(unit), vals, grid)
        mask_i, vals, grid_g = drawn[g]
        if grid_g != grid:
            raise ValueError(f"{op}: images of one `group_index` must have the same grid, got {grid_g} and {grid} "
                             f"(image {i}, group_index {int(group_index[i])})")
        row_mask[starts[i]:starts[i + 1]] = mask_i
        if vals is not None:
            noise[starts[i]:starts[i + 1]] = vals
    return row_mask, noise


def _fill_values(op: str, pixel_values, mode, mean_t, std_t, noise, row) -> torch.Tensor:
    """What replaces a corrupted row, shaped like ``pixel_values``: true black, the mean colour (0) or the noise."""
    if mode == "black":
        channels = mean_t.numel()
        black = -mean_t / std_t
        if not bool(torch.isfinite(black.to(pixel_values.dtype)).all()):
            raise ValueError(f"{op}: `mode`='black' fills -`image_mean` / `image_std` = {black.tolist()}, which is not "
                             f"finite in {pixel_values.dtype}")
        fill = black.repeat_interleave(row // channels).to(pixel_values.dtype).to(pixel_values.device)
        return fill.expand_as(pixel_values)
    if mode == "mean":
        return torch.zeros_like(pixel_values)
    return noise.to(pixel_values.dtype).to(pixel_values.device)


def _channel_stats(op: str, name: str, value, *, positive: bool) -> torch.Tensor:
    """Per-channel statistics → ``float64 [C]``: a non-empty sequence of finite numbers (> 0 for ``image_std``)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{op}: `{name}` must be a non-empty sequence of numbers (one per channel), "
                         f"got {brief(value)}")
    t = torch.tensor([float(v) for v in value], dtype=torch.float64)
    if not bool(torch.isfinite(t).all()) or (positive and not bool((t > 0).all())):
        want = "finite and > 0" if positive else "finite"
        raise ValueError(f"{op}: every entry of `{name}` must be {want}, got {list(value)!r}")
    return t


def _patch_mask(h: int, w: int, patch_size: int, p: float, generator) -> torch.Tensor:
    """``bool [H, W]``: random ``P×P`` cells (partial cells at the right/bottom edges included)."""
    gh, gw = -(-h // patch_size), -(-w // patch_size)
    cells = torch.rand(gh, gw, generator=generator) < p
    return cells.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)[:h, :w]


def corrupt_images(images, *, p: float = 0.5, patch_size: int = 14, mode: str = "black",
                   generator: torch.Generator | None = None, same_mask: bool = False, return_mask: bool = False):
    """Black out (or fill) random ``patch_size × patch_size`` cells of raw images before the processor.

    Args:
        images: a PIL image, a ``[C, H, W]`` tensor, or a list of them; the output has the same type(s).
        mode: ``"black"`` (0), ``"mean"`` (the image's own per-channel mean) or ``"noise"`` (uniform random pixels
            in the image's value range: [0, 255] for PIL / integer tensors, [0, 1] for float tensors).
        same_mask: one mask for all images (they must have the same size) — e.g. the copies of one prompt's image.
        return_mask: also return the ``bool [H, W]`` mask of each image (a list when the input is a list).

    With ``patch_size`` equal to the processor's ``patch_size · merge_size`` (28 for Qwen2-VL) and an image whose
    sides are multiples of it (so the processor does not resize it), this equals :func:`corrupt_pixel_values` with
    ``patch="merged"`` and the same cells.
    """
    op = "corrupt_images"
    _check_common(op, mode, p)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{op}: `patch_size` must be a positive int, got {brief(patch_size)}")
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    outs, masks, shared = [], [], None
    for k, img in enumerate(items):
        is_pil = type(img).__module__.startswith("PIL")
        if is_pil:
            arr = torch.from_numpy(np.array(img.convert("RGB") if img.mode not in ("RGB", "L") else img))
            x = arr.permute(2, 0, 1) if arr.dim() == 3 else arr[None]
        elif isinstance(img, torch.Tensor) and img.dim() == 3:
            refuse_meta(op, **{f"images[{k}]": img})
            x = img
        else:
            raise TypeError(f"{op}: `images` must be PIL images or [C, H, W] tensors, got {describe(img)} at index {k}")
        h, w = x.shape[-2:]
        if same_mask and shared is not None and shared.shape != (h, w):
            raise ValueError(f"{op}: `same_mask`=True needs images of one size, got {tuple(shared.shape)} and {(h, w)}")
        m = shared if (same_mask and shared is not None) else _patch_mask(h, w, patch_size, p, generator)
        shared = m
        m = m.to(x.device)
        if mode == "black":
            fill = torch.zeros_like(x)
        elif mode == "mean":
            fill = x.double().mean(dim=(1, 2), keepdim=True).round().to(x.dtype) if not x.is_floating_point() \
                else x.mean(dim=(1, 2), keepdim=True)
            fill = fill.expand_as(x)
        else:
            hi = 1.0 if x.is_floating_point() else 255.0
            fill = (torch.rand(x.shape, generator=generator) * hi).to(x.device)
            fill = fill if x.is_floating_point() else fill.round().to(x.dtype)
            fill = fill.to(x.dtype)
        y = torch.where(m, fill, x)
        if is_pil:
            from PIL import Image

            arr = y.permute(1, 2, 0).numpy() if y.shape[0] > 1 else y[0].numpy()
            y = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)), mode=None)
        outs.append(y)
        masks.append(m.cpu())
    result = outs[0] if single else outs
    if return_mask:
        return result, (masks[0] if single else masks)
    return result
