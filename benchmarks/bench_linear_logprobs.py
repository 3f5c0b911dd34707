"""pytest-benchmark for ``linear_token_logprobs`` on CPU (not part of ``make test``):

    .venv/bin/pytest benchmarks/bench_linear_logprobs.py --benchmark-enable -q
    SRPO_BENCH_SHAPES="2048,1024,151936,float32" .venv/bin/pytest benchmarks/bench_linear_logprobs.py --benchmark-enable

Default shapes are small so a run takes a minute; ``benchmarks/linear_table.py`` writes the issue's full table with
peak memory. With ``--benchmark-disable`` (the project default) every case runs once: a smoke run.
"""

from __future__ import annotations

import os

import pytest
import torch

from srpo_core.bench.linear_methods import METHODS, gemm, make_inputs, three_gemms

SHAPES = [tuple(int(x) if i < 3 else x for i, x in enumerate(s.split(",")))
          for s in os.environ.get("SRPO_BENCH_SHAPES", "256,256,8000,float32;256,256,8000,bfloat16").split(";")]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "N{}-H{}-V{}-{}".format(*s))
def inputs(request):
    n, h, v, d = request.param
    return make_inputs(n, h, v, getattr(torch, d))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("method", ["naive", "trl", "cce", "ours"])
def test_method(benchmark, inputs, method, mode):
    benchmark.group = f"{mode}"
    benchmark.extra_info.update(method=method, mode=mode, shape=[tuple(inputs[0].shape), tuple(inputs[1].shape)])
    fn = METHODS[method]
    fn(*inputs, backward=mode == "fwdbwd")  # warm-up (compile)
    benchmark(lambda: fn(*inputs, backward=mode == "fwdbwd"))


def test_gemm_floors(benchmark, inputs):
    hidden, weight, ids = inputs
    benchmark.group = "fwd"
    benchmark(lambda: gemm(hidden, weight, ids))


def test_three_gemm_floor(benchmark, inputs):
    hidden, weight, ids = inputs
    grad = torch.randn(hidden.shape[0], weight.shape[0]).to(hidden.dtype)
    benchmark.group = "fwdbwd"
    benchmark(lambda: three_gemms(hidden, weight, ids, grad=grad))
