"""`make gpu-check` (benchmarks/gpu_check.py) and what it selects: the plan, the CPU fallback, the launch audit that
keeps every kernel test on the GPU, and the bench's deadline. The whole device run is rehearsed by
`python benchmarks/gpu_check.py --rehearse` (a CI step of its own, .ci/run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"
GPU_BENCH = ROOT / "benchmarks" / "gpu_bench.py"
pytest_plugins = ["pytester"]

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check takes its path")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("SRPO_TEST_DEVICE", "TRITON_INTERPRET")}
    return {**env, **extra}


@no_cuda
def test_plan_without_cuda():
    """The plan off CUDA: the message, static and parity on the CPU, no large/bench; every phase finds the package
    through the install, never through the working directory (PYTHONSAFEPATH)."""
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("gpu-check: python ") and " torch " in out and " triton " in out and "nvidia-smi" in out
    assert "no CUDA device: skipping the CUDA part" in out
    assert "[static]" in out and "tests/test_gpu_static.py" in out
    parity = next(line for line in out.splitlines() if line.startswith("[parity]"))
    assert "SRPO_TEST_DEVICE=cpu" in parity and "-p pytest_device_only" in parity and "PYTHONSAFEPATH=1" in parity
    for f in ("tests/test_token_logprobs.py", "tests/test_linear_token_logprobs.py", "tests/test_token_contrast.py",
              "tests/test_role_aware_advantages_triton.py", "tests/test_linear_policy_loss.py"):
        assert f in parity, f
    assert "[large]" not in out and "[bench]" not in out
    assert out.strip().splitlines()[-1].startswith("gpu-check (dry run): no CUDA device: 2 phases planned")


@no_cuda
def test_rehearsal_plan_is_the_device_plan_at_tiny_shapes():
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--rehearse", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split("]")[0][1:]: ln for ln in proc.stdout.splitlines() if ln.startswith("[")}
    assert list(lines) == ["static", "parity", "large", "bench"]
    assert all("PYTHONSAFEPATH=1" in ln and "TRITON_INTERPRET=1" in ln for ln in lines.values())
    assert "HYPOTHESIS_PROFILE=smoke" in lines["parity"] or "HYPOTHESIS_PROFILE" in os.environ
    assert "SRPO_GPU_LARGE_SMOKE=1" in lines["large"] and lines["bench"].endswith("--smoke")


@no_cuda
def test_cpu_fallback_runs_a_tiny_selection(tmp_path):
    """The real CPU path on one parity test: the device-only plugin selects it, the summary line counts it, exit 0;
    a selection that runs no test is a FAIL (exit 1), not a pass."""
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--phases", "parity", "-k",
                           "test_constant_role_gives_sigma_zero", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu-check: PASS: no CUDA device: tests 1 passed, 0 failed"), last
    assert "gpu-check: parity: " in proc.stdout and " s (elapsed " in proc.stdout  # per-phase elapsed time
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and summary["phases"]["parity"]["passed"] == 1 and summary["bench"] is None
    assert (tmp_path / "parity.xml").exists() and (tmp_path / "gpu_check.log").exists()

    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--phases", "static", "-k", "no_such_test_anywhere",
                           "--out", str(tmp_path / "none")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and "gpu-check: FAIL: no CUDA device: tests 0 passed" in proc.stdout, proc.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the synthetic tests launch on the CPU")
def test_launch_audit_fails_a_kernel_test_left_off_the_gpu(pytester):
    """A test that launches a Triton kernel without the `device` fixture fails (so `make gpu-check` cannot leave a
    kernel test behind); one that takes `device`, or launches nothing, passes."""
    pytester.makeconftest("""
import pytest, torch
from srpo_core.bench.kernel_launch_audit import _kernel_launch_audit

@pytest.fixture
def device():
    return torch.device("cpu")
""")
    pytester.makepyfile(test_synthetic="""
import torch
from srpo_core import token_logprobs

def launch():
    return token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 4]), backend="triton")

def test_left_off():
    launch()

def test_on_the_device(device):
    launch()

def test_no_kernel():
    token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 4]), backend="torch")
""")
    # `device` reached only through another fixture, in a file whose signatures never name it: the parity phase
    # would not pass this file to pytest, so the audit must fail it too
    pytester.makepyfile(test_indirect="""
import pytest, torch
from srpo_core import token_logprobs

@pytest.fixture
def dev(device):
    return device

def test_through_a_fixture(dev):
    token_logprobs(torch.randn(3, 5, device=dev), torch.tensor([0, 1, 4], device=dev), backend="triton")
""")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "addopts=--import-mode=importlib")
    res.assert_outcomes(passed=4, errors=2)  # a teardown failure is counted beside its passed call
    res.stdout.fnmatch_lines(["*test_left_off launched 1 Triton kernel(s) but `make gpu-check` would not run it*"])
    res.stdout.fnmatch_lines(["*test_through_a_fixture launched 1 Triton kernel(s)*"])


def test_bench_stops_at_its_deadline_with_a_partial_result(tmp_path):
    """`--seconds 0`: no row starts, exit 0, `complete: false` (a partial result, not a failure)."""
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(GPU_BENCH), "--smoke", "--seconds", "0", "--json", str(out)],
                          cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deadline reached" in proc.stdout
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["results"] == []


def test_bench_times_our_rows_first():
    from srpo_core.bench import gpu_bench

    cases = [("a", "fwd", "naive torch"), ("b", "fwd", "srpo-core"), ("c", "fwd", "trl"), ("d", "fwd", "srpo-core x")]
    assert [c[0] for c in gpu_bench.ours_first(cases)] == ["b", "d", "a", "c"]
