"""Fuzz (issue 14): the input-side entry points ``roles_from_text``, ``roles_from_token_ids``, ``ablate_span`` (and
``AblatedBatch.gather`` / ``ablate``), ``corrupt_pixel_values``, ``corrupt_images``. Each case either raises the
library's own error naming the op and an argument, or returns what a plain Python loop over the same input gives."""

from __future__ import annotations

import math

import numpy as np
import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st

from srpo_core.ablation import ablate_span, follows_hidden
from srpo_core.corruption import corrupt_images, corrupt_pixel_values
from srpo_core.roles import _TAG_CHAR, char_roles, roles_from_text, roles_from_token_ids

NAN, INF = math.nan, math.inf
PIECES = ["<think>", "</think>", "<perception>", "</perception>", "< /think >", "\\boxed{", "}", "{", "a", "bc", " ",
          "\n", "é", "<answer>", "</caption>", "😀"]


# -- roles_from_text -----------------------------------------------------------------------------------------------
@st.composite
def text_calls(draw):
    text = "".join(draw(st.lists(st.sampled_from(PIECES), max_size=8)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    bounds = [0, *cuts, len(text)]
    offsets = [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
    if draw(st.booleans()) and offsets:
        offsets.append((offsets[0][0], offsets[0][0]))  # an empty span (a special token)
    kind = draw(st.sampled_from(("none", "none", "tensor", "array", "tuple", "bad")))
    if kind == "tensor":
        offsets = torch.tensor(offsets, dtype=draw(st.sampled_from((torch.int64, torch.int32)))).reshape(-1, 2)
    elif kind == "array":
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    elif kind == "tuple":
        offsets = tuple(tuple(p) for p in offsets)
    elif kind == "bad":
        offsets = draw(st.sampled_from((None, [0, 1], [(0, 1, 2)], [(0.5, 1.0)], "0,1", [("0", "1")], [(0,)],
                                        [(0, len(text) + 1)], [(-1, 0)], [(2, 1)], torch.tensor([[0.0, 1.0]]),
                                        [(0, 2**70)], [(True, False)], 3)))
    tags = draw(st.sampled_from((None, None, ("perception",), ("think",), (None,), "caption", ("",))))
    return text, offsets, tags


def _loop_roles(text: str, offsets) -> list[int]:
    """Per token, by hand: the majority role of its non-tag characters (ties to the lower role), OTHER when it has
    none; a token whose non-tag characters are all whitespace and that touches a tag is OTHER."""
    labels, _ = char_roles(text)
    out = []
    for start, end in np.asarray(offsets, dtype=np.int64).reshape(-1, 2).tolist():
        counts = [0, 0, 0]
        tag = ws = 0
        for k in range(start, end):
            if labels[k] == _TAG_CHAR:
                tag += 1
            else:
                counts[labels[k]] += 1
                ws += text[k] in " \t\n\r\f\v"
        role = max(range(3), key=lambda r: (counts[r], -r)) if sum(counts) else 0
        out.append(0 if tag and ws == sum(counts) else role)
    return out


@S.fuzz_settings()
@given(call=text_calls())
def test_fuzz_roles_from_text(call):
    text, offsets, tags = call
    kw = {} if tags is None else {"perception_tags": tags}
    out = S.outcome("roles_from_text", lambda: roles_from_text(text, offsets, **kw))
    if out is None:
        return
    assert out.roles.dtype == torch.int64
    if tags is None:
        assert out.roles.tolist() == _loop_roles(text, offsets)


# -- roles_from_token_ids ------------------------------------------------------------------------------------------
VOCAB = {"<think>": 0, "</think>": 1, "<perception>": 2, "</perception>": 3, "a": 4, "b": 5, " ": 6, "[UNK]": 7}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tok.decoder = decoders.Fuse()
    return tok


TOKENIZER = _tokenizer()


@st.composite
def token_id_calls(draw):
    b, t = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    ids = torch.tensor(draw(st.lists(st.integers(0, 7), min_size=b * t, max_size=b * t)), dtype=torch.int64)
    ids = ids.reshape(b, t)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t)), dtype=torch.bool).reshape(b, t)
    kind = draw(st.sampled_from(("none", "none", "no_mask", "bad_id_in", "bad_id_out", "dtype", "shape", "meta",
                                 "int_mask", "tags")))
    kw = {"mask": mask}
    if kind == "no_mask":
        kw = {}
    elif kind in ("bad_id_in", "bad_id_out") and b * t:
        bad = draw(st.sampled_from((8, -1, -100, 2**40, -(2**40))))
        where = mask if kind == "bad_id_in" else ~mask
        ids = torch.where(where, torch.full_like(ids, bad), ids) if bool(where.any()) else ids
    elif kind == "dtype":
        ids = ids.float()
    elif kind == "shape":
        ids = ids.reshape(-1)
    elif kind == "meta":
        ids = ids.to("meta")
    elif kind == "int_mask":
        kw["mask"] = mask.to(torch.int32)
    elif kind == "tags":
        kw["reasoning_tags"] = draw(st.sampled_from((("perception",), (None,), "think")))
    return ids, kw


