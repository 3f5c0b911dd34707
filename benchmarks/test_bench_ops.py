"""The pytest-benchmark view of `srpo-core bench`: the same case table (``srpo_core.bench.cases.build_cases``), one
benchmark per (op, mode, implementation, dtype), grouped by op so pytest-benchmark's table compares ours with the
anchors side by side. Each of our cases is also checked against the plain-torch twin in its group (``naive``, or the
``reference composition`` of ``role_aware_advantages``), built from the same seed: the forward's outputs, or the
gradients a ``fwd+bwd`` case leaves on its inputs.

    pytest benchmarks/test_bench_ops.py --benchmark-enable                      # quick sizes
    SRPO_BENCH_PRESET=full pytest benchmarks/test_bench_ops.py --benchmark-enable --benchmark-json out.json

(``--benchmark-disable``, the project default, runs each case once as a smoke test, and still checks it.)
"""

from __future__ import annotations

import os

import pytest
import torch

from srpo_core.bench.cases import build_cases

PRESET = os.environ.get("SRPO_BENCH_PRESET", "quick")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = build_cases(PRESET, DEVICE)
TWINS = ("naive", "reference composition")  # the plain-torch implementations ours is checked against
TOL = {"float32": {"rtol": 1e-4, "atol": 1e-4}, "bfloat16": {"rtol": 1.6e-2, "atol": 1e-2}}


def _twin(case):
    return next(c for c in CASES if c.impl in TWINS and (c.op, c.mode, c.shape, c.dtype)
                == (case.op, case.mode, case.shape, case.dtype))


def _results(fn) -> list[torch.Tensor]:
    """One call's results as flat float64 tensors: the gradients of the inputs a ``fwd+bwd`` closure differentiates
    (``fn.params``), else the tensors it returns."""
    out = fn()
    if hasattr(fn, "params"):
        assert all(p.grad is not None for p in fn.params), "a fwd+bwd case left an input without a gradient"
        out = [p.grad for p in fn.params]
    elif isinstance(out, torch.Tensor):
        out = [out]
    return [t.detach().double().reshape(-1) for t in out]


def _check_against_twin(case, fn):
    try:
        twin = _twin(case).setup()
    except StopIteration:
        pytest.fail(f"{case.op} {case.mode} {case.dtype}: no {' / '.join(TWINS)} case to check ours against")
    ours, ref = _results(fn), _results(twin)
    assert len(ours) == len(ref), (len(ours), len(ref))
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert bool(torch.isfinite(a).all()), f"result {i} of ours has non-finite values"
        torch.testing.assert_close(a, b, **TOL[case.dtype], msg=lambda m, i=i: f"result {i}: {m}")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.mode}-{c.impl}-{c.dtype}" for c in CASES])
def test_op(benchmark, case):
    try:
        fn = case.setup()
    except ImportError as e:
        pytest.skip(f"anchor not installed: {e.name or e}")
    benchmark.group = f"{case.op} {case.mode} {case.dtype} {case.shape}"
    if DEVICE == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()

        benchmark(call)
    else:
        benchmark(fn)
    if case.impl == "srpo-core":
        _check_against_twin(case, fn)
