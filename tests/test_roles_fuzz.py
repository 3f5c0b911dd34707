"""Fuzz: ``roles_from_text`` and ``roles_from_token_ids``. Each case either raises the library's own error naming the op
and an argument, or returns what a plain Python loop over the same input gives."""

from __future__ import annotations

import numpy as np
import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st

from srpo_core.roles import _TAG_CHAR, char_roles, roles_from_text, roles_from_token_ids

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
