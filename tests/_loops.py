"""The plain-Python float64 loops several files check against (registered by conftest.py as
``srpo_core_test_loops``): SPEC step 1's contrast, the tolerance and the example counts of the loop tests."""

from __future__ import annotations

import math

from hypothesis import settings

TOL = 1e-6


def examples(n: int) -> int:
    """``n`` examples under the "ci" profile (60 by default); other profiles scale them (thorough: ~8x). Read when a
    test module is collected: conftest.py loads the profile after it imports this module."""
    return max(10, round(n * settings.default.max_examples / 60))


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
