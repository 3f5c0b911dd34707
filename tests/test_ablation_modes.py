"""The three reasoning-contrast modes (issue 23) on a hand-built copy model, where ``ℓ − ℓ°`` is known exactly.

The copy model reads the value tokens between ``<p>`` and ``</p>`` and, after a query token ``Q_k``, copies the
span's ``k``-th value with probability .97 (.01 on each other value); when no ``k``-th value is visible it is uniform
over the four values (.25). Every other row depends only on the class of its own token (``<p>`` and the four values
share one class, so the token after a removed span reads the same row), not on the context or the position. So, with
the span hidden (``mask``) or removed (``drop``), ``ℓ − ℓ°`` is exactly ``log(.97/.25)`` on copied tokens and 0
elsewhere; with another response's span (``counterfactual``) it is 0 where the donor's ``k``-th value is the same and
``log(.97/.01)`` where it differs. The check goes through the whole path a trainer uses: :func:`ablate_span`, a
forward, the log-prob of token ``j`` from row ``j − 1``, ``AblatedBatch.gather``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_core.ablation import (
    ABLATION_MODES,
    DEFAULT_ABLATION_MODE,
    ablate_span,
    check_ablation_mode,
    counterfactual_donors,
    follows_hidden,
)

PAD, OPEN, CLOSE = 0, 1, 2
VALUES = (3, 4, 5, 6)
QUERIES = (7, 8, 9, 10)  # Q_1 .. Q_4
FILLERS = (11, 12, 13)
V = 14
P_COPY, P_OTHER, P_UNIFORM = 0.97, 0.01, 0.25


def _class(tok: int) -> int:
    return OPEN if tok in VALUES else tok


def copy_model(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, V]`` float64 log-probabilities; row ``i`` predicts token ``i + 1`` from the tokens ``j ≤ i`` that
    ``attention_mask`` shows (its own token's class always, as a transformer's residual stream does)."""
    B, L = input_ids.shape
    fixed = torch.log_softmax(torch.sin(torch.arange(V * V, dtype=torch.float64).view(V, V) * 1.7), dim=-1)
    out = torch.empty(B, L, V, dtype=torch.float64)
    for b in range(B):
        seen, inside = [], False
        for i in range(L):
            tok = int(input_ids[b, i])
            if bool(attention_mask[b, i]):  # values count between the visible <p> and </p> only
                inside = tok == OPEN or (inside and tok != CLOSE)
                if inside and tok in VALUES:
                    seen.append(tok)
            if tok in QUERIES:
                k = QUERIES.index(tok)
                p = torch.full((V,), 1e-30, dtype=torch.float64)
                if k < len(seen):
                    p[list(VALUES)] = P_OTHER
                    p[seen[k]] = P_COPY
                else:
                    p[list(VALUES)] = P_UNIFORM
                out[b, i] = p.log()
            else:
                out[b, i] = fixed[_class(tok)]
    return out


