"""Fuzz: ``role_aware_advantages``. Each case mixes one class of bad or extreme input (wrong shapes / dtypes, bad roles
/ cu_seqlens, NaN where read, non-contiguous and meta tensors, extreme but valid values and configs, garbage at masked
positions) into a valid call, and must either raise the library's own error (a TypeError / ValueError naming the op and
an argument) or return a result that is finite where the SPEC promises it and within STYLE's tolerance of the float64
reference."""

from __future__ import annotations

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from srpo_core_test_fuzz import _as64, raa_calls  # tests/_fuzz.py

from srpo_core import role_aware_advantages


@S.fuzz_settings()
@given(call=raa_calls())
def test_fuzz_role_aware_advantages(call):
    kind, kw, config, backend = call
    op = "role_aware_advantages"
    out = S.outcome(op, lambda: role_aware_advantages(**kw, config=config, backend=backend))
    if out is None:
        return
    valid = S.valid_mask(kw)
    w = out.weights
    # SPEC property 1 and 2, and nothing outside the mask.
    assert bool(torch.isfinite(w[valid]).all()) and bool((w[valid] > 0).all()), (kind, config, w)
    assert not bool(torch.isnan(out.advantages).any())
    assert bool((w[~valid] == 0).all()) and bool((out.advantages[~valid] == 0).all())
    seg = S.segment_of(kw)
    a_i = kw["advantages"].double()[seg.clamp(min=0)]
    assert torch.equal(torch.sign(out.advantages[valid].double()), torch.sign(a_i[valid]))
    # Against the float64 reference, with the same-dtype reference as the measure of rounding.
    same = role_aware_advantages(**kw, config=config, backend="reference")
    ref64 = role_aware_advantages(**_as64(kw), config=config, backend="reference")
    S.within_torch_error(w, same.weights, ref64.weights, atol=1e-6, what=f"{op} weights ({kind}, {config})")
    big = torch.finfo(out.advantages.dtype).max
    S.within_torch_error(torch.nan_to_num(out.advantages.double(), posinf=big, neginf=-big),
                         torch.nan_to_num(same.advantages.double(), posinf=big, neginf=-big),
                         ref64.advantages.clamp(-big, big), atol=1e-6, what=f"{op} advantages ({kind})")
    for key in ("perception/count", "reasoning/count", "perception/clamped", "reasoning/clamped"):
        assert out.stats[key] == ref64.stats[key], key
