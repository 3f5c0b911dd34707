"""Fuzz: ``grpo_advantages``. Bad or extreme rewards, group ids and options either raise the library's own error naming
the argument or give finite advantages matching the float64 reference."""

from __future__ import annotations

import math

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st
from srpo_core_test_fuzz import noncontiguous  # tests/_fuzz.py

from srpo_core import grpo_advantages

NAN, INF = math.nan, math.inf


REWARDS = st.one_of(st.floats(-10, 10, width=32), st.sampled_from((0.0, 1.0, 1e30, -3e38, 3e38, 1e-30)))


@st.composite
def grpo_calls(draw):
    n = draw(st.integers(0, 8))
    dtype = draw(S.float_dtypes())
    r = S.to_dtype(torch.tensor(draw(st.lists(REWARDS, min_size=n, max_size=n)), dtype=torch.float64), dtype)
    g = torch.tensor(draw(st.lists(st.sampled_from((0, 1, 2, -5, 2**40)), min_size=n, max_size=n)), dtype=torch.int64)
    kwargs = {"norm": draw(st.sampled_from(("std", "none"))), "eps": draw(st.sampled_from((1e-6, 1e-4, 1.0))),
              "scale": draw(st.sampled_from(("group", "batch"))),
              "nan_rewards": draw(st.sampled_from(("raise", "zero")))}
    kind = draw(st.sampled_from(("none", "none", "nan", "inf", "option", "shape", "dtype", "meta", "noncontig")))
    if kind in ("nan", "inf") and n:
        r = r.clone()
        r[draw(st.integers(0, n - 1))] = NAN if kind == "nan" else -INF
    elif kind == "option":
        name = draw(st.sampled_from(sorted(kwargs)))
        kwargs[name] = draw(st.sampled_from(("bogus", NAN, 0.0, -1.0, None)))
    elif kind == "shape":
        g = g[:-1] if n else g[None]
    elif kind == "dtype":
        g = g.float()
    elif kind == "meta":
        r = r.to("meta")
    elif kind == "noncontig":
        r, g = noncontiguous(r), noncontiguous(g)
    return r, g, kwargs


@S.fuzz_settings()
@given(call=grpo_calls())
def test_fuzz_grpo_advantages(call):
    r, g, kwargs = call
    out = S.outcome("grpo_advantages", lambda: grpo_advantages(r, g, **kwargs))
    if out is None:
        return
    assert bool(torch.isfinite(out).all()), (r, g, kwargs, out)
    ref64 = grpo_advantages(r.double(), g, **kwargs)
    assert torch.equal(out, ref64.to(out.dtype)), (out, ref64)  # statistics in float64 either way
    if kwargs["nan_rewards"] == "zero":
        assert bool((out[torch.isnan(r)] == 0).all())
