"""Span ablation: the index map realigns exactly; drop-mode log-probs equal those of hand-built shortened rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from srpo_core_test_checks import raises  # tests/_checks.py

from srpo_core.ablation import ablate_span, follows_hidden

V = 11


@st.composite
def batches(draw):
    """Left-padded prompt | right-padded completion rows (TRL's layout), spans inside the completion."""
    b = draw(st.integers(0, 4))
    p, c = draw(st.integers(1, 5)), draw(st.integers(0, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (b, p + c), generator=g)
    prompt_len = torch.randint(1, p + 1, (b,), generator=g)
    comp_len = torch.randint(0, c + 1, (b,), generator=g)
    pos = torch.arange(p + c)
    attn = ((pos >= p - prompt_len[:, None]) & (pos < p + comp_len[:, None])).long()
    span = (torch.rand(b, p + c, generator=g) < 0.4) & (pos >= p) & attn.bool()
    ids = ids.masked_fill(attn == 0, 0)
    return ids, attn, span, p


@settings(max_examples=40, deadline=None)
@given(batches())
def test_drop_index_map_invariants(batch):
    ids, attn, span, p = batch
    ab = ablate_span(ids, attn, span, mode="drop")
    kept = ~span
    assert ab.index.shape == ids.shape and bool((ab.index[span] == -1).all())
    b, j = torch.nonzero(kept, as_tuple=True)
    assert torch.equal(ab.input_ids[b, ab.index[b, j]], ids[b, j])
    assert torch.equal(ab.attention_mask[b, ab.index[b, j]], attn[b, j])
    # the prompt keeps its width and place; each row is its kept tokens in order, then padding
    assert torch.equal(ab.index[:, :p], torch.arange(p).expand(ids.shape[0], p))
    assert ab.input_ids.shape[1] == (int(kept.sum(1).max()) if ids.shape[0] else ids.shape[1])
    assert int(ab.attention_mask.sum()) == int(attn[kept].sum())
    # gather(ablate(x)) is x on kept positions
    x = torch.randn(ids.shape)
    back = ab.gather(ab.ablate(x), fill=float("nan"))
    assert torch.equal(back[kept], x[kept]) and bool(back[span].isnan().all())


@settings(max_examples=20, deadline=None)
@given(batches())
def test_mask_mode_keeps_layout(batch):
    ids, attn, span, _ = batch
    ab = ablate_span(ids, attn, span, mode="mask")
    assert torch.equal(ab.input_ids, ids)
    assert torch.equal(ab.attention_mask, attn * (~span).long())
    assert torch.equal(ab.position_ids, (attn.cumsum(1) - 1).clamp(min=0))
    has = ~span & ~follows_hidden(span, attn)  # the token after a hidden run reads a hidden row: no value (D180)
    assert torch.equal(ab.valid, has)
    assert torch.equal(ab.gather(ids.float())[has], ids.float()[has])


class PrefixMeanLM(torch.nn.Module):
    """A causal LM with no positional dependence: logits_t = W · mean of the embeddings of attended tokens ≤ t."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, 8, generator=g, dtype=torch.float64)
        self.out = torch.randn(8, V, generator=g, dtype=torch.float64)

    def forward(self, ids, attn):
        e = self.emb[ids] * attn[..., None]
        h = e.cumsum(1) / attn.cumsum(1).clamp(min=1)[..., None]
        return h @ self.out

    def token_logprobs(self, ids, attn):
        """``[B, L]``: log-prob of the token at ``j`` given the tokens before it (0 at ``j = 0``)."""
        logp = torch.log_softmax(self(ids, attn)[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        return torch.cat([logp.new_zeros(ids.shape[0], 1), logp], 1)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_drop_realignment_is_exact(batch):
    ids, attn, span, p = batch
    model = PrefixMeanLM()
    ab = ablate_span(ids, attn, span, mode="drop")
    got = ab.gather(model.token_logprobs(ab.input_ids, ab.attention_mask))
    for b in range(ids.shape[0]):
        keep = attn[b].bool() & ~span[b]
        row = ids[b][keep][None]  # the hand-built shortened sequence, no padding
        direct = model.token_logprobs(row, torch.ones_like(row))[0]
        # the first valid token has no context in the row: compare from the second one on
        torch.testing.assert_close(got[b][keep][1:], direct[1:], rtol=0, atol=1e-12)
    # mask mode gives the same values on kept tokens for a model without positional dependence
    am = ablate_span(ids, attn, span, mode="mask")
    got_mask = am.gather(model.token_logprobs(am.input_ids, am.attention_mask))
    for b in range(ids.shape[0]):
        keep = attn[b].bool() & am.valid[b]  # not the token after a hidden run (D180)
        if bool(attn[b].any()):
            keep[int(torch.nonzero(attn[b])[0, 0])] = False  # no context in the row
        torch.testing.assert_close(got_mask[b][keep], got[b][keep], rtol=0, atol=1e-12)


def test_hand_example():
    ids = torch.tensor([[0, 5, 6, 1, 2, 3, 4], [7, 8, 9, 1, 2, 0, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    span = torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    ab = ablate_span(ids, attn, span, mode="drop", pad_token_id=-1)
    # padding is not in the span, so it is kept: L' = 6 (row 1 keeps its two right pads)
    assert ab.input_ids.tolist() == [[0, 5, 6, 1, 4, -1], [7, 8, 9, 2, 0, 0]]
    assert ab.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert ab.index.tolist() == [[0, 1, 2, 3, -1, -1, 4], [0, 1, 2, -1, 3, 4, 5]]
    tt = torch.arange(14).view(2, 7)
    assert ab.ablate(tt).tolist() == [[0, 1, 2, 3, 6, 0], [7, 8, 9, 11, 12, 13]]
    vals = torch.arange(12.0).view(2, 6)[..., None].expand(2, 6, 3)
    assert ab.gather(vals, fill=-1.0)[..., 0].tolist() == [[0, 1, 2, 3, -1, -1, 4], [6, 7, 8, -1, 9, 10, 11]]


def test_errors():
    ids = torch.ones(2, 3, dtype=torch.long)
    attn = torch.ones(2, 3, dtype=torch.long)
    span = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        ablate_span(ids, attn, span, mode="zero")
    with pytest.raises(TypeError, match="span_mask"):
        ablate_span(ids, attn, span.long())
    with pytest.raises(ValueError, match="span_mask"):
        ablate_span(ids, attn, span[:, :2])
    ab = ablate_span(ids, attn, span)
    with pytest.raises(ValueError, match="ablated shape"):
        ab.gather(torch.zeros(2, 4))


# -- what the fuzz found: ablate_span's pad_token_id, span and attention mask ----------------------------------------
@pytest.mark.parametrize("pad", ["0", None, 1.0, True])
def test_ablate_span_pad_token_id_must_be_an_int(pad):
    ids = torch.tensor([[5, 6, 7]])
    with raises(TypeError, "ablate_span", "`pad_token_id`"):
        ablate_span(ids, torch.ones_like(ids), torch.tensor([[False, True, False]]), pad_token_id=pad)


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_ablate_span_outside_attention_mask_is_an_error(mode):
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]])
    attn = torch.tensor([[1, 1, 0], [0, 0, 0]])
    span = torch.tensor([[False, False, True], [True, True, True]])
    with raises(ValueError, "ablate_span", "`span_mask`", "`attention_mask`", "(0, 2)"):
        ablate_span(ids, attn, span, mode=mode)


def test_ablate_span_pad_token_id_must_fit_the_dtype():
    ids = torch.tensor([[5, 6, 7]], dtype=torch.int32)
    with raises(ValueError, "ablate_span", "`pad_token_id`"):
        ablate_span(ids, torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.bool), pad_token_id=2**40)


def test_ablate_span_every_token_in_the_span():
    """Found by the fuzz suite: a batch whose rows are all span leaves an empty ablated batch; gather gives the fill."""
    ab = ablate_span(torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.int64), torch.ones(1, 2, dtype=torch.bool),
                     mode="drop")  # the default is "mask" since D180; "drop" is the mode that empties the row
    assert ab.input_ids.shape == (1, 0)
    assert ab.gather(torch.zeros(1, 0), fill=-1.0).tolist() == [[-1.0, -1.0]]
