"""Fuzz: ``contrast``. Bad or extreme log-probs and options either raise the library's own error naming the argument or
give the float64 reference's values within STYLE's tolerance."""

from __future__ import annotations

import math

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st
from srpo_core_test_fuzz import noncontiguous  # tests/_fuzz.py

from srpo_core.advantages import contrast
from srpo_core.reference import contrast as contrast_ref

NAN, INF = math.nan, math.inf


LOGP = st.one_of(st.floats(-50, 5, width=32), st.sampled_from((-INF, 0.0, -1e30, -3e38, 1e-30)))


BAD_NUMBERS = (NAN, INF, -1.0, 0.0, 1e300, "1", True, None)


@st.composite
def contrast_calls(draw):
    n = draw(st.integers(0, 6))
    dtype = draw(S.float_dtypes())
    a = S.to_dtype(torch.tensor(draw(st.lists(LOGP, min_size=n, max_size=n)), dtype=torch.float64), dtype)
    b = S.to_dtype(torch.tensor(draw(st.lists(LOGP, min_size=n, max_size=n)), dtype=torch.float64), dtype)
    kwargs = {"kind": draw(st.sampled_from(("k3", "logratio", "k3", "logratio", "kl", "bogus"))),
              "clamp": draw(st.sampled_from((20.0, 0.5, 1e-6, 1e15))),
              "k3_max": draw(st.sampled_from((10.0, 1e-6, 1e15)))}
    kind = draw(st.sampled_from(("none", "none", "number", "nan", "shape", "dtype", "meta", "noncontig", "2d")))
    if kind == "number":
        kwargs[draw(st.sampled_from(("clamp", "k3_max")))] = draw(st.sampled_from(BAD_NUMBERS))
    elif kind == "nan" and n:
        a = a.clone()
        a[draw(st.integers(0, n - 1))] = draw(st.sampled_from((NAN, INF)))
    elif kind == "shape":
        b = b[:-1] if n else torch.zeros(1, dtype=dtype)
    elif kind == "dtype":
        b = b.long()
    elif kind == "meta":
        a = a.to("meta")
    elif kind == "noncontig":
        a, b = noncontiguous(a), noncontiguous(b)
    elif kind == "2d":
        a, b = a[None].expand(2, n), b[None].expand(2, n)
    return a, b, kwargs


@S.fuzz_settings()
@given(call=contrast_calls())
def test_fuzz_contrast(call):
    a, b, kwargs = call
    out = S.outcome("contrast", lambda: contrast(a, b, **kwargs))
    if out is None:
        return
    assert out.shape == a.shape and bool(torch.isfinite(out).all()), out
    ref64 = contrast_ref.contrast(a.double(), b.double(), kwargs["kind"], kwargs["clamp"], kwargs["k3_max"])
    # Rounding of the difference in the compute dtype, times the contrast's slope (1 for logratio, e^δ for k3).
    eps = torch.finfo(out.dtype).eps
    slope = 1.0 if kwargs["kind"] == "logratio" else ref64.abs() + 1.0 + kwargs["clamp"]
    tol = 4 * eps * ((a.double().abs() + b.double().abs()).clamp(max=1e38).nan_to_num(posinf=0.0) + ref64.abs()) \
        * slope + 1e-12
    err = (out.double() - ref64).abs()
    ok = (err <= tol) | (out.double() == ref64)
    assert bool(ok.all()), (a, b, kwargs, out, ref64)
    assert out.dtype == (a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32)