def token_logp(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: log-prob of token ``j`` from row ``j − 1`` (0 at ``j = 0``), TRL's and srpo-core's convention."""
    lp = copy_model(input_ids, attention_mask)
    got = lp[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(input_ids.shape[0], 1, dtype=torch.float64), got], dim=1)


def make_batch(seed: int, b: int = 6, groups: int = 3):
    """Left-padded prompt | right-padded completion rows: ``<p> v… </p>`` then fillers and queries each followed by the
    value they copy. Returns ids, attention mask, span mask, the k of each copied token (−1 elsewhere), groups."""
    rng = random.Random(seed)
    rows = []
    for _ in range(b):
        prompt = [rng.choice(FILLERS) for _ in range(rng.randint(1, 4))]
        values = [rng.choice(VALUES) for _ in range(rng.randint(1, 4))]
        comp, span, k_of = [OPEN, *values, CLOSE], [0, *([1] * len(values)), 0], [-1] * (len(values) + 2)
        for _ in range(rng.randint(1, 4)):
            comp.append(rng.choice(FILLERS)); span.append(0); k_of.append(-1)  # noqa: E702
            k = rng.randrange(len(values))
            comp += [QUERIES[k], values[k]]; span += [0, 0]; k_of += [-1, k]  # noqa: E702
        rows.append((prompt, comp, span, k_of))
    p = max(len(r[0]) for r in rows)
    c = max(len(r[1]) for r in rows)
    ids = torch.full((b, p + c), PAD, dtype=torch.int64)
    attn = torch.zeros(b, p + c, dtype=torch.int64)
    span = torch.zeros(b, p + c, dtype=torch.bool)
    kk = torch.full((b, p + c), -1, dtype=torch.int64)
    for i, (prompt, comp, sp, k_of) in enumerate(rows):
        ids[i, p - len(prompt):p] = torch.tensor(prompt)
        attn[i, p - len(prompt):p + len(comp)] = 1
        ids[i, p:p + len(comp)] = torch.tensor(comp)
        span[i, p:p + len(comp)] = torch.tensor(sp, dtype=torch.bool)
        kk[i, p:p + len(comp)] = torch.tensor(k_of)
    group = torch.arange(b) * groups // b
    return ids, attn, span, kk, group


def ablated_logp(ids, attn, span, mode, donor=None):
    ab = ablate_span(ids, attn, span, mode=mode, donor=donor)
    return ab, ab.gather(token_logp(ab.input_ids, ab.attention_mask), fill=float("nan"))


def expected_delta(ids, span, kk, mode, donor=None):
    """``ℓ − ℓ°`` the copy model must give, NaN where no value is read."""
    want = torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(ids.shape[0]):
        own = ids[b][span[b]].tolist()
        other = ids[int(donor[b])][span[int(donor[b])]].tolist() if donor is not None and donor[b] >= 0 else None
        for j in range(ids.shape[1]):
            k = int(kk[b, j])
            if k < 0:
                continue
            if mode in ("mask", "drop"):
                want[b, j] = math.log(P_COPY / P_UNIFORM)
            elif k >= len(other):
                want[b, j] = math.log(P_COPY / P_UNIFORM)
            else:
                want[b, j] = 0.0 if other[k] == own[k] else math.log(P_COPY / P_OTHER)
    want[span] = float("nan")
    if mode == "mask":
        want[ids == CLOSE] = float("nan")  # the token right after the span is read from a hidden row (D180)
    return want


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["mask", "drop", "group", "other"])
def test_copy_model_gives_the_exact_contrast(mode, seed):
    ids, attn, span, kk, group = make_batch(seed)
    donor = None
    if mode in ("group", "other"):
        donor = counterfactual_donors(group, mode)
        mode = "counterfactual"
    ab, lo = ablated_logp(ids, attn, span, mode, donor)
    delta = token_logp(ids, attn) - lo
    want = expected_delta(ids, span, kk, mode, donor)
    real = attn.bool() & (torch.arange(ids.shape[1]) > 0)
    want = torch.where(real, want, delta)  # padding and the first column: whatever the pass gives
    assert torch.equal(delta.isnan(), want.isnan()), (mode, delta, want)
    ok = ~want.isnan()
    torch.testing.assert_close(delta[ok], want[ok], rtol=0, atol=1e-12)
    # the copied tokens really moved (the check is not vacuous)
    assert bool((delta[(kk >= 0) & ok].abs() > 1).any()) or mode == "counterfactual"


def test_counterfactual_realigns_by_offset_from_the_span_end():
    ids = torch.tensor([[11, OPEN, 3, 4, 5, CLOSE, 7, 3, PAD], [12, OPEN, 6, CLOSE, 8, 6, 12, 12, 12]])
    attn = (ids != PAD).long()
    span = torch.isin(ids, torch.tensor(VALUES)) & (torch.arange(9) < 5)
    ab = ablate_span(ids, attn, span, mode="counterfactual", donor=torch.tensor([1, 0]), pad_token_id=PAD)
    assert ab.input_ids.tolist() == [[11, OPEN, 6, CLOSE, 7, 3, PAD, PAD, PAD, PAD, PAD],
                                     [12, OPEN, 3, 4, 5, CLOSE, 8, 6, 12, 12, 12]]
    assert ab.index.tolist() == [[0, 1, -1, -1, -1, 3, 4, 5, -1], [0, 1, -1, 5, 6, 7, 8, 9, 10]]
    assert ab.attention_mask.tolist() == [[1] * 6 + [0] * 5, [1] * 11]
    x = torch.arange(18).view(2, 9)
    assert torch.equal(ab.gather(ab.ablate(x))[ab.valid], x[ab.valid])


def test_mask_gives_no_value_to_the_token_after_a_hidden_span():
    ids = torch.tensor([[11, 3, 4, CLOSE, 3, 12, 5, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    span = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    ab = ablate_span(ids, attn, span, mode="mask")
    assert ab.index.tolist() == [[0, -1, -1, -1, -1, -1, -1, 7]]
    assert follows_hidden(span, attn).tolist() == [[False, False, False, True, False, True, False, False]]
    # padding between a span and the next token is skipped over
    assert follows_hidden(torch.tensor([[1, 0, 0]]), torch.tensor([[1, 0, 1]])).tolist() == [[False, False, True]]


def test_donors():
    g = torch.tensor([0, 0, 1, 1, 1, 2])
    assert counterfactual_donors(g, "group").tolist() == [1, 0, 3, 4, 2, -1]
    assert counterfactual_donors(g, "other").tolist() == [2, 3, 5, 5, 5, 0]
    assert counterfactual_donors(torch.tensor([4, 4]), "other").tolist() == [-1, -1]
    with pytest.raises(ValueError, match="source"):
        counterfactual_donors(g, "random")


def test_counterfactual_without_donor_gives_no_value_from_the_span_on():
    ids, attn, span, _, _ = make_batch(0, b=2)
    ab = ablate_span(ids, attn, span, mode="counterfactual", donor=torch.tensor([-1, 0]))
    first = int(torch.nonzero(span[0])[0, 0])
    assert bool((ab.index[0, first:] == -1).all()) and bool((ab.index[0, :first] >= 0).all())
    assert torch.equal(ab.input_ids[0, :ids.shape[1]], ids[0])


def test_mode_errors():
    ids, attn, span, _, _ = make_batch(1, b=2)
    assert DEFAULT_ABLATION_MODE == "counterfactual" and set(ABLATION_MODES) == {"mask", "drop", "counterfactual"}
    with pytest.raises(ValueError, match="mode"):
        ablate_span(ids, attn, span, mode="shuffle")
    with pytest.raises(ValueError, match="donor"):
        ablate_span(ids, attn, span, mode="counterfactual")
    with pytest.raises(ValueError, match="donor"):
        ablate_span(ids, attn, span, mode="mask", donor=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="donor"):
        ablate_span(ids, attn, span, mode="counterfactual", donor=torch.tensor([2, 0]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        ablate_span(ids, attn, span, mode="counterfactual", donor=torch.tensor([1]))
    with pytest.raises(ValueError, match="ablation_mode"):
        check_ablation_mode("x: `ablation_mode`", "Mask")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.booleans())
def test_counterfactual_rows_are_prefix_donor_span_suffix(seed, b, split):
    """Any batch and donors: each rebuilt row is its tokens before the span, the donor's span run, its tokens after
    the span; values gathered back are the row's own at every position that gets one."""
    g = torch.Generator().manual_seed(seed)
    p, c = 3, 8
    ids = torch.randint(1, V, (b, p + c), generator=g)
    pos = torch.arange(p + c)
    prompt_len = torch.randint(1, p + 1, (b,), generator=g)
    comp_len = torch.randint(0, c + 1, (b,), generator=g)
    attn = ((pos >= p - prompt_len[:, None]) & (pos < p + comp_len[:, None])).long()
    span = (torch.rand(b, p + c, generator=g) < (0.5 if split else 0.3)) & (pos >= p) & attn.bool()
    if not split:  # one contiguous run: the hull of the draws
        lo = torch.where(span, pos, p + c).amin(1, keepdim=True)
        hi = torch.where(span, pos, -1).amax(1, keepdim=True)
        span = (pos >= lo) & (pos <= hi)
    donor = torch.randint(-1, b, (b,), generator=g)
    ab = ablate_span(ids, attn, span, mode="counterfactual", donor=donor, pad_token_id=0)
    for i in range(b):
        valid = attn[i].bool()
        end = int(torch.nonzero(valid).max()) + 1 if bool(valid.any()) else 0
        if not bool(span[i].any()) or int(donor[i]) < 0:
            want = ids[i, :end]
        else:
            s, e = int(torch.nonzero(span[i]).min()), int(torch.nonzero(span[i]).max()) + 1
            d = int(donor[i])
            hull = (ids[d, int(torch.nonzero(span[d]).min()):int(torch.nonzero(span[d]).max()) + 1]
                    if bool(span[d].any()) else ids[d, :0])
            want = torch.cat([ids[i, :s], hull, ids[i, e:end]])
        assert torch.equal(ab.input_ids[i, :len(want)], want), (i, ab.input_ids[i], want)
        assert bool((ab.attention_mask[i, len(want):] == 0).all())
    x = torch.randn(ids.shape)
    back = ab.gather(ab.ablate(x), fill=float("nan"))
    assert torch.equal(back[ab.valid], x[ab.valid]) and bool(back[~ab.valid].isnan().all())
    assert not bool(ab.valid[span].any())


def test_counterfactual_donors_pass_over_identical_spans():
    """A donor whose span holds the row's own tokens would give ℓ° = ℓ (a signal of 0 that says nothing): the next
    candidate with another span is taken, and a row only such candidates could serve gets no donor (−1)."""
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    ids = torch.tensor([[7, 1, 2, 9], [7, 1, 2, 9], [7, 3, 4, 9], [7, 5, 5, 9], [7, 5, 5, 9], [7, 1, 2, 9]])
    span = torch.tensor([[0, 1, 1, 0]] * 6, dtype=torch.bool)
    assert counterfactual_donors(g, "group").tolist() == [1, 2, 0, 4, 3, -1]  # without spans: the next member
    assert counterfactual_donors(g, "group", input_ids=ids, span_mask=span).tolist() == [2, 2, 0, -1, -1, -1]
    # "other": rank-matched member of the next group, passing over one with the same span (row 5 → group 0)
    assert counterfactual_donors(g, "other", input_ids=ids, span_mask=span).tolist() == [3, 4, 3, 5, 5, 2]
    with pytest.raises(ValueError, match="together"):
        counterfactual_donors(g, "group", input_ids=ids)
