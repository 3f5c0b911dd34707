"""Fuzz: the presets ``vppo_advantages`` and ``papo_perception_kl``: bad or extreme inputs either raise the library's
own error naming the argument or give the float64 reference's values within STYLE's tolerance."""

from __future__ import annotations

import math

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st
from srpo_core_test_fuzz import _as64, raa_calls  # tests/_fuzz.py

from srpo_core.presets import papo_perception_kl, vppo_advantages

NAN, INF = math.nan, math.inf


@st.composite
def preset_calls(draw):
    kind, kw, _, _ = draw(raa_calls())
    for k in ("logp_ablated", "perception_signal", "reasoning_signal", "roles"):
        kw.pop(k, None)
    if kw.get("logp_corrupt") is None:
        kw["logp_corrupt"] = kw["logp"]
    opts = {"clamp": draw(st.sampled_from((20.0, 1e-6, 1e15, NAN, -1.0))),
            "k3_max": draw(st.sampled_from((10.0, 1e-6, 1e15, INF)))}
    return kind, kw, opts


@S.fuzz_settings()
@given(call=preset_calls())
def test_fuzz_vppo_advantages(call):
    kind, kw, opts = call
    out = S.outcome("vppo_advantages", lambda: vppo_advantages(**kw, **opts))
    if out is None:
        return
    valid = S.valid_mask(kw)
    assert bool(torch.isfinite(out.dependency[valid]).all()) and bool(torch.isfinite(out.alpha).all())
    assert not bool(torch.isnan(out.advantages).any())
    ref64 = vppo_advantages(**_as64(kw), **opts)
    assert bool((out.loss_mask[~valid] == 0).all())
    S.within_torch_error(out.alpha, out.alpha, ref64.alpha, atol=1e-5, what="vppo alpha")


@S.fuzz_settings()
@given(call=preset_calls())
def test_fuzz_papo_perception_kl(call):
    kind, kw, opts = call
    kw.pop("advantages", None)
    out = S.outcome("papo_perception_kl", lambda: papo_perception_kl(**kw, **opts))
    if out is None:
        return
    valid = S.valid_mask(kw)
    assert bool(torch.isfinite(out[valid]).all()) and bool((out[~valid] == 0).all())
    ref64 = papo_perception_kl(**_as64(kw), **opts)
    eps = torch.finfo(torch.float32).eps
    assert bool(((out.double() - ref64).abs() <= 8 * eps * (ref64.abs() + 1) * (ref64.abs() + 1)).all()), \
        (out, ref64)
