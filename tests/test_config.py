"""``SRPOConfig``: the SPEC's defaults, bad values refused at construction with the field, the bound and the value, and
extreme values refused where float32 could not keep the weights finite (every accepted extreme config keeps them
finite and positive)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from srpo_core_test_checks import raises  # tests/_checks.py

from srpo_core import SRPOConfig, role_aware_advantages

NAN, INF = math.nan, math.inf


# -- bad values ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("perception_contrast", "kl_div", "one of ('logratio', 'k3', 'kl', 'js')"),
        ("reasoning_contrast", None, "one of ('logratio', 'k3', 'kl', 'js')"),
        ("standardize", "group", "one of ('batch', 'none')"),
        ("weight_map", "tanh", "one of ('exp', 'linear', 'sigmoid')"),
        ("renorm", "sum", "one of ('mean', 'none')"),
        ("clamp", 0.0, "> 0"),
        ("clamp", NAN, "finite number"),
        ("k3_max", -1.0, "> 0"),
        ("eps", 0.0, "> 0"),
        ("u_max", 0.0, "> 0"),
        ("u_max", INF, "finite number"),
        ("beta_perception", -0.1, ">= 0"),
        ("beta_reasoning", INF, "finite number"),
        ("w_min", 0.0, "> 0"),
        ("w_min", "0.1", "finite number"),
        ("w_min", 1.5, "(0, 1]"),
        ("beta_perception", True, "finite number"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) or len(v) < 12 else v[:12],
)
def test_config_bad_values(field, value, fragment):
    with raises(ValueError, "SRPOConfig", f"`{field}`", fragment, f"got {value!r}"):
        SRPOConfig(**{field: value})


def test_config_defaults_match_spec():
    c = SRPOConfig()
    assert (c.perception_contrast, c.reasoning_contrast, c.clamp, c.k3_max) == ("k3", "logratio", 20.0, 10.0)
    assert (c.standardize, c.eps, c.u_max, c.beta_perception, c.beta_reasoning) == ("batch", 1e-6, 3.0, 0.5, 0.5)
    assert (c.weight_map, c.w_min, c.renorm) == ("exp", 0.1, "mean")
    with pytest.raises(AttributeError):
        c.u_max = 1.0  # frozen


# -- extreme configs: refused at construction, or finite weights > 0 (found by the fuzz) -----------------------------
@pytest.mark.parametrize("kwargs", [
    {"eps": 1e-300}, {"u_max": 1e30}, {"beta_perception": 1e300}, {"beta_reasoning": 1e7},
    {"beta_perception": 10.0, "u_max": 3.0}, {"w_min": 1e-300}, {"clamp": 1e16}, {"k3_max": 1e300},
])
def test_config_refuses_what_float32_cannot_keep_finite(kwargs):
    with raises(ValueError, "SRPOConfig", f"`{next(iter(kwargs))}`"):
        SRPOConfig(**kwargs)


EDGE_CONFIGS = [
    SRPOConfig(eps=1e-30, u_max=20.0, beta_perception=1.0, beta_reasoning=1.0, standardize=standardize,
               weight_map=weight_map, renorm=renorm, w_min=1e-6)
    for standardize, weight_map, renorm in itertools.product(("none", "batch"), ("exp", "linear", "sigmoid"),
                                                             ("mean", "none"))
] + [SRPOConfig(u_max=1e6, beta_perception=2e-5, beta_reasoning=0.0, clamp=1e15, k3_max=1e15, standardize="none"),
     SRPOConfig(u_max=1e-6, beta_perception=1e6, beta_reasoning=1e6)]


@pytest.mark.parametrize("config", EDGE_CONFIGS)
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("t", [0, 1, 5])
def test_extreme_accepted_configs_keep_weights_finite_and_positive(config, backend, t):
    g = torch.Generator().manual_seed(t)
    b = 3
    logp = -torch.rand(b, t, generator=g) * 30
    logp[:, :1] = -INF  # driven to the clamp
    kw = {
        "advantages": torch.tensor([1.0, -2.0, 0.5]),
        "logp": logp,
        "logp_corrupt": -torch.rand(b, t, generator=g) * 30,
        "logp_ablated": -torch.rand(b, t, generator=g) * 30,
        "roles": torch.randint(0, 3, (b, t), generator=g),
        "mask": torch.ones(b, t, dtype=torch.bool),
    }
    out = role_aware_advantages(**kw, config=config, backend=backend)
    assert bool(torch.isfinite(out.weights).all()) and bool((out.weights > 0).all())
    assert bool(torch.isfinite(out.advantages).all())
    assert torch.equal(torch.sign(out.advantages), torch.sign(kw["advantages"])[:, None].expand(b, t))
