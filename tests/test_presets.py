"""VPPO and PAPO presets against float64 transcriptions of the published formulas, written as plain loops.

The transcriptions follow the authors' code (VPPO-RL ``dp_actor.py``: the sensitivity score, the min-max scaling with
its dynamic upper bound, the top-p token mask; PAPO ``dp_actor.py`` + ``core_algos.compute_kl("low_var_kl")``) with
two documented departures: equal log-probs (both ``−inf`` included) give ``d = 0`` instead of NaN, and top-k ties go
to the earlier token (VPPO's unstable sort leaves them undefined).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from srpo_core.presets import papo_perception_kl, vppo_advantages

NEG_INF = float("-inf")
# Examples per hypothesis test under the "ci" profile (60); other profiles (HYPOTHESIS_PROFILE=thorough) scale them.
_SCALE = settings.default.max_examples / 60


def examples(n: int) -> int:
    return max(10, round(n * _SCALE))


TOP_KS = (0.1, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.7, 0.9, 1.0)


# --------------------------------------------------------------------------- float64 transcriptions (plain loops)
def d_ref(l: float, lc: float, c: float) -> float:
    if l == lc:
        return 0.0
    return min(max(lc - l, -c), c)


def k3_ref(l: float, lc: float, c: float = 20.0, kmax: float = 10.0) -> float:
    d = d_ref(l, lc, c)
    return min(max(math.exp(d) - d - 1.0, 0.0), kmax)


def vppo_ref(A, L, LC, beta_min, top_k, c=20.0, kmax=10.0):
    """Per trajectory: (token advantages, expected kept count, dependencies, alpha)."""
    dep = [[k3_ref(a, b, c, kmax) for a, b in zip(l, lc, strict=True)] for l, lc in zip(L, LC, strict=True)]
    scores = [sum(d) / len(d) if d else None for d in dep]
    valid = [s for s in scores if s is not None]
    alpha = [1.0] * len(L)
    if len(valid) > 1 and max(valid) - min(valid) > 1e-6:
        lo, hi = min(valid), max(valid)
        norm = [None if s is None else min(max((s - lo) / (hi - lo), 0.0), 1.0) for s in scores]
        mu = sum(x for x in norm if x is not None) / len(valid)
        beta_max = beta_min + (1.0 - beta_min) / mu
        alpha = [1.0 if x is None else beta_min + x * (beta_max - beta_min) for x in norm]
    frac = Fraction(top_k).limit_denominator(10**6)
    kept = [math.ceil(frac * len(d)) for d in dep]
    adv = [[alpha[i] * A[i]] * len(dep[i]) for i in range(len(L))]
    return adv, kept, dep, alpha


def papo_ref(l: float, lc: float, c=20.0, kmax=10.0):
    """(kl, d kl / d l): PAPO's low_var_kl with ref = the corrupted pass; the clamps stop the gradient."""
    d = d_ref(l, lc, c)
    raw = math.exp(d) - d - 1.0
    kl = min(max(raw, -10.0), kmax)
    inside = (l != lc) and (-c <= lc - l <= c) and raw <= kmax  # torch.clamp passes the gradient at its bounds
    return kl, (-(math.exp(d) - 1.0) if inside else 0.0)


# --------------------------------------------------------------------------- strategies
GRID = st.sampled_from([-8.0, -4.0, -2.5, -1.0, -0.5, -0.25, 0.0])
LOGP = st.one_of(GRID, st.floats(-40.0, 0.0, allow_nan=False), st.just(NEG_INF))


@st.composite
def batches(draw, max_b=7, max_t=9):
    lengths = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 7, max_t]), min_size=0, max_size=max_b))
    L = [draw(st.lists(LOGP, min_size=n, max_size=n)) for n in lengths]
    LC = [draw(st.lists(LOGP, min_size=n, max_size=n)) for n in lengths]
    A = draw(st.lists(st.floats(-3.0, 3.0, allow_nan=False), min_size=len(lengths), max_size=len(lengths)))
    return A, L, LC


def layout(L, dtype, kind, garbage=float("nan")):
    """Per-trajectory lists -> (tensor, mask or cu_seqlens) in the padded or packed layout."""
    B = len(L)
    if kind == "packed":
        flat = [x for row in L for x in row]
        cu = [0]
        for row in L:
            cu.append(cu[-1] + len(row))
        return torch.tensor(flat, dtype=dtype), {"cu_seqlens": torch.tensor(cu, dtype=torch.int64)}
    T = max([len(r) for r in L] + [0]) + 2
    x = torch.full((B, T), garbage, dtype=dtype)
    m = torch.zeros((B, T), dtype=torch.bool)
    for i, row in enumerate(L):
        start = i % 3  # left, middle and right padding
        x[i, start:start + len(row)] = torch.tensor(row, dtype=dtype)
        m[i, start:start + len(row)] = True
    return x, {"mask": m}


