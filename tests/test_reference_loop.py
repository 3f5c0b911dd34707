"""``role_aware_advantages``, ``grpo_advantages`` and ``contrast`` against an independent float64 implementation of
SPEC.md written here as plain Python loops over trajectories and tokens (``math`` only, no torch, no package code).

The loop reference reads the SPEC literally, with the project's decisions where the SPEC is silent: equal log-probs
(both ``−inf`` included) contrast to 0 (D1); ``σ_r = 0`` gives ``z = 0`` (D5); renormalisation runs over all valid
tokens, OTHER included (D8); a group of one gets ``A_i = 0`` under both norms (D12).
"""

from __future__ import annotations

import math

import pytest
import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_core import SRPOConfig, contrast, grpo_advantages, role_aware_advantages

TOL = 1e-6
# Examples under the "ci" profile (60 by default); other profiles scale them (thorough: ~8x).
_SCALE = settings.default.max_examples / 60


def examples(n: int) -> int:
    return max(10, round(n * _SCALE))


PERCEPTION, REASONING = 1, 2

# -- the loop reference -------------------------------------------------------------------------------------------
def loop_contrast(l: float, l_other: float, kind: str, c: float, k3_max: float) -> float:
    """SPEC step 1 for one token."""
    if kind == "logratio":
        d = 0.0 if l == l_other else l - l_other
        return min(max(d, -c), c)
    if kind == "k3":
        delta = 0.0 if l == l_other else l_other - l
        delta = min(max(delta, -c), c)
        return min(math.exp(delta) - delta - 1.0, k3_max)
    raise AssertionError(kind)


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


# -- role_aware_advantages ----------------------------------------------------------------------------------------
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


# -- grpo_advantages -----------------------------------------------------------------------------------------------
def loop_grpo(rewards: list[float], groups: list[int], norm: str, eps: float) -> list[float]:
    out = []
    for i, g in enumerate(groups):
        members = [rewards[j] for j, h in enumerate(groups) if h == g]
        n = len(members)
        if n == 1:
            out.append(0.0)
            continue
        mean = math.fsum(members) / n
        if norm == "none":
            out.append(rewards[i] - mean)
        else:
            std = math.sqrt(math.fsum((r - mean) ** 2 for r in members) / (n - 1))
            out.append((rewards[i] - mean) / (std + eps))
    return out


@st.composite
def reward_batches(draw):
    b = draw(st.integers(0, 24))
    groups = draw(st.lists(st.integers(-3, 5), min_size=b, max_size=b))
    rewards = draw(st.lists(st.one_of(st.sampled_from((0.0, 1.0, 0.5)), st.floats(-10, 10)), min_size=b,
                            max_size=b))
    return rewards, groups


@settings(max_examples=examples(150))
@given(batch=reward_batches(), norm=st.sampled_from(("std", "none")), eps=st.sampled_from((1e-6, 1e-4, 1.0)),
       group_dtype=st.sampled_from((torch.int64, torch.int32)))
def test_grpo_advantages_matches_loop(batch, norm, eps, group_dtype):
    rewards, groups = batch
    got = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups, dtype=group_dtype),
                          norm=norm, eps=eps)
    assert got.dtype == torch.float64 and got.shape == (len(rewards),)
    want = torch.tensor(loop_grpo(rewards, groups, norm, eps), dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_grpo_group_of_one_is_zero():
    got = grpo_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert got[0].item() == 0.0
    assert got.dtype == torch.float32


@pytest.mark.parametrize(
    ("value", "n", "dtype"),
    [
        pytest.param(1.0, 8, torch.float32, id="binary-fp32"),
        pytest.param(0.0, 3, torch.float64, id="zero-fp64"),
        pytest.param(24.9, 15, torch.float32, id="24.9x15-fp32"),
        pytest.param(0.1, 7, torch.float64, id="0.1x7-fp64"),
    ],
)
def test_grpo_identical_rewards_give_zero(value, n, dtype):
    """A group whose rewards are all equal carries no preference: ``A_i = 0`` exactly (std_g = 0, like D5)."""
    got = grpo_advantages(torch.full((n,), value, dtype=dtype), torch.zeros(n, dtype=torch.int64))
    assert bool((got == 0).all()), got


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


# -- contrast ------------------------------------------------------------------------------------------------------
@settings(max_examples=examples(150))
@given(pairs=st.lists(st.tuples(S.logp_values(extreme=True), S.logp_values(extreme=True)), max_size=40),
       kind=st.sampled_from(("logratio", "k3")), clamp=st.sampled_from((20.0, 3.0, 0.25)),
       k3_max=st.sampled_from((10.0, 1.0)), dtype=st.sampled_from((torch.float64, torch.float32)))
def test_contrast_matches_loop(pairs, kind, clamp, k3_max, dtype):
    l = torch.tensor([p[0] for p in pairs], dtype=torch.float64).to(dtype)
    lo = torch.tensor([p[1] for p in pairs], dtype=torch.float64).to(dtype)
    got = contrast(l, lo, kind, clamp=clamp, k3_max=k3_max)
    assert got.dtype == dtype
    # The loop reads the values the tensor actually holds (fp32-rounded for fp32).
    pairs64 = zip(l.tolist(), lo.tolist(), strict=True)
    want = torch.tensor([loop_contrast(a, b, kind, clamp, k3_max) for a, b in pairs64], dtype=torch.float64)
    tol = TOL if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.to(torch.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("l", "lo", "kind", "want"),
    [
        pytest.param(-math.inf, -math.inf, "logratio", 0.0, id="logratio-both-neg-inf"),
        pytest.param(-math.inf, -1.0, "logratio", -20.0, id="logratio-l-neg-inf"),
        pytest.param(-1.0, -math.inf, "logratio", 20.0, id="logratio-other-neg-inf"),
        pytest.param(-math.inf, -math.inf, "k3", 0.0, id="k3-both-neg-inf"),
        pytest.param(-math.inf, -1.0, "k3", 10.0, id="k3-l-neg-inf"),
        pytest.param(-1.0, -math.inf, "k3", 10.0, id="k3-other-neg-inf"),  # e^-20 + 19 capped at k3_max
        pytest.param(-2.0, -2.5, "k3", math.exp(-0.5) + 0.5 - 1.0, id="k3-moderate"),
    ],
)
def test_contrast_neg_inf_cases(l, lo, kind, want):
    got = contrast(torch.tensor([l], dtype=torch.float64), torch.tensor([lo], dtype=torch.float64), kind)
    assert got.item() == pytest.approx(want, abs=1e-12)
    assert loop_contrast(l, lo, kind, 20.0, 10.0) == pytest.approx(want, abs=1e-12)
