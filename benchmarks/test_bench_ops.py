"""The pytest-benchmark view of `srpo-core bench`: the same case table (``srpo_core.bench.cases.build_cases``), one
benchmark per (op, mode, implementation, dtype), grouped by op so pytest-benchmark's table compares ours with the
anchors side by side.

    pytest benchmarks/test_bench_ops.py --benchmark-enable                      # quick sizes
    SRPO_BENCH_PRESET=full pytest benchmarks/test_bench_ops.py --benchmark-enable --benchmark-json out.json

(``--benchmark-disable``, the project default, runs each case once as a smoke test.)
"""

from __future__ import annotations

import os

import pytest
import torch

from srpo_core.bench.cases import build_cases

PRESET = os.environ.get("SRPO_BENCH_PRESET", "quick")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = build_cases(PRESET, DEVICE)


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