def rows(x: torch.Tensor, kw: dict, L) -> list[list]:
    """A per-token output back to per-trajectory lists."""
    if "mask" in kw:
        return [x[i][kw["mask"][i]].tolist() for i in range(len(L))]
    cu = kw["cu_seqlens"].tolist()
    return [x[cu[i]:cu[i + 1]].tolist() for i in range(len(L))]


def check_mask(kept_rows, dep_ref, k_expected):
    """Exactly k tokens per response: the k largest, ties by position; tokens whose float64 dependency lies within
    1e-9 of the k-th value may swap (our expm1 and the transcription's exp differ in the last bits)."""
    for mask_row, dep, k in zip(kept_rows, dep_ref, k_expected, strict=True):
        assert sum(mask_row) == k
        order = sorted(range(len(dep)), key=lambda t: (-dep[t], t))
        expected = set(order[:k])
        got = {t for t, v in enumerate(mask_row) if v}
        if got != expected:
            thr = dep[order[k - 1]]
            for t in got ^ expected:
                assert abs(dep[t] - thr) <= 1e-9 * (1.0 + thr), (t, dep, mask_row)


# --------------------------------------------------------------------------- VPPO
@settings(max_examples=examples(40))
@given(batch=batches(), beta_min=st.sampled_from([0.0, 0.5, 0.9, 1.0]), top_k=st.sampled_from(TOP_KS),
       kind=st.sampled_from(["padded", "packed"]))
