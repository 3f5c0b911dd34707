"""``contrast`` (SPEC step 1 on per-token log-probs): its errors, and its values against the plain-Python float64 loop
(``tests/_loops.py``), ``−inf`` included."""

from __future__ import annotations

import math

import pytest
import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from srpo_core_test_checks import raises  # tests/_checks.py
from srpo_core_test_loops import TOL, examples, loop_contrast  # tests/_loops.py

from srpo_core.advantages import contrast

NAN, INF = math.nan, math.inf


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_contrast_kl_js_need_logits(kind):
    with raises(ValueError, f"`kind`={kind!r}", "full logit rows", "token_contrast"):
        contrast(torch.zeros(3), torch.zeros(3), kind)


def test_contrast_unknown_kind():
    with raises(ValueError, "`kind`", "'logratio' or 'k3'", "'bogus'"):
        contrast(torch.zeros(3), torch.zeros(3), "bogus")


def test_contrast_nan():
    x = torch.zeros(2, 3)
    x[1, 2] = NAN
    with raises(ValueError, "`logp_other`", "1 NaN/+inf", "first at index (1, 2)"):
        contrast(torch.zeros(2, 3), x, "k3")


def test_contrast_shape_and_dtype():
    with raises(ValueError, "`logp_other`", "shape of `logp` (3,)", "shape (2,)"):
        contrast(torch.zeros(3), torch.zeros(2), "k3")
    with raises(TypeError, "`logp`", "floating-point", "torch.int64"):
        contrast(torch.zeros(3, dtype=torch.int64), torch.zeros(3), "k3")


# -- clamp / k3_max are validated (found by the fuzz) ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["clamp", "k3_max"])
@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan, INF, 1e300, "3", True, None])
def test_contrast_validates_clamp_and_k3_max(name, value):
    a, b = torch.zeros(3), torch.tensor([-1.0, -INF, 0.0])
    with raises(ValueError, "contrast", f"`{name}`"):
        contrast(a, b, "k3", **{name: value})


def test_contrast_accepts_its_bounds():
    out = contrast(torch.zeros(2), torch.tensor([-INF, -1.0]), "logratio", clamp=1e15)
    assert out.tolist() == [torch.tensor(1e15).item(), 1.0]  # 1e15 rounded to float32


# -- against the float64 loop reference ------------------------------------------------------------------------------
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
