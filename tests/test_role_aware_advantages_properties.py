"""SPEC properties 1-9 of ``role_aware_advantages`` (property 10, across ranks, is in test_distributed.py).

Each property runs on hypothesis-drawn batches: B from 0, trajectory lengths with 0 and 1, role mixes (none,
perception only, reasoning only, mixed, roles only), input dtypes fp32/fp64/bf16/fp16, every config knob, and both
layouts (padded with left/right/middle padding, packed). ``EXAMPLES`` records the example count of each property.
"""

from __future__ import annotations

import math

import pytest
import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_core import Role, SRPOConfig, role_aware_advantages

# Hypothesis examples per property under the "ci" profile (60 examples by default; the closing note asks for
# these counts). Other profiles scale them: HYPOTHESIS_PROFILE=thorough (500) runs ~8x as many, dev (20) a third.
# Each property runs once per backend ("auto": on CPU the fast path of srpo_core/cpu/role_aware_advantages.py;
# "reference": the reference), with half of these examples each.
EXAMPLES = {1: 150, 2: 150, 3: 100, 4: 100, 5: 150, 6: 100, 7: 100, 8: 100, 9: 100}
_SCALE = settings.default.max_examples / 60
EXAMPLES = {k: max(10, round(v * _SCALE / 2)) for k, v in EXAMPLES.items()}
BACKENDS = pytest.mark.parametrize("backend", ["auto", "reference"])


@st.composite
def laid_out(draw, *, case_kw=None, dtypes=S.FLOAT_DTYPES, adv_dtypes=None, garbage=True):
    """``(case, kwargs)``: a case in a drawn layout and dtype, padded ones with optional garbage outside the mask."""
    case = draw(S.cases(**(case_kw or {})))
    dtype = draw(st.sampled_from(dtypes))
    adv_dtype = draw(st.sampled_from(adv_dtypes or (dtype, torch.float32, torch.float64)))
    if draw(st.sampled_from(("padded", "packed"))) == "packed":
        return case, case.packed(dtype, adv_dtype)
    seed = draw(st.one_of(st.none(), st.integers(0, 2**16))) if garbage else None
    return case, case.padded(dtype, adv_dtype, **draw(S.padded_layouts(case)), garbage=seed)


def run(kwargs, config, **extra):
    return role_aware_advantages(**kwargs, config=config, **extra)


def out_dtype(kwargs) -> torch.dtype:
    floats = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return torch.float64 if any(v.dtype == torch.float64 for v in floats) else torch.float32


# -- 1 --------------------------------------------------------------------------------------------------------------
@BACKENDS
@settings(max_examples=EXAMPLES[1])
@given(data=laid_out(case_kw={"extreme": True, "signals": None}, adv_dtypes=(torch.float32, torch.float64)),
       config=S.configs())
def test_property1_weights_finite_and_positive(data, config, backend):
    """Extreme inputs: -inf and ±1e30..3e38 log-probs, precomputed signals up to 1e30, huge/tiny advantages."""
    case, kw = data
    out = run(kw, config, backend=backend)
    valid = S.valid_mask(kw)
    w = out.weights[valid]
    assert w.dtype == out_dtype(kw)
    assert bool(torch.isfinite(w).all()), f"non-finite weights {w[~torch.isfinite(w)]}"
    assert bool((w > 0).all()), f"non-positive weights {w[w <= 0]}"
    assert bool((out.weights[~valid] == 0).all())


@BACKENDS
def test_property1_fp32_signals_near_float_max(backend):
    s = torch.tensor([3.4e38, 3.4e38, -3.4e38])
    out = role_aware_advantages(torch.tensor([1.0]), torch.zeros(3), None, None, torch.ones(3, dtype=torch.int64),
                                cu_seqlens=torch.tensor([0, 3]), perception_signal=s, backend=backend)
    assert bool(torch.isfinite(out.weights).all()), out.weights


# -- 2 --------------------------------------------------------------------------------------------------------------
@BACKENDS
@settings(max_examples=EXAMPLES[2])
@given(data=laid_out(case_kw={"extreme": True, "signals": None}, adv_dtypes=(torch.float32, torch.float64)),
       config=S.configs())
def test_property2_sign_preserved(data, config, backend):
    case, kw = data
    out = run(kw, config, backend=backend)
    valid = S.valid_mask(kw)
    seg = S.segment_of(kw)
    a_i = kw["advantages"].to(torch.float64)[seg.clamp(min=0)]
    got = torch.sign(out.advantages[valid].to(torch.float64))
    want = torch.sign(a_i[valid])
    assert torch.equal(got, want), f"sign flipped: got {got}, want {want}"
    assert bool((out.advantages[~valid] == 0).all())