def test_vppo_matches_float64_transcription(batch, beta_min, top_k, kind):
    A, L, LC = batch
    adv_ref, kept, dep_ref, alpha_ref = vppo_ref(A, L, LC, beta_min, top_k)
    scores = [sum(d) / len(d) for d in dep_ref if d]
    assume(len(scores) < 2 or abs(max(scores) - min(scores) - 1e-6) > 1e-9)  # no coin-flip at VPPO's threshold
    x, kw = layout(L, torch.float64, kind)
    xc, _ = layout(LC, torch.float64, kind)
    out = vppo_advantages(torch.tensor(A, dtype=torch.float64), x, xc, beta_min=beta_min, top_k=top_k, **kw)
    adv, loss_mask = out
    assert adv.dtype == torch.float64 and loss_mask.dtype == torch.bool and adv.shape == x.shape
    for got, want in zip(rows(adv, kw, L), adv_ref, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    for got, want in zip(rows(out.dependency, kw, L), dep_ref, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert out.alpha.tolist() == pytest.approx(alpha_ref, rel=1e-6, abs=1e-6)
    check_mask(rows(loss_mask, kw, L), dep_ref, kept)
    if "mask" in kw:  # nothing outside the response
        assert not bool(loss_mask[~kw["mask"]].any()) and bool((adv[~kw["mask"]] == 0).all())


@settings(max_examples=examples(30))
@given(batch=batches(), beta_min=st.sampled_from([0.0, 0.3, 0.9]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_vppo_alpha_mean_is_one(batch, beta_min, dtype):
    """The paper's claim: the dynamic β_max makes the batch's mean scale exactly 1 (when the range is non-zero)."""
    A, L, LC = batch
    x, kw = layout(L, dtype, "padded")
    xc, _ = layout(LC, dtype, "padded")
    out = vppo_advantages(torch.tensor(A, dtype=dtype), x, xc, beta_min=beta_min, **kw)
    assert out.advantages.dtype == torch.float32
    alpha = out.alpha[torch.tensor([len(r) > 0 for r in L], dtype=torch.bool)]
    assert bool((out.alpha >= beta_min - 1e-6).all())
    if alpha.numel() > 1 and out.stats["vppo/alpha_max"] > out.stats["vppo/alpha_min"]:
        assert float(alpha.double().mean()) == pytest.approx(1.0, abs=1e-5)
        assert out.stats["vppo/beta_max"] == pytest.approx(float(alpha.max()), rel=1e-5)
    else:
        assert bool((out.alpha == 1).all())
    # Sign of every token advantage is A_i's (α ≥ 0).
    adv_rows = rows(out.advantages, kw, L)
    for a, row in zip(A, adv_rows, strict=True):
        assert all(v * float(torch.tensor(a, dtype=dtype)) >= 0 for v in row)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 10, 11, 13, 50, 100], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("top_k", TOP_KS, ids=lambda k: f"k{k:.3g}")
def test_vppo_mask_size_is_ceil(n, top_k):
    torch.manual_seed(n)
    logp = -torch.rand(1, n, dtype=torch.float64) * 5
    out = vppo_advantages(torch.ones(1), logp, logp - torch.rand(1, n, dtype=torch.float64), top_k=top_k,
                          mask=torch.ones(1, n, dtype=torch.bool))
    want = math.ceil(Fraction(top_k).limit_denominator(10**6) * n)
    assert int(out.loss_mask.sum()) == want
    # VPPO's float32 product says 16 for 0.3 · 50; the exact count is 15.
    if (top_k, n) == (0.3, 50):
        assert want == 15 and int(torch.ceil(torch.tensor(50) * 0.3)) == 16


def test_vppo_ties_go_to_the_earlier_token():
    # Positions 1, 2, 4, 5 and 7 share the top dependency; k = ceil(0.5 · 8) = 4 keeps the first four of them.
    d = torch.tensor([[0.5, 2.0, 2.0, 0.0, 2.0, 2.0, 0.1, 2.0]], dtype=torch.float64)
    logp = torch.full_like(d, -3.0)
    out = vppo_advantages(torch.ones(1), logp, logp + d, top_k=0.5, mask=torch.ones_like(d, dtype=torch.bool))
    assert out.loss_mask[0].tolist() == [False, True, True, False, True, True, False, False]
    # Zeros of both signs tie too: −0.0 and +0.0 are the same dependency.
    logp2 = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    out2 = vppo_advantages(torch.ones(1), logp2, logp2.clone(), top_k=0.34, mask=torch.ones(1, 3, dtype=torch.bool))
    assert out2.loss_mask[0].tolist() == [True, True, False]


def test_vppo_padded_and_packed_agree_and_ignore_garbage():
    torch.manual_seed(3)
    L = [[-float(torch.rand(1)) * 4 for _ in range(n)] for n in (3, 0, 6, 1, 4)]
    LC = [[v - float(torch.rand(1)) for v in row] for row in L]
    A = [0.5, -1.0, 2.0, -0.3, 1.1]
    res = {}
    for kind, garbage in (("packed", 0.0), ("padded", float("nan")), ("padded", float("inf"))):
        x, kw = layout(L, torch.float32, kind, garbage)
        xc, _ = layout(LC, torch.float32, kind, garbage)
        out = vppo_advantages(torch.tensor(A), x, xc, **kw)
        res[(kind, garbage)] = (rows(out.advantages, kw, L), rows(out.loss_mask, kw, L), out.alpha.tolist())
    first = next(iter(res.values()))
    for v in res.values():
        assert v == first


def test_vppo_degenerate_batches():
    # B = 0.
    empty = torch.zeros(0, 4)
    out = vppo_advantages(torch.zeros(0), empty, empty, mask=torch.zeros(0, 4, dtype=torch.bool))
    assert out.advantages.shape == (0, 4) and out.alpha.shape == (0,)
    # One response: no range, α = 1.
    x = torch.tensor([[-1.0, -2.0]])
    out = vppo_advantages(torch.tensor([2.0]), x, x - 1, mask=torch.ones(1, 2, dtype=torch.bool))
    assert out.alpha.tolist() == [1.0] and out.advantages.tolist() == [[2.0, 2.0]]
    # All dependencies equal: range 0, α = 1.
    x = torch.full((3, 2), -1.0)
    out = vppo_advantages(torch.tensor([1.0, -1.0, 0.5]), x, x - 0.5, mask=torch.ones(3, 2, dtype=torch.bool))
    assert out.alpha.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        pytest.param({"top_k": 0.0}, ValueError, "top_k", id="top_k-zero"),
        pytest.param({"top_k": 1.5}, ValueError, "top_k", id="top_k-above-one"),
        pytest.param({"beta_min": 1.2}, ValueError, "beta_min", id="beta_min-above-one"),
        pytest.param({"beta_min": True}, TypeError, "beta_min", id="beta_min-bool"),
        pytest.param({"cu_seqlens": torch.tensor([0, 2])}, ValueError, "cu_seqlens", id="padded-with-cu"),
    ],
)
def test_vppo_rejects_bad_arguments(kwargs, err, match):
    x = torch.tensor([[-1.0, -2.0]])
    kw = {"mask": torch.ones(1, 2, dtype=torch.bool), **kwargs}
    with pytest.raises(err, match=match):
        vppo_advantages(torch.ones(1), x, x, **kw)


def test_vppo_outputs_are_detached_constants():
    """Issue 22: advantages are constants of the policy-gradient loss; nothing flows back into the log-probs."""
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(3, 6, generator=g) * 3).requires_grad_(True)
    logp_c = (logp.detach() - torch.rand(3, 6, generator=g)).requires_grad_(True)
    adv = torch.randn(3, generator=g).requires_grad_(True)
    out = vppo_advantages(adv, logp, logp_c, mask=torch.ones(3, 6, dtype=torch.bool))
    for name in ("advantages", "alpha", "dependency"):
        assert getattr(out, name).grad_fn is None and not getattr(out, name).requires_grad, name
    (out.advantages * torch.exp(logp)).sum().backward()
    assert torch.equal(logp.grad, out.advantages * torch.exp(logp.detach()))
    assert logp_c.grad is None and adv.grad is None


