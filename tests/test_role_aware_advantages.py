"""``role_aware_advantages``: bad input gets a ValueError/TypeError naming the argument, what it got and what was
expected; edge cases that are NOT errors (empty batch, zero-length trajectories, garbage outside the mask) work;
the op against an independent float64 implementation of SPEC.md written as plain Python loops over trajectories
and tokens (``math`` only, no torch, no package code), with the project's decisions where the SPEC is silent:
equal log-probs (both ``−inf`` included) contrast to 0 (D1), ``σ_r = 0`` gives ``z = 0`` (D5), renormalisation runs
over all valid tokens, OTHER included (D8); its outputs are constants (no graph)."""

from __future__ import annotations

import math

import pytest
import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from srpo_core_test_checks import call, packed, padded, raises  # tests/_checks.py
from srpo_core_test_loops import TOL, examples, loop_contrast  # tests/_loops.py

from srpo_core import Role, SRPOConfig, grpo_advantages, role_aware_advantages

NAN, INF = math.nan, math.inf


# -- shapes, devices, dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["logp_corrupt", "logp_ablated", "roles", "mask"])
def test_mismatched_shape(name):
    kw = padded()
    with raises(ValueError, f"`{name}`", "shape of `logp` (2, 4)", "shape (2, 3)"):
        call(kw, **{name: kw[name][:, :3]})


def test_mismatched_precomputed_signal_shape():
    with raises(ValueError, "`perception_signal`", "(2, 4)", "shape (2, 5)"):
        call(padded(), perception_signal=torch.zeros(2, 5))


@pytest.mark.parametrize("name", ["advantages", "logp_corrupt", "logp_ablated", "roles", "mask"])
def test_mismatched_device(name):
    """The "meta" device stands in for a second device (no GPU needed)."""
    kw = padded()
    with raises(ValueError, f"`{name}`", "on cpu like `logp`", "on meta"):
        call(kw, **{name: kw[name].to("meta")})


def test_mismatched_device_cu_seqlens():
    kw = packed()
    with raises(ValueError, "`cu_seqlens`", "on cpu like `logp`", "on meta"):
        call(kw, cu_seqlens=kw["cu_seqlens"].to("meta"))