# -- 3 --------------------------------------------------------------------------------------------------------------
@BACKENDS
@settings(max_examples=EXAMPLES[3])
@given(data=laid_out(case_kw={"signals": None}), config=S.configs(beta_perception=0.0, beta_reasoning=0.0))
def test_property3_zero_beta_is_grpo_exactly(data, config, backend):
    case, kw = data
    out = run(kw, config, backend=backend)
    valid = S.valid_mask(kw)
    seg = S.segment_of(kw)
    dtype = out_dtype(kw)
    expected = torch.where(valid, kw["advantages"].to(dtype)[seg.clamp(min=0)], torch.zeros((), dtype=dtype))
    assert torch.equal(out.advantages, expected)
    assert torch.equal(out.weights, valid.to(dtype))


# -- 4 --------------------------------------------------------------------------------------------------------------
@st.composite
def constant_signal_cases(draw):
    """A case with precomputed signals where some target trajectories have a constant signal over their role
    tokens. ``standardize="none"``: any role mix; ``"batch"``: targets hold one role only (see decision D13)."""
    standardize = draw(st.sampled_from(("none", "batch")))
    case = draw(S.cases(signals=True, min_b=1))
    targets = draw(st.lists(st.integers(0, case.B - 1), min_size=1, max_size=case.B, unique=True))
    for i in targets:
        c = draw(st.floats(-50, 50, width=16))  # fp16-exact, so every input dtype holds it exactly
        if standardize == "batch":
            role = draw(st.sampled_from((Role.PERCEPTION, Role.REASONING)))
            case.roles[i] = [role if r != Role.OTHER else r for r in case.roles[i]]
        case.perception_signal[i] = [c] * len(case.roles[i])
        case.reasoning_signal[i] = [c] * len(case.roles[i])
    return standardize, case, targets


@BACKENDS
@settings(max_examples=EXAMPLES[4])
@given(data=constant_signal_cases(), config=S.configs(renorm=st.just("none")),
       dtype=st.sampled_from(S.FLOAT_DTYPES), padded=st.booleans())
def test_property4_constant_signal_gives_unit_weights(data, config, dtype, padded, backend):
    standardize, case, targets = data
    kw = case.padded(dtype, extra=1, garbage=3) if padded else case.packed(dtype)
    seg = S.segment_of(kw)
    valid = S.valid_mask(kw)
    tol = 1e-12 if out_dtype(kw) == torch.float64 else 1e-5
    for renorm in ("none", "mean"):
        cfg = SRPOConfig(**{**config.__dict__, "standardize": standardize, "renorm": renorm})
        out = run(kw, cfg, backend=backend)
        for i in targets:
            w = out.weights[valid & (seg == i)].to(torch.float64)
            assert bool(((w - 1).abs() <= tol).all()), f"trajectory {i} ({renorm=}): weights {w.tolist()}"


# -- 5 --------------------------------------------------------------------------------------------------------------
@BACKENDS
@settings(max_examples=EXAMPLES[5])
@given(data=laid_out(case_kw={"signals": None, "extreme": True}, adv_dtypes=(torch.float32,)),
       config=S.configs(renorm="mean"))
def test_property5_mean_weight_is_one(data, config, backend):
    case, kw = data
    out = run(kw, config, backend=backend)
    seg = S.segment_of(kw)
    valid = S.valid_mask(kw)
    tol = 1e-12 if out_dtype(kw) == torch.float64 else 1e-5
    for i, n in enumerate(case.lengths):
        if n:
            mean = out.weights[valid & (seg == i)].to(torch.float64).mean().item()
            assert abs(mean - 1.0) <= tol, f"trajectory {i}: mean weight {mean!r}"


