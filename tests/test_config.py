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


# Where docs/spec.md states each SRPOConfig default (its own wording, SPEC steps 1-5).
SPEC_DEFAULTS = {
    "perception_contrast": r'`perception_contrast = "(\w+)"`',
    "reasoning_contrast": r'`reasoning_contrast = "(\w+)"`',
    "clamp": r"`c = ([0-9.e+-]+)`",
    "k3_max": r"`k3_max = ([0-9.e+-]+)`",
    "standardize": r'`standardize = "(\w+)" \|',  # the first choice listed is the step as described
    "eps": r"`eps = ([0-9.e+-]+)`",
    "u_max": r"`u_max = ([0-9.e+-]+)`",
    "beta_perception": r"`beta_perception = beta_reasoning = ([0-9.e+-]+)`",
    "beta_reasoning": r"`beta_perception = beta_reasoning = ([0-9.e+-]+)`",
    "weight_map": r"\| `(\w+)` \(default\) \|",
    "w_min": r"`w_min = ([0-9.e+-]+)`",
    "renorm": r'`renorm = "(\w+)"` \(default\)',
}


def _spec_text() -> str:
    import pathlib

    return (pathlib.Path(__file__).resolve().parents[1] / "docs" / "spec.md").read_text()


def test_config_defaults_match_spec():
    """Every SRPOConfig default is the one docs/spec.md states; a field the spec does not know fails here."""
    import dataclasses
    import re

    spec, c = _spec_text(), SRPOConfig()
    for name, pattern in SPEC_DEFAULTS.items():
        found = re.findall(pattern, spec)
        assert len(set(found)) == 1, f"docs/spec.md states `{name}`'s default {len(set(found))} ways: {found}"
        default = getattr(c, name)
        stated = type(default)(found[0])
        assert default == stated, f"SRPOConfig.{name} defaults to {default!r}, docs/spec.md says {stated!r}"
    # role_stats is an option the spec does not have: its default must be the spec's step 2 (statistics over all of
    # a role's tokens).
    assert c.role_stats == "all"
    assert {f.name for f in dataclasses.fields(SRPOConfig)} == set(SPEC_DEFAULTS) | {"role_stats"}
    with pytest.raises(AttributeError):
        c.u_max = 1.0  # frozen


def test_op_signature_defaults_match_spec():
    """The defaults the spec writes in a public function's signature (``token_logprobs(…, temperature=1.0, …)``) are
    the function's own."""
    import ast
    import inspect
    import re

    import srpo_core

    checked = set()
    for fn_name, args in re.findall(r"`(\w+)\(([^`]*)\)`", _spec_text()):
        if fn_name not in srpo_core.__all__:
            continue
        params = inspect.signature(getattr(srpo_core, fn_name)).parameters
        for arg, value in re.findall(r'(\w+)=("[^"]*"|[^,\s|)]+)', args):
            assert arg in params, f"docs/spec.md gives {fn_name} an argument `{arg}` it does not have"
            assert params[arg].default == ast.literal_eval(value), (fn_name, arg, params[arg].default, value)
            checked.add((fn_name, arg))
    assert {f for f, _ in checked} >= {"grpo_advantages", "token_logprobs", "token_contrast"}, checked


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
@pytest.mark.parametrize("backend", ["auto", "reference"])
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