@pytest.mark.parametrize("name", ["logp", "logp_corrupt", "logp_ablated", "advantages"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=["int64", "int32", "bool"])
def test_non_float_inputs(name, dtype):
    kw = padded()
    with raises(TypeError, f"`{name}`", "floating-point", str(dtype)):
        call(kw, **{name: kw[name].to(dtype)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=["float32", "bool"])
def test_roles_must_be_integer(dtype):
    kw = padded()
    with raises(TypeError, "`roles`", "integer tensor", str(dtype)):
        call(kw, roles=kw["roles"].to(dtype))


def test_mask_must_be_bool():
    kw = padded()
    with raises(TypeError, "`mask`", "bool tensor", "torch.int64"):
        call(kw, mask=kw["mask"].long())


def test_logp_rank():
    with raises(ValueError, "`logp`", "1-D or 2-D", "shape (2, 2, 2)"):
        call(padded(), logp=torch.zeros(2, 2, 2))


def test_not_a_tensor():
    with raises(TypeError, "`logp`", "torch.Tensor", "list"):
        call(padded(), logp=[[0.0] * 4] * 2)


def test_config_type():
    with raises(TypeError, "`config`", "SRPOConfig", "dict"):
        call(padded(), config={"beta_perception": 0.5})


# -- roles ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [3, -1, -100, 255], ids=lambda v: f"role{v}")
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_roles_outside_0_1_2_at_valid_positions(value, layout):
    kw = padded() if layout == "padded" else packed()
    roles = kw["roles"].clone()
    roles.view(-1)[3] = value
    with raises(ValueError, "`roles`", "0 (OTHER), 1 (PERCEPTION) or 2 (REASONING)", f"got [{value}]"):
        call(kw, roles=roles)


def test_garbage_roles_outside_mask_are_fine():
    kw = padded()
    mask = kw["mask"].clone()
    mask[:, 2:] = False
    roles = kw["roles"].clone()
    roles[:, 2:] = -100
    out = call(kw, mask=mask, roles=roles)
    assert bool((out.weights[:, 2:] == 0).all())


# -- mask / cu_seqlens -----------------------------------------------------------------------------------------------
def test_padded_needs_mask():
    kw = padded()
    del kw["mask"]
    with raises(ValueError, "2-D (padded)", "need `mask: bool [2, 4]`"):
        call(kw)


def test_padded_rejects_cu_seqlens():
    with raises(ValueError, "2-D (padded)", "not `cu_seqlens`", "shape (3,)"):
        call(padded(), cu_seqlens=torch.tensor([0, 4, 8]))


def test_packed_needs_cu_seqlens():
    kw = packed()
    del kw["cu_seqlens"]
    with raises(ValueError, "1-D (packed)", "need `cu_seqlens: int [B+1]`"):
        call(kw)


def test_packed_rejects_mask():
    with raises(ValueError, "1-D (packed)", "not `mask`", "shape (8,)"):
        call(packed(), mask=torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize(
    ("cu", "fragments"),
    [
        pytest.param([1, 4, 8], ("must start at 0", "cu_seqlens[0] = 1"), id="not-starting-at-0"),
        pytest.param([0, 5, 4, 8], ("non-decreasing", "cu_seqlens[2] = 4 < cu_seqlens[1] = 5"), id="decreasing"),
        pytest.param([0, 4, 7], ("must end at N = 8", "cu_seqlens[-1] = 7"), id="short"),
        pytest.param([0, 4, 9], ("must end at N = 8", "cu_seqlens[-1] = 9"), id="long"),
        pytest.param([], ("B+1 >= 1 entries", "empty"), id="empty"),
    ],
)
def test_bad_cu_seqlens(cu, fragments):
    kw = packed()
    advantages = torch.ones(max(len(cu) - 1, 0))
    with raises(ValueError, "`cu_seqlens`", *fragments):
        call(kw, cu_seqlens=torch.tensor(cu, dtype=torch.int64), advantages=advantages)


def test_cu_seqlens_must_be_integer():
    with raises(TypeError, "`cu_seqlens`", "integer tensor", "torch.float32"):
        call(packed(), cu_seqlens=torch.tensor([0.0, 4.0, 8.0]))


def test_cu_seqlens_int32_is_fine():
    out = call(packed(), cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    assert out.weights.shape == (8,)


# -- advantages ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("b", [1, 3])
def test_advantages_wrong_length(layout, b):
    kw = padded() if layout == "padded" else packed()
    with raises(ValueError, "`advantages`", "one entry per trajectory (B = 2)", f"shape ({b},)"):
        call(kw, advantages=torch.ones(b))


def test_advantages_must_be_1d():
    with raises(ValueError, "`advantages`", "1-D", "shape (2, 1)"):
        call(padded(), advantages=torch.ones(2, 1))


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_advantages(bad):
    with raises(ValueError, "`advantages`", "must be finite", "1 non-finite", "first at index 1"):
        call(padded(), advantages=torch.tensor([0.5, bad]))


# -- NaN at valid role positions -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("logp", Role.PERCEPTION),
        ("logp", Role.REASONING),
        ("logp_corrupt", Role.PERCEPTION),
        ("logp_ablated", Role.REASONING),
    ],
)
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "+inf"])
def test_nan_at_valid_role_position_padded(name, role, bad):
    kw = padded(b=3, t=5, role=role)
    x = kw[name].clone()
    x[1, 2] = bad
    x[2, 0] = bad
    x[0, 4] = NAN  # outside the mask below: not counted
    mask = kw["mask"].clone()
    mask[0, 4] = False
    with raises(ValueError, f"`{name}`", "2 NaN/+inf", f"valid {role.name.lower()} positions",
                "first at index (1, 2)"):
        call(kw, mask=mask, **{name: x})


@pytest.mark.parametrize("name", ["perception_signal", "reasoning_signal"])
def test_nan_in_precomputed_signal_packed(name):
    role = Role.PERCEPTION if name == "perception_signal" else Role.REASONING
    kw = packed(lengths=(3, 0, 5), role=role)
    s = torch.zeros(8)
    s[[4, 6, 7]] = NAN
    with raises(ValueError, f"`{name}`", "3 non-finite", "first at index (4,)"):
        call(kw, **{name: s})


