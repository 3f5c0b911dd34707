"""Clamped signals (issue 14, "a single −inf log-prob dominates the batch's reasoning statistics"; decision D87): they
are counted per role in ``stats`` on every backend, and ``SRPOConfig(role_stats="unclamped")`` leaves them out of
step 2's statistics while still standardising (and clipping) them."""

from __future__ import annotations

import math

import pytest
import torch

from srpo_core import Role, SRPOConfig, role_aware_advantages

INF = math.inf
BACKENDS = ["auto", "reference", "triton"]
FP64_BACKENDS = ["auto", "reference"]  # backend="triton" refuses float64 (tests/test_role_aware_advantages.py)


def outlier_batch(dtype=torch.float32, device="cpu"):
    """Two responses of reasoning tokens; response 0's first token has ℓ = −inf (a ``null`` in a rollouts file):
    logratio(ℓ, ℓ°) = −c. The other signals are moderate: 0.5, 1.0, ... ."""
    logp = torch.tensor([[-INF, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]], dtype=dtype)
    logp_ablated = torch.tensor([[-2.0, -1.5, -2.0, -1.2], [-3.0, -1.1, -2.5, -1.0]], dtype=dtype)
    batch = {
        "advantages": torch.tensor([1.0, -1.0], dtype=dtype),
        "logp": logp,
        "logp_corrupt": torch.zeros_like(logp),
        "logp_ablated": logp_ablated,
        "roles": torch.full((2, 4), int(Role.REASONING)),
        "mask": torch.ones(2, 4, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role_stats", ["all", "unclamped"])
def test_clamped_signals_are_counted(backend, role_stats, device):
    out = role_aware_advantages(**outlier_batch(device=device), config=SRPOConfig(role_stats=role_stats),
                                backend=backend)
    assert out.stats["reasoning/clamped"] == 1 and out.stats["perception/clamped"] == 0
    assert out.stats["reasoning/count"] == 8
    assert out.signals[0, 0] != 0


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_unclamped_statistics_by_hand(backend):
    kw = outlier_batch(torch.float64)
    out = role_aware_advantages(**kw, config=SRPOConfig(role_stats="unclamped"), backend=backend)
    s = (kw["logp"] - kw["logp_ablated"]).reshape(-1)[1:].tolist()  # the seven unclamped signals
    mu = sum(s) / 7
    sigma = math.sqrt(sum((x - mu) ** 2 for x in s) / 7)
    assert out.stats["reasoning/mu"] == pytest.approx(mu, rel=1e-12)
    assert out.stats["reasoning/sigma"] == pytest.approx(sigma, rel=1e-12)
    # The clamped signal is standardised with them: z = (−20 − μ) / (σ + eps), far below u_max's reach.
    assert float(out.signals[0, 0]) == pytest.approx((-20.0 - mu) / (sigma + 1e-6), rel=1e-9)
    # SPEC's default takes it into the statistics: σ is then dominated by it.
    spec = role_aware_advantages(**kw, backend=backend)
    assert spec.stats["reasoning/sigma"] > 5 * out.stats["reasoning/sigma"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unclamped_stops_the_outlier_flattening_the_other_weights(backend, device):
    kw = outlier_batch(device=device)
    spec = role_aware_advantages(**kw, backend=backend)
    robust = role_aware_advantages(**kw, config=SRPOConfig(role_stats="unclamped"), backend=backend)
    # Response 1 has no clamped signal: its spread of weights is what the outlier compresses under "all".
    spread_spec = float(spec.weights[1].max() / spec.weights[1].min())
    spread_robust = float(robust.weights[1].max() / robust.weights[1].min())
    assert spread_robust > spread_spec > 1
    # Both keep SPEC's contract: finite weights > 0, sign of A_i, mean weight 1 per response.
    for out in (spec, robust):
        assert bool(torch.isfinite(out.weights).all()) and bool((out.weights > 0).all())
        assert torch.allclose(out.weights.mean(1).cpu(), torch.ones(2), rtol=1e-5)
        assert torch.equal(torch.sign(out.advantages).cpu(), torch.tensor([[1.0] * 4, [-1.0] * 4]))


@pytest.mark.parametrize("role_stats", ["all", "unclamped"])
def test_backends_agree(role_stats, device):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 9, generator=g) * 30
    logp[0, 2] = -INF
    logp[2, 5] = -INF
    kw = {
        "advantages": torch.randn(4, generator=g),
        "logp": logp,
        "logp_corrupt": -torch.rand(4, 9, generator=g) * 30,
        "logp_ablated": -torch.rand(4, 9, generator=g) * 30,
        "roles": torch.randint(0, 3, (4, 9), generator=g),
        "mask": torch.ones(4, 9, dtype=torch.bool),
    }
    kw["roles"][0, 2], kw["roles"][2, 5] = int(Role.PERCEPTION), int(Role.REASONING)
    kw = {k: v.to(device) for k, v in kw.items()}
    config = SRPOConfig(role_stats=role_stats, clamp=5.0, k3_max=3.0)
    ref = role_aware_advantages(**kw, config=config, backend="reference")
    for backend in ("auto", "triton"):
        out = role_aware_advantages(**kw, config=config, backend=backend)
        torch.testing.assert_close(out.weights, ref.weights, rtol=2e-5, atol=1e-6)
        for key in ("perception/clamped", "reasoning/clamped", "perception/count", "reasoning/count"):
            assert out.stats[key] == ref.stats[key] > 0, key


def test_precomputed_signals_are_never_clamped():
    kw = outlier_batch()
    kw["reasoning_signal"] = torch.full((2, 4), 20.0)
    kw["reasoning_signal"][1] = 1.0
    out = role_aware_advantages(**kw, config=SRPOConfig(role_stats="unclamped"))
    assert out.stats["reasoning/clamped"] == 0


@pytest.mark.parametrize("role_stats", ["all", "unclamped"])
def test_explain_notes_clamped_signals(role_stats):
    import io
    import json

    from rich.console import Console

    from srpo_core.render import analyse, print_analysis, to_html
    from srpo_core.rollouts import parse_lines, to_batch

    tokens = ["<think>", " a", " b", " c", "</think>"]
    lines = [json.dumps({"prompt_id": 0, "tokens": tokens, "reward": float(k), "logp": [-1.0, lp, -1.0, -1.0, -1.0],
                         "logp_corrupt": [-1.0] * 5, "logp_ablated": [-1.0, -2.0, -1.5, -0.5, -1.0]})
             for k, lp in enumerate([None, -1.2])]
    a = analyse(to_batch(parse_lines(lines)), SRPOConfig(role_stats=role_stats))
    assert a.result.stats["reasoning/clamped"] == 1
    buf = io.StringIO()
    print_analysis(a, Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    assert "1 reasoning signal(s) sit at their contrast's bound" in text
    assert ("leaves them out of μ/σ" if role_stats == "unclamped" else "role_stats=unclamped computes") in text
    assert "1 reasoning signal(s) sit at their contrast" in to_html(a)
    # No clamped signal, no note.
    clean = [line.replace("null", "-1.1") for line in lines]
    buf = io.StringIO()
    print_analysis(analyse(to_batch(parse_lines(clean)), SRPOConfig()), Console(file=buf, width=200))
    assert "contrast's bound" not in buf.getvalue()


def test_trainer_metrics_carry_the_clamped_counts():
    """The TRL adapter logs every key of ``stats`` under ``srpo/…`` (srpo_core/adapters/trl.py, the loop over
    ``res.stats``): the counts are in ``stats`` as ints, so they reach the metrics as ``srpo/reasoning/clamped``."""
    import inspect

    from srpo_core.adapters import trl as trl_adapter

    out = role_aware_advantages(**outlier_batch())
    assert isinstance(out.stats["reasoning/clamped"], int)
    src = inspect.getsource(trl_adapter)
    assert 'for key, value in res.stats.items():' in src and 'metrics[f"srpo/{key}"]' in src


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_clamped_counts_in_float64(backend):
    """Found by the fuzz suite: float64 on backend='triton' (then the reference) reported 0 clamped signals."""
    out = role_aware_advantages(**outlier_batch(torch.float64), backend=backend)
    assert out.stats["reasoning/clamped"] == 1