# -- 6 --------------------------------------------------------------------------------------------------------------
def assert_same(a, b, where=""):
    for name in ("advantages", "weights", "signals", "baseline"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{where}: `{name}` differs:\n{x}\n{y}"


@BACKENDS
@settings(max_examples=EXAMPLES[6])
@given(case=S.cases(signals=None, extreme=True), config=S.configs(), dtype=st.sampled_from(S.FLOAT_DTYPES),
       data=st.data())
def test_property6_layouts_agree_and_garbage_is_ignored(case, config, dtype, data, backend):
    layout = data.draw(S.padded_layouts(case))
    packed = run(case.packed(dtype, torch.float32), config, backend=backend)
    clean_kw = case.padded(dtype, torch.float32, **layout)
    clean = run(clean_kw, config, backend=backend)
    dirty = run(case.padded(dtype, torch.float32, **layout, garbage=data.draw(st.integers(0, 2**16))), config,
                backend=backend)
    assert_same(clean, dirty, "garbage outside the mask")
    mask = clean_kw["mask"]
    for name in ("advantages", "weights", "signals"):
        padded, flat = getattr(clean, name), getattr(packed, name)
        assert torch.equal(padded[mask], flat), f"padded vs packed `{name}`"
        assert bool((padded[~mask] == 0).all()), f"`{name}` is not 0 outside the mask"
    assert torch.equal(clean.baseline, packed.baseline)
    assert clean.stats.keys() == packed.stats.keys()
    for k in clean.stats:
        assert clean.stats[k] == packed.stats[k] or (math.isnan(clean.stats[k]) and math.isnan(packed.stats[k])), k


@BACKENDS
@settings(max_examples=EXAMPLES[6] // 2)
@given(case=S.cases(signals=None), config=S.configs(), data=st.data())
def test_property6_unread_valid_positions_are_ignored(case, config, data, backend):
    """Values the SPEC never reads at valid positions, NaN included: log-probs at OTHER tokens, ``logp_corrupt``
    outside perception tokens, ``logp_ablated`` outside reasoning tokens, precomputed signals of the other role."""
    kw = case.packed(torch.float32)
    roles = kw["roles"]
    out = run(kw, config, backend=backend)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    garbage = torch.tensor(S.GARBAGE)[torch.randint(0, len(S.GARBAGE), roles.shape, generator=gen)]
    dirty = dict(kw)
    dirty["logp"] = torch.where(roles == Role.OTHER, garbage, kw["logp"])
    dirty["logp_corrupt"] = torch.where(roles != Role.PERCEPTION, garbage, kw["logp_corrupt"])
    dirty["logp_ablated"] = torch.where(roles != Role.REASONING, garbage, kw["logp_ablated"])
    if "perception_signal" in kw:
        dirty["perception_signal"] = torch.where(roles != Role.PERCEPTION, garbage, kw["perception_signal"])
        dirty["reasoning_signal"] = torch.where(roles != Role.REASONING, garbage, kw["reasoning_signal"])
    assert_same(out, run(dirty, config, backend=backend), "garbage at unread valid positions")


# -- 7 --------------------------------------------------------------------------------------------------------------
@BACKENDS
@settings(max_examples=EXAMPLES[7])
@given(case=S.cases(signals=None, min_b=1), config=S.configs(), dtype=st.sampled_from(S.FLOAT_DTYPES),
       data=st.data())
def test_property7_permuting_trajectories_permutes_outputs(case, config, dtype, data, backend):
    perm = data.draw(st.permutations(range(case.B)))
    packed = data.draw(st.booleans())
    kw, kw_p = (case.packed(dtype), case.permuted(perm).packed(dtype)) if packed else (
        case.padded(dtype, extra=1), case.permuted(perm).padded(dtype, extra=1))
    a, b = run(kw, config, backend=backend), run(kw_p, config, backend=backend)
    # Batch statistics are sums in another order: equal up to rounding, not bit for bit.
    tol = 1e-10 if out_dtype(kw) == torch.float64 else 2e-5
    torch.testing.assert_close(b.baseline, a.baseline[perm], atol=tol, rtol=tol)
    if packed:
        seg_a = S.segment_of(kw)
        for name in ("advantages", "weights", "signals"):
            x, y = getattr(a, name), getattr(b, name)
            pieces = [x[seg_a == i] for i in perm]
            expect = torch.cat(pieces) if pieces else x
            torch.testing.assert_close(y, expect, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
    else:
        for name in ("advantages", "weights", "signals"):
            x, y = getattr(a, name), getattr(b, name)
            torch.testing.assert_close(y, x[perm], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


# -- 8 --------------------------------------------------------------------------------------------------------------
@BACKENDS
@settings(max_examples=EXAMPLES[8])
@given(data=laid_out(case_kw={"signals": None, "extreme": True}), config=S.configs())
def test_property8_monotone_within_trajectory_and_role(data, config, backend):
    case, kw = data
    out = run(kw, config, backend=backend)
    valid = S.valid_mask(kw)
    seg = S.segment_of(kw)
    dtype = out_dtype(kw)
    from srpo_core.advantages import contrast

    for role, kind, other, given_name in (
        (Role.PERCEPTION, config.perception_contrast, "logp_corrupt", "perception_signal"),
        (Role.REASONING, config.reasoning_contrast, "logp_ablated", "reasoning_signal"),
    ):
        sel = valid & (kw["roles"] == role)
        if not bool(sel.any()):
            continue
        if given_name in kw:
            s = kw[given_name].to(dtype)
        else:
            s = contrast(kw["logp"][sel].to(dtype), kw[other][sel].to(dtype), kind, clamp=config.clamp,
                         k3_max=config.k3_max)
            s = torch.zeros(sel.shape, dtype=dtype).masked_scatter(sel, s)
        for i in range(case.B):
            here = sel & (seg == i)
            si, wi = s[here], out.weights[here]
            # s_a > s_b  =>  w_a >= w_b, over all pairs of the trajectory's tokens of this role.
            bigger = si[:, None] > si[None, :]
            assert bool((wi[:, None] >= wi[None, :])[bigger].all()), f"{role.name} traj {i}: s={si} w={wi}"


# -- 9 --------------------------------------------------------------------------------------------------------------
@st.composite
def spread_signals(draw):
    """Precomputed float64 signals whose per-role population std is exactly 0 or >= 0.5, so eps barely matters."""
    case = draw(S.cases(signals=True, mix=draw(st.sampled_from(("perception", "reasoning", "mixed", "roles_only")))))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    for rows in (case.perception_signal, case.reasoning_signal):
        # scale 0 gives a constant role, whose σ_r must be exactly 0 (see test_constant_fp64_signal_gives_zero_z).
        scale = draw(st.sampled_from((0.0, 1.0, 30.0)))
        centre = draw(st.floats(-20, 20))
        for j, row in enumerate(rows):
            rows[j] = (centre + scale * torch.randn(len(row), generator=gen, dtype=torch.float64)).tolist()
    return case


def role_std(kw, role, name) -> float:
    s = kw[name][kw["roles"] == role] if "mask" not in kw else kw[name][kw["mask"] & (kw["roles"] == role)]
    return float(s.std(unbiased=False)) if s.numel() else 0.0


@BACKENDS
@settings(max_examples=EXAMPLES[9])
@given(case=spread_signals(), config=S.configs(standardize="batch"), role=st.sampled_from((Role.PERCEPTION,
                                                                                          Role.REASONING)),
       a=st.floats(0.1, 10.0), c=st.floats(-100.0, 100.0), padded=st.booleans())
def test_property9_affine_signal_change_in_one_role_changes_no_weight(case, config, role, a, c, padded, backend):
    kw = case.padded(torch.float64, extra=1, garbage=5) if padded else case.packed(torch.float64)
    name = "perception_signal" if role == Role.PERCEPTION else "reasoning_signal"
    sigma = role_std(kw, role, name)
    if 0 < sigma < 0.5:
        return  # a few tokens can fall close together by chance
    kw2 = dict(kw)
    kw2[name] = a * kw[name] + c
    w1, w2 = run(kw, config, backend=backend).weights, run(kw2, config, backend=backend).weights
    # z = (s - μ)/(σ + eps) versus (s - μ)/(σ + eps/a): |Δz| <= |z|·eps·|1/σ − 1/(aσ)|, and the weight map has
    # relative slope at most β (linear: β / w_min), renorm at most doubles the relative change.
    beta = max(config.beta_perception, config.beta_reasoning)
    zmax = float(run(kw, config, backend=backend).signals.abs().max()) if w1.numel() else 0.0
    slope = beta / min(config.w_min, 1.0) if config.weight_map == "linear" else beta
    rel = 4 * slope * zmax * config.eps * (1 / sigma + 1 / (a * sigma)) if sigma > 0 else 0.0
    torch.testing.assert_close(w2, w1, rtol=rel + 1e-9, atol=1e-9)


@BACKENDS
def test_constant_fp64_signal_gives_zero_z(backend):
    n = 12
    roles = torch.ones(n, dtype=torch.int64)
    roles[-1] = Role.REASONING
    s = torch.full((n,), 1.7040826989176754, dtype=torch.float64)
    out = role_aware_advantages(torch.ones(1, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), None, None,
                                roles, cu_seqlens=torch.tensor([0, n]), perception_signal=s,
                                reasoning_signal=torch.zeros(n, dtype=torch.float64), backend=backend)
    assert out.stats["perception/sigma"] == 0.0
    assert bool((out.signals == 0).all()), out.signals