def test_vppo_rejects_nan_at_valid_positions_only():
    x = torch.tensor([[-1.0, float("nan")]])
    with pytest.raises(ValueError, match=r"`logp_corrupt` has 1 NaN.*\(0, 1\)"):
        vppo_advantages(torch.ones(1), torch.full((1, 2), -1.0), x, mask=torch.ones(1, 2, dtype=torch.bool))
    vppo_advantages(torch.ones(1), torch.full((1, 2), -1.0), x, mask=torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="one entry per trajectory"):
        vppo_advantages(torch.ones(2), torch.zeros(3), torch.zeros(3), cu_seqlens=torch.tensor([0, 3]))


# --------------------------------------------------------------------------- PAPO
@settings(max_examples=examples(40))
@given(batch=batches(), kind=st.sampled_from(["padded", "packed"]))
def test_papo_matches_float64_transcription_and_gradient(batch, kind):
    _, L, LC = batch
    x, kw = layout(L, torch.float64, kind)
    xc, _ = layout(LC, torch.float64, kind)
    x.requires_grad_(True)
    kl = papo_perception_kl(x, xc, **kw)
    assert kl.shape == x.shape and kl.dtype == torch.float64
    kl.sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    for kl_row, g_row, l, lc in zip(rows(kl.detach(), kw, L), rows(x.grad, kw, L), L, LC, strict=True):
        ref = [papo_ref(a, b) for a, b in zip(l, lc, strict=True)]
        assert kl_row == pytest.approx([r[0] for r in ref], rel=1e-6, abs=1e-6)
        assert g_row == pytest.approx([r[1] for r in ref], rel=1e-6, abs=1e-6)
    if "mask" in kw:
        assert bool((kl.detach()[~kw["mask"]] == 0).all()) and bool((x.grad[~kw["mask"]] == 0).all())


def test_papo_gradcheck_and_low_precision():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5, dtype=torch.float64) * 3).requires_grad_(True)
    logp_c = (logp.detach() - torch.rand(3, 5, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    mask = torch.rand(3, 5) > 0.3
    assert torch.autograd.gradcheck(lambda a, b: papo_perception_kl(a, b, mask=mask), (logp, logp_c))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        lp = logp.detach().to(dtype).requires_grad_(True)
        kl = papo_perception_kl(lp, logp_c.detach().to(dtype), mask=mask)
        assert kl.dtype == torch.float32
        kl.sum().backward()
        assert lp.grad.dtype == dtype and bool(torch.isfinite(lp.grad.float()).all())


def test_papo_is_maximised_by_moving_away_from_the_corrupted_pass():
    """PAPO subtracts the KL: one gradient step on ``−kl`` widens the gap between the two passes."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    logp_c = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = -papo_perception_kl(logp, logp_c, mask=mask).sum()
    loss.backward()
    with torch.no_grad():
        stepped = logp - 0.1 * logp.grad
    assert bool((papo_perception_kl(stepped, logp_c, mask=mask) > papo_perception_kl(logp.detach(), logp_c, mask=mask))
                .all())


def test_papo_rejects_nan_and_bad_layouts():
    with pytest.raises(ValueError, match="`logp` has 1 NaN"):
        papo_perception_kl(torch.tensor([float("nan")]), torch.zeros(1), cu_seqlens=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="need `mask"):
        papo_perception_kl(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="shape of `logp`"):
        papo_perception_kl(torch.zeros(1, 2), torch.zeros(2, 1), mask=torch.ones(1, 2, dtype=torch.bool))


def test_vppo_backends_name_one_path():
    """``vppo_advantages`` is one plain-torch path: ``"reference"`` (every op takes it) runs it like ``"auto"`` and
    ``"torch"``, ``"triton"`` says there is no kernel (``"reference"`` once hit a bare ``assert``: review)."""
    lp = -torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    kw = dict(mask=torch.ones(2, 5, dtype=torch.bool))
    outs = [vppo_advantages(torch.tensor([1.0, -1.0]), lp, lp - 0.1, backend=b, **kw) for b in
            ("auto", "torch", "reference")]
    for o in outs[1:]:
        torch.testing.assert_close(o.advantages, outs[0].advantages, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="no Triton kernel"):
        vppo_advantages(torch.tensor([1.0, -1.0]), lp, lp - 0.1, backend="triton", **kw)
