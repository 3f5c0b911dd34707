"""Image corruption: the processed-layout corruption equals processing a corrupted image where patch-aligned."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from srpo_core_test_checks import raises  # tests/_checks.py

from srpo_core.corruption import CLIP_MEAN, CLIP_STD, corrupt_images, corrupt_pixel_values

ROW = 3 * 2 * 14 * 14  # Qwen2-VL: C·T·P·P

INF = math.inf


def rand_pixels(grids, seed=0):
    grids = torch.tensor(grids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grids.prod(-1).sum()), ROW, generator=g), grids


# ----------------------------------------------------------------------------- against the real processor
@pytest.fixture(scope="module")
def image_processor():
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)  # PIL-backend fallback notice without torchvision
    return transformers.Qwen2VLImageProcessor()


def process(ip, images):
    out = ip(images=images, return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"]


def random_image(h, w, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(56, 84), (84, 56), (112, 112)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("patch", ["merged", "raw"])
def test_black_rows_equal_processing_a_blacked_image(image_processor, size, patch):
    h, w = size
    image = random_image(h, w, seed=h + w)
    pv, grid = process(image_processor, [image])
    assert tuple(grid[0].tolist()) == (1, h // 14, w // 14)  # patch-aligned: the processor does not resize
    for seed in range(100):  # the first seed that corrupts some but not all units
        corrupted, rows = corrupt_pixel_values(pv, grid, p=0.5, patch=patch,
                                               generator=torch.Generator().manual_seed(seed), return_mask=True)
        if 0 < int(rows.sum()) < rows.numel():
            break
    assert 0 < int(rows.sum()) < rows.numel()
    # rows are ordered (h/2, w/2, 2, 2): row r ↔ 14×14 cell (2·(r//4 // (w/28)) + (r%4)//2, 2·(r//4 % (w/28)) + r%2)
    arr = np.array(image).copy()
    for r in torch.nonzero(rows)[:, 0].tolist():
        k, sub = divmod(r, 4)
        mh, mw = divmod(k, w // 28)
        ph, pw = 2 * mh + sub // 2, 2 * mw + sub % 2
        arr[ph * 14:(ph + 1) * 14, pw * 14:(pw + 1) * 14] = 0
    from PIL import Image

    expected, _ = process(image_processor, [Image.fromarray(arr)])
    torch.testing.assert_close(corrupted, expected, rtol=0, atol=1e-5)


def test_corrupt_images_matches_corrupt_pixel_values(image_processor):
    """Blacking 28×28 cells before the processor == blacking merged tokens after it, with the same draws."""
    image = random_image(56, 84, seed=1)
    pv, grid = process(image_processor, [image])
    after = corrupt_pixel_values(pv, grid, generator=torch.Generator().manual_seed(11))
    before = corrupt_images(image, patch_size=28, generator=torch.Generator().manual_seed(11))
    expected, _ = process(image_processor, [before])
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- layout-level properties
def test_black_value_and_untouched_rows():
    pv, grid = rand_pixels([[1, 4, 6], [1, 2, 2]])
    out, rows = corrupt_pixel_values(pv, grid, generator=torch.Generator().manual_seed(0), return_mask=True)
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    expected_row = black.repeat_interleave(ROW // 3)  # each row is (C, T, P, P): channel-major
    assert torch.equal(out[~rows], pv[~rows])
    torch.testing.assert_close(out[rows], expected_row.expand(int(rows.sum()), -1))
    # merged: each group of 4 consecutive rows is all-or-nothing
    assert bool((rows.view(-1, 4).all(1) | ~rows.view(-1, 4).any(1)).all())
    assert not pv.equal(out)  # the input is untouched (a new tensor)


@pytest.mark.parametrize("mode", ["black", "mean", "noise"])
def test_modes_and_extreme_p(mode):
    pv, grid = rand_pixels([[1, 2, 4]])
    same = corrupt_pixel_values(pv, grid, mode=mode, p=0.0)
    assert torch.equal(same, pv)
    every, rows = corrupt_pixel_values(pv, grid, mode=mode, p=1.0, generator=torch.Generator().manual_seed(0),
                                       return_mask=True)
    assert bool(rows.all()) and bool(torch.isfinite(every).all())
    if mode == "mean":
        assert bool((every == 0).all())
    if mode == "noise":
        assert abs(float(every.std()) - 1.0) < 0.1


def test_determinism_and_group_index():
    pv, grid = rand_pixels([[1, 4, 4]] * 4 + [[1, 2, 2]])
    groups = torch.tensor([0, 0, 1, 1, 2])
    a = corrupt_pixel_values(pv, grid, group_index=groups, generator=torch.Generator().manual_seed(5),
                             return_mask=True)
    b = corrupt_pixel_values(pv, grid, group_index=groups, generator=torch.Generator().manual_seed(5),
                             return_mask=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    m = a[1][:64].view(4, 16)
    assert torch.equal(m[0], m[1]) and torch.equal(m[2], m[3])  # same prompt, same corruption
    assert not torch.equal(m[0], m[2])  # different prompts draw differently (fixed seed)
    # noise too is shared within a group
    n = corrupt_pixel_values(pv, grid, mode="noise", p=1.0, group_index=groups,
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(n[:16], n[16:32])


def test_dtype_and_device_preserved():
    pv, grid = rand_pixels([[1, 2, 2]])
    out = corrupt_pixel_values(pv.to(torch.bfloat16), grid, p=1.0)
    assert out.dtype == torch.bfloat16 and out.shape == pv.shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(mode="blur"), "mode", id="mode"),
        pytest.param(dict(p=1.5), "probability", id="p"),
        pytest.param(dict(patch="tile"), "patch", id="patch"),
        pytest.param(dict(image_mean=(0.5, 0.5)), "one entry per channel", id="mean-std"),
        pytest.param(dict(group_index=torch.tensor([0, 0])), "one entry per image", id="groups"),
    ],
)
def test_errors(kwargs, match):
    pv, grid = rand_pixels([[1, 2, 2]])
    with pytest.raises(ValueError, match=match):
        corrupt_pixel_values(pv, grid, **kwargs)


def test_layout_errors():
    pv, grid = rand_pixels([[1, 2, 2]])
    with pytest.raises(ValueError, match="columns"):
        corrupt_pixel_values(pv[:, :100], grid)
    with pytest.raises(ValueError, match="rows"):
        corrupt_pixel_values(pv[:3], grid)
    with pytest.raises(ValueError, match="divisible"):
        corrupt_pixel_values(*rand_pixels([[1, 3, 2]]))
    pv2, grid2 = rand_pixels([[1, 2, 2], [1, 2, 4]])
    with pytest.raises(ValueError, match="same grid"):
        corrupt_pixel_values(pv2, grid2, group_index=torch.tensor([0, 0]))


# ----------------------------------------------------------------------------- raw images
def test_corrupt_images_tensors_and_cells():
    x = torch.full((3, 30, 17), 200, dtype=torch.uint8)
    y, m = corrupt_images(x, p=0.5, patch_size=14, generator=torch.Generator().manual_seed(2), return_mask=True)
    assert y.dtype == torch.uint8 and y.shape == x.shape and m.shape == (30, 17)
    assert bool((y[:, m] == 0).all()) and bool((y[:, ~m] == 200).all())
    cells = m[::14, ::14]
    # constant on every 14×14 cell, partial cells at the edges included
    assert torch.equal(m, cells.repeat_interleave(14, 0).repeat_interleave(14, 1)[:30, :17])
    f = torch.rand(3, 28, 28)
    mean = corrupt_images(f, p=1.0, mode="mean")
    torch.testing.assert_close(mean, f.mean(dim=(1, 2), keepdim=True).expand_as(f))


def test_corrupt_images_pil_list_and_same_mask():
    images = [random_image(28, 42, seed=s) for s in range(3)]
    out, masks = corrupt_images(images, same_mask=True, generator=torch.Generator().manual_seed(0),
                                return_mask=True)
    assert [o.size for o in out] == [i.size for i in images] and all(o.mode == "RGB" for o in out)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    arr = np.array(out[0])
    assert (arr[masks[0].numpy()] == 0).all()
    with pytest.raises(ValueError, match="one size"):
        corrupt_images([random_image(28, 28, 0), random_image(28, 42, 0)], same_mask=True)
    with pytest.raises(TypeError, match="PIL images"):
        corrupt_images([np.zeros((3, 4, 4))])


# -- what the fuzz found: corrupt_pixel_values' std and sizes --------------------------------------------------------
def _pixels(dtype=torch.float32):
    grid = torch.tensor([[1, 2, 2]])
    return torch.randn(4, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)).to(dtype), grid


@pytest.mark.parametrize("std", [(0.0, 0.5, 0.5), (-0.1, 0.5, 0.5), (math.nan, 0.5, 0.5), (INF, 0.5, 0.5)])
def test_corrupt_pixel_values_rejects_bad_std(std):
    pv, grid = _pixels()
    with raises(ValueError, "corrupt_pixel_values", "`image_std`"):
        corrupt_pixel_values(pv, grid, mode="black", p=1.0, image_std=std)


@pytest.mark.parametrize("name", ["merge_size", "patch_size", "temporal_patch_size"])
@pytest.mark.parametrize("value", [1.5, 0, -2, True, "2"])
def test_corrupt_pixel_values_rejects_bad_sizes(name, value):
    pv, grid = _pixels()
    with raises(ValueError, "corrupt_pixel_values", f"`{name}`"):
        corrupt_pixel_values(pv, grid, **{name: value})


def test_corrupt_pixel_values_never_writes_non_finite_pixels():
    pv, grid = _pixels(torch.float16)
    # -0.48 / 1e-6 is finite in float64 but not in float16: refused rather than written as -inf.
    with raises(ValueError, "corrupt_pixel_values", "not finite in torch.float16"):
        corrupt_pixel_values(pv, grid, mode="black", p=1.0, image_std=(1e-6, 0.5, 0.5))
    for mode in ("black", "mean", "noise"):
        out = corrupt_pixel_values(pv, grid, mode=mode, p=1.0, generator=torch.Generator().manual_seed(1))
        assert bool(torch.isfinite(out).all())
