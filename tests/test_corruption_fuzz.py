"""Fuzz: ``corrupt_pixel_values`` and ``corrupt_images``. Each case either raises the library's own error naming the op
and an argument, or returns what a plain Python loop over the same input gives."""

from __future__ import annotations

import math

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st

from srpo_core.corruption import corrupt_images, corrupt_pixel_values

NAN, INF = math.nan, math.inf


@st.composite
def pixel_calls(draw):
    grids = draw(st.lists(st.tuples(st.integers(1, 2), st.sampled_from((2, 4)), st.sampled_from((2, 4))),
                          max_size=3))
    rows = sum(a * b * c for a, b, c in grids)
    dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16, torch.float64)))
    pv = torch.randn(rows, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(draw(st.integers(0, 9)))).to(dtype)
    grid = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    kw = {"mode": draw(st.sampled_from(("black", "mean", "noise"))), "p": draw(st.sampled_from((0.0, 0.5, 1.0))),
          "patch": draw(st.sampled_from(("merged", "raw"))), "patch_size": 2,
          "generator": torch.Generator().manual_seed(1)}
    kind = draw(st.sampled_from(("none", "none", "std", "mean", "size", "p", "mode", "grid", "group", "nan", "meta",
                                 "dtype", "tiny_std")))
    if kind == "std":
        kw["image_std"] = draw(st.sampled_from(((0.0, 0.5, 0.5), (-1.0, 1, 1), (NAN, 1, 1), (INF, 1, 1), (1, 1),
                                                "abc", (), None)))
    elif kind == "mean":
        kw["image_mean"] = draw(st.sampled_from(((NAN, 0, 0), (INF, 0, 0), (0.5, 0.5), None, ("a", 0, 0))))
    elif kind == "size":
        kw[draw(st.sampled_from(("merge_size", "patch_size", "temporal_patch_size")))] = draw(
            st.sampled_from((1.5, 0, -2, True, "2", 3)))
    elif kind == "p":
        kw["p"] = draw(st.sampled_from((NAN, -0.1, 1.5, "0.5", True)))
    elif kind == "mode":
        kw["mode"] = "blur"
    elif kind == "grid":
        grid = draw(st.sampled_from((grid[:, :2], grid + 1, -grid, grid.float())))
    elif kind == "group":
        kw["group_index"] = draw(st.sampled_from((torch.zeros(grid.shape[0] + 1, dtype=torch.int64),
                                                  torch.zeros(grid.shape[0], dtype=torch.int64))))
    elif kind == "nan" and rows:
        pv = pv.clone()
        pv[0, 0] = NAN
    elif kind == "meta":
        pv = pv.to("meta")
    elif kind == "dtype":
        pv = pv.long()
    elif kind == "tiny_std":
        kw["image_std"] = (1e-6, 0.5, 0.5)
    return pv, grid, kw


@S.fuzz_settings()
@given(call=pixel_calls())
def test_fuzz_corrupt_pixel_values(call):
    pv, grid, kw = call
    out = S.outcome("corrupt_pixel_values", lambda: corrupt_pixel_values(pv, grid, return_mask=True, **kw))
    if out is None:
        return
    y, rows = out
    assert y.shape == pv.shape and y.dtype == pv.dtype
    assert bool(torch.isfinite(y[rows]).all()), "a corrupted row holds a non-finite pixel"
    assert torch.equal(y[~rows].nan_to_num(7.0), pv[~rows].nan_to_num(7.0))
    if kw["mode"] == "black" and bool(rows.any()):
        mean = torch.tensor(kw.get("image_mean", (0.48145466, 0.4578275, 0.40821073)), dtype=torch.float64)
        std = torch.tensor(kw.get("image_std", (0.26862954, 0.26130258, 0.27577711)), dtype=torch.float64)
        want = (-mean / std).repeat_interleave(pv.shape[1] // 3).to(pv.dtype)
        assert torch.equal(y[rows], want.expand(int(rows.sum()), -1))


# -- corrupt_images ------------------------------------------------------------------------------------------------
@st.composite
def image_calls(draw):
    n = draw(st.integers(1, 3))
    same = draw(st.booleans())
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from((torch.uint8, torch.float32, torch.float16)))
    imgs = []
    for k in range(n):
        hk, wk = (h, w) if same or draw(st.booleans()) else (h + 1, w)
        x = torch.rand(3, hk, wk, generator=torch.Generator().manual_seed(k))
        imgs.append((x * 255).to(dtype) if dtype == torch.uint8 else x.to(dtype))
    kw = {"p": draw(st.sampled_from((0.0, 0.5, 1.0))), "patch_size": draw(st.sampled_from((1, 2, 4, 14))),
          "mode": draw(st.sampled_from(("black", "mean", "noise"))), "same_mask": same,
          "generator": torch.Generator().manual_seed(2)}
    kind = draw(st.sampled_from(("none", "none", "single", "patch", "p", "mode", "bad_image", "meta")))
    images = imgs
    if kind == "single":
        images = imgs[0]
    elif kind == "patch":
        kw["patch_size"] = draw(st.sampled_from((0, 1.5, True, "2")))
    elif kind == "p":
        kw["p"] = draw(st.sampled_from((NAN, 2.0)))
    elif kind == "mode":
        kw["mode"] = "blur"
    elif kind == "bad_image":
        images = [imgs[0][0], *imgs[1:]]
    elif kind == "meta":
        images = [imgs[0].to("meta")]
    return images, kw


@S.fuzz_settings()
@given(call=image_calls())
def test_fuzz_corrupt_images(call):
    images, kw = call
    out = S.outcome("corrupt_images", lambda: corrupt_images(images, return_mask=True, **kw))
    if out is None:
        return
    ys, masks = out
    items = [images] if not isinstance(images, list) else images
    ys, masks = ([ys], [masks]) if not isinstance(images, list) else (ys, masks)
    for x, y, m in zip(items, ys, masks, strict=True):
        assert y.shape == x.shape and y.dtype == x.dtype and m.shape == x.shape[-2:]
        assert torch.equal(y[:, ~m], x[:, ~m])
        assert bool(torch.isfinite(y.float()).all())
        if kw["mode"] == "black":
            assert bool((y[:, m] == 0).all())