@S.fuzz_settings()
@given(call=token_id_calls())
def test_fuzz_roles_from_token_ids(call):
    ids, kw = call
    out = S.outcome("roles_from_token_ids", lambda: roles_from_token_ids(ids, TOKENIZER, **kw))
    if out is None:
        return
    mask = kw.get("mask", torch.ones(ids.shape, dtype=torch.bool)).bool()
    assert out.roles.shape == ids.shape and bool((out.roles[~mask] == 0).all())
    assert bool(((out.roles >= 0) & (out.roles <= 2)).all())
    assert bool((ids[mask] >= 0).all()) and bool((ids[mask] < len(VOCAB)).all())
    assert out.num_malformed == int(out.malformed.sum())


# -- ablate_span ---------------------------------------------------------------------------------------------------
@st.composite
def ablate_calls(draw):
    b, t = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    ids = torch.tensor(draw(st.lists(st.integers(0, 99), min_size=b * t, max_size=b * t)), dtype=torch.int64)
    attn = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t)), dtype=torch.bool)
    span = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t)), dtype=torch.bool)
    ids, attn, span = ids.reshape(b, t), attn.reshape(b, t), span.reshape(b, t) & attn.reshape(b, t)
    kw = {"mode": draw(st.sampled_from(("drop", "mask"))), "pad_token_id": draw(st.sampled_from((0, -1, 7)))}
    if draw(st.booleans()):
        attn = attn.long()
    kind = draw(st.sampled_from(("none", "none", "pad", "outside", "mode", "dtype", "shape", "meta", "attn_value",
                                 "int32")))
    if kind == "pad":
        kw["pad_token_id"] = draw(st.sampled_from(("0", None, 1.5, True, 2**70)))
    elif kind == "outside" and bool((~attn.bool()).any()):
        span = span | ~attn.bool()
    elif kind == "mode":
        kw["mode"] = draw(st.sampled_from(("zero", None)))
    elif kind == "dtype":
        span = span.long()
    elif kind == "shape":
        span = span[:, :-1] if t else span
    elif kind == "meta":
        ids = ids.to("meta")
    elif kind == "attn_value" and b * t:
        attn = attn.long().clone()
        attn[0, 0] = 2
    elif kind == "int32":
        ids = ids.to(torch.int32)
        kw["pad_token_id"] = draw(st.sampled_from((0, 2**40)))
    return ids, attn, span, kw


@S.fuzz_settings()
@given(call=ablate_calls())
def test_fuzz_ablate_span(call):
    ids, attn, span, kw = call
    out = S.outcome("ablate_span", lambda: ablate_span(ids, attn, span, **kw))
    if out is None:
        return
    b, t = ids.shape
    if kw["mode"] == "mask":
        assert torch.equal(out.input_ids, ids)
        assert torch.equal(out.attention_mask.bool(), attn.bool() & ~span)
    else:
        rows = [[(int(ids[i, j]), int(attn[i, j])) for j in range(t) if not span[i, j]] for i in range(b)]
        width = max((len(r) for r in rows), default=t)
        want_ids = [[v for v, _ in r] + [kw["pad_token_id"]] * (width - len(r)) for r in rows]
        want_attn = [[a for _, a in r] + [0] * (width - len(r)) for r in rows]
        assert out.input_ids.tolist() == want_ids and out.attention_mask.long().tolist() == want_attn
    # gather(ablate(x)) gives x back at every kept position, the fill inside the span.
    x = torch.arange(b * t, dtype=torch.float32).reshape(b, t)
    back = out.gather(out.ablate(x), fill=-1.0)
    # (mask: the token after a hidden run reads a hidden row and gets the fill too, D180)
    none = span | follows_hidden(span, attn) if kw["mode"] == "mask" else span
    assert torch.equal(back, torch.where(none, -1.0, x))


# -- corrupt_pixel_values ------------------------------------------------------------------------------------------
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