def test_neg_inf_log_probs_are_fine():
    kw = padded(role=Role.PERCEPTION)
    logp = kw["logp"].clone()
    logp[0, 0] = -INF
    corrupt = kw["logp_corrupt"].clone()
    corrupt[0, 1] = -INF
    out = call(kw, logp=logp, logp_corrupt=corrupt)
    assert bool(torch.isfinite(out.weights).all())


def test_neg_inf_precomputed_signal_is_an_error():
    s = torch.tensor([-INF, 1.0, 2.0])
    with raises(ValueError, "`perception_signal`"):
        role_aware_advantages(torch.ones(1), torch.zeros(3), None, None, torch.ones(3, dtype=torch.int64),
                              cu_seqlens=torch.tensor([0, 3]), perception_signal=s)


# -- missing inputs, contrast kinds, backend --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("role", "name", "given"),
    [(Role.PERCEPTION, "logp_corrupt", "perception_signal"), (Role.REASONING, "logp_ablated", "reasoning_signal")],
)
def test_missing_counterpart_log_probs(role, name, given):
    with raises(ValueError, f"`{name}` is None", f"8 {role.name.lower()} token(s)", f"`{given}`"):
        call(padded(role=role), **{name: None})


def test_missing_counterpart_is_fine_without_that_role():
    out = call(padded(role=Role.REASONING), logp_corrupt=None)
    assert out.weights.shape == (2, 4)


@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("role", [Role.PERCEPTION, Role.REASONING])
def test_kl_js_without_precomputed_signal(kind, role):
    label = role.name.lower()
    config = SRPOConfig(**{f"{label}_contrast": kind})
    with raises(ValueError, f"config.{label}_contrast={kind!r}", "token_contrast", f"`{label}_signal`"):
        call(padded(role=role), config=config)


def test_kl_with_precomputed_signal_works():
    kw = padded()
    out = call(kw, config=SRPOConfig(perception_contrast="kl"), perception_signal=torch.rand(2, 4))
    assert bool(torch.isfinite(out.weights).all())


