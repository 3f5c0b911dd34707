"""Fuzz: ``ablate_span`` (and ``AblatedBatch.gather`` / ``ablate``). Each case either raises the library's own error
naming the op and an argument, or returns what a plain Python loop over the same input gives."""

from __future__ import annotations

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st

from srpo_core.ablation import ablate_span, follows_hidden


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
