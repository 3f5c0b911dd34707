"""Fuzz: ``SRPOConfig`` (every accepted config keeps SPEC property 1: finite weights > 0) and ``Role``."""

from __future__ import annotations

import math

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st

from srpo_core import Role, SRPOConfig, role_aware_advantages

NAN, INF = math.nan, math.inf


FIELD_VALUES = {
    "clamp": (20.0, 1e15, 1e16, 0.0, -1.0, NAN, INF, "20", True, 1e-300),
    "k3_max": (10.0, 1e15, 1e300, 0.0, NAN, 1e-6),
    "eps": (1e-6, 1e-30, 1e-31, 1e-300, 0.0, INF, 1e10),
    "u_max": (3.0, 1e6, 1e7, 1e-300, 0.0, NAN),
    "beta_perception": (0.5, 0.0, 6.0, 20.0, 1e6, 1e300, -0.1, NAN),
    "beta_reasoning": (0.5, 0.0, 6.0, 1e-300, -1.0),
    "w_min": (0.1, 1e-6, 1e-7, 1.0, 1.5, 0.0),
    "standardize": ("batch", "none", "zscore", None),
    "weight_map": ("exp", "linear", "sigmoid", "softmax"),
    "renorm": ("mean", "none", "sum"),
    "role_stats": ("all", "unclamped", "robust"),
    "perception_contrast": ("k3", "logratio", "l1"),
}


PROBE = {
    "advantages": torch.tensor([1.0, -1e30, 0.5]),
    "logp": torch.tensor([[-INF, -1.0, -50.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [0.0, -3e38, -1.0, -2.0]]),
    "logp_corrupt": torch.tensor([[-1.0, -INF, -2.0, 0.0], [-1.0, -5.0, -1.0, -1.0], [-INF, -3e38, -1.0, -1.0]]),
    "logp_ablated": torch.tensor([[-2.0, -1.0, -INF, 0.0], [-1.0, -1.0, -9.0, -1.0], [0.0, 0.0, -1.0, -3.0]]),
    "roles": torch.tensor([[1, 2, 2, 0], [1, 1, 2, 2], [2, 1, 1, 2]]),
    "mask": torch.tensor([[True, True, True, True], [True, True, True, False], [True, False, True, True]]),
}


@S.fuzz_settings()
@given(fields=st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in FIELD_VALUES.items()}),
       backend=st.sampled_from(("auto", "reference")))
def test_fuzz_srpo_config(fields, backend):
    config = S.outcome("SRPOConfig", lambda: SRPOConfig(**fields))
    if config is None:
        return
    out = role_aware_advantages(**PROBE, config=config, backend=backend)
    w = out.weights[PROBE["mask"]]
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all()), (config, out.weights)
    assert not bool(torch.isnan(out.advantages).any())


@S.fuzz_settings(0.2)
@given(value=st.one_of(st.integers(-2**70, 2**70), st.sampled_from((0, 1, 2, "1", None, 1.0, True))))
def test_fuzz_role(value):
    role = S.outcome("Role", lambda: Role(value))
    if role is not None:
        assert int(role) in (0, 1, 2) and int(role) == value