def test_backend_triton_without_cuda(monkeypatch):
    """Without CUDA (and without the interpreter) ``backend="triton"`` raises and says why."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((RuntimeError, NotImplementedError)) as info:
        call(padded(), backend="triton")
    message = str(info.value)
    assert "role_aware_advantages" in message and ("Triton" in message or "triton" in message), message
    assert "backend='torch'" in message or "CUDA" in message, message


def test_backend_unknown():
    with raises(ValueError, "`backend`", "('auto', 'triton', 'torch', 'reference')", "'cuda'"):
        call(padded(), backend="cuda")


# -- edge cases that must work ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 3])
def test_empty_batch_padded(t):
    kw = padded(b=0, t=t)
    out = call(kw)
    assert out.advantages.shape == (0, t) and out.weights.shape == (0, t) and out.signals.shape == (0, t)
    assert out.baseline.shape == (0,)
    assert out.stats["perception/count"] == 0 and out.stats["reasoning/count"] == 0


def test_empty_batch_packed():
    out = call(packed(lengths=()))
    assert out.advantages.shape == (0,) and out.baseline.shape == (0,)


def test_zero_length_trajectories():
    kw = packed(lengths=(0, 3, 0, 1, 0))
    kw["advantages"] = torch.tensor([5.0, -1.0, 7.0, 2.0, 3.0])
    kw["roles"] = torch.tensor([1, 2, 0, 1])
    out = call(kw)
    assert out.advantages.shape == (4,) and out.baseline.shape == (5,)
    assert bool(torch.isfinite(out.weights).all()) and bool((out.weights > 0).all())
    assert out.baseline[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    # A trajectory of one token has mean weight 1: its weight is 1.
    assert out.weights[3].item() == pytest.approx(1.0)


def test_all_zero_length_padded():
    kw = padded(b=3, t=4)
    kw["mask"] = torch.zeros(3, 4, dtype=torch.bool)
    kw["logp"] = torch.full((3, 4), NAN)  # nothing is read
    out = call(kw)
    assert bool((out.weights == 0).all()) and bool((out.advantages == 0).all())
    assert out.baseline.tolist() == [0.0, 0.0, 0.0]


# -- against the float64 loop reference ------------------------------------------------------------------------------
PERCEPTION, REASONING = 1, 2


def loop_srpo(case, cfg: SRPOConfig) -> dict:
    """SPEC steps 1-6, one trajectory and one token at a time."""
    B = case.B  # noqa: N806
    # Step 1: signals at role tokens.
    s = [[None] * n for n in case.lengths]
    for i in range(B):
        for t, role in enumerate(case.roles[i]):
            if role == PERCEPTION:
                if case.perception_signal is not None:
                    s[i][t] = case.perception_signal[i][t]
                else:
                    s[i][t] = loop_contrast(case.logp[i][t], case.logp_corrupt[i][t], cfg.perception_contrast,
                                            cfg.clamp, cfg.k3_max)
            elif role == REASONING:
                if case.reasoning_signal is not None:
                    s[i][t] = case.reasoning_signal[i][t]
                else:
                    s[i][t] = loop_contrast(case.logp[i][t], case.logp_ablated[i][t], cfg.reasoning_contrast,
                                            cfg.clamp, cfg.k3_max)
    # Step 2: role-wise standardisation over the batch (population std).
    stats = {}
    mu, sigma = {}, {}
    for role, label in ((PERCEPTION, "perception"), (REASONING, "reasoning")):
        vals = [s[i][t] for i in range(B) for t, r in enumerate(case.roles[i]) if r == role]
        n = len(vals)
        mu[role] = math.fsum(vals) / n if n else 0.0
        sigma[role] = math.sqrt(math.fsum((v - mu[role]) ** 2 for v in vals) / n) if n else 0.0
        stats[f"{label}/count"] = n
        stats[f"{label}/mu"] = mu[role]
        stats[f"{label}/sigma"] = sigma[role]
    z = [[0.0] * n for n in case.lengths]
    for i in range(B):
        for t, role in enumerate(case.roles[i]):
            if role in (PERCEPTION, REASONING):
                if cfg.standardize == "none":
                    z[i][t] = s[i][t]
                elif sigma[role] == 0:
                    z[i][t] = 0.0
                else:
                    z[i][t] = (s[i][t] - mu[role]) / (sigma[role] + cfg.eps)
    # Step 3: the shared baseline.
    baseline = []
    for i in range(B):
        zs = [z[i][t] for t, r in enumerate(case.roles[i]) if r in (PERCEPTION, REASONING)]
        baseline.append(math.fsum(zs) / len(zs) if zs else 0.0)
    # Step 4: positive weights.
    w = [[1.0] * n for n in case.lengths]
    for i in range(B):
        for t, role in enumerate(case.roles[i]):
            if role not in (PERCEPTION, REASONING):
                continue
            u = min(max(z[i][t] - baseline[i], -cfg.u_max), cfg.u_max)
            beta = cfg.beta_perception if role == PERCEPTION else cfg.beta_reasoning
            if cfg.weight_map == "exp":
                w[i][t] = math.exp(beta * u)
            elif cfg.weight_map == "linear":
                w[i][t] = max(1.0 + beta * u, cfg.w_min)
            else:
                w[i][t] = 2.0 / (1.0 + math.exp(-beta * u))
    # Step 5: renormalisation.
    if cfg.renorm == "mean":
        for i in range(B):
            if w[i]:
                total = math.fsum(w[i])
                w[i] = [x * len(w[i]) / total for x in w[i]]
    # Step 6: token advantages.
    adv = [[x * case.advantages[i] for x in w[i]] for i in range(B)]
    for role, label in ((PERCEPTION, "perception"), (REASONING, "reasoning")):
        ws = [w[i][t] for i in range(B) for t, r in enumerate(case.roles[i]) if r == role]
        stats[f"{label}/w_min"] = min(ws) if ws else math.nan
        stats[f"{label}/w_max"] = max(ws) if ws else math.nan
        stats[f"{label}/w_mean"] = math.fsum(ws) / len(ws) if ws else math.nan
    return {"advantages": adv, "weights": w, "signals": z, "baseline": baseline, "stats": stats}


def flat(rows):
    return torch.tensor([v for row in rows for v in row], dtype=torch.float64)


def close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= TOL * (1 + abs(b))


def all_configs() -> st.SearchStrategy[SRPOConfig]:
    return S.configs(eps=st.sampled_from((1e-6, 1e-3)))


@pytest.mark.parametrize("backend", ["auto", "reference"])  # the fast path and the reference, 100 examples each
@settings(max_examples=examples(100))
@given(case=S.cases(signals=None, max_b=7), config=all_configs(), packed=st.booleans(), data=st.data())
def test_role_aware_advantages_matches_loop(case, config, packed, data, backend):
    if case.perception_signal is not None:  # precomputed signals replace the contrast: any kind, kl/js included
        kinds = st.sampled_from(("k3", "logratio", "kl", "js"))
        config = SRPOConfig(**{**config.__dict__, "perception_contrast": data.draw(kinds),
                               "reasoning_contrast": data.draw(kinds)})
    kw = case.packed(torch.float64) if packed else case.padded(
        torch.float64, **data.draw(S.padded_layouts(case)), garbage=7)
    out = role_aware_advantages(**kw, config=config, backend=backend)
    want = loop_srpo(case, config)
    for name in ("advantages", "weights", "signals"):
        got = getattr(out, name)
        assert got.dtype == torch.float64
        got = got if packed else got[kw["mask"]]
        exp = flat(want[name])
        torch.testing.assert_close(got, exp, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"`{n}`: {m}")
    torch.testing.assert_close(out.baseline, torch.tensor(want["baseline"], dtype=torch.float64), atol=TOL,
                               rtol=TOL)
    for key, value in want["stats"].items():
        if key.endswith(("/mu", "/sigma")) and want["stats"][key.split("/")[0] + "/count"] == 0:
            continue  # no tokens of the role: nothing to log
        assert close(out.stats[key], value), f"stats[{key!r}] = {out.stats[key]!r}, loop gives {value!r}"


# -- outputs are constants -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_advantages_are_detached_constants(backend, layout):
    """Issue 22's reproducer: with ``logp.requires_grad`` (and every other float input too), no output has a
    grad_fn, and a PPO-style ``(advantages * ratio).sum()`` sends into ``logp`` exactly the gradient of the ratio
    alone (``A·ratio``), nothing through the advantages (it sent a gradient of norm 4.19 into logp)."""
    g = torch.Generator().manual_seed(22)
    B, T = 3, 7
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    roles = torch.randint(0, 3, (B, T), generator=g)
    base = -torch.rand(B, T, generator=g) * 4
    logp = base.clone().requires_grad_(True)
    inputs = [(base - torch.rand(B, T, generator=g)).requires_grad_(True) for _ in range(2)]
    adv = torch.randn(B, generator=g).requires_grad_(True)
    old = (base - 0.1 * torch.randn(B, T, generator=g)).detach()
    kw = {"mask": mask}
    lp_in, others, roles_in, old_in = logp, inputs, roles, old
    if layout == "packed":
        kw = {"cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])}
        lp_in, others, roles_in, old_in = logp[mask], [x[mask] for x in inputs], roles[mask], old[mask]
    out = role_aware_advantages(adv, lp_in, *others, roles_in, backend=backend,
                                config=SRPOConfig(beta_perception=0.5, beta_reasoning=0.5), **kw)
    for name in ("advantages", "weights", "signals", "baseline"):
        t = getattr(out, name)
        assert t.grad_fn is None and not t.requires_grad, f"{name} carries a graph"
    (out.advantages * torch.exp(lp_in - old_in)).sum().backward()
    want = base.clone().requires_grad_(True)  # the same loss with the advantages as constants
    (out.advantages.detach() * torch.exp((want if layout == "padded" else want[mask]) - old_in)).sum().backward()
    assert torch.equal(logp.grad, want.grad)
    assert adv.grad is None and all(x.grad is None for x in inputs)
    g_adv = grpo_advantages(torch.randn(6, generator=g).requires_grad_(True), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert g_adv.grad_fn is None and not g_adv.requires_grad
