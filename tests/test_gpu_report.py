"""benchmarks/gpu_report.py compiles every registered Triton kernel for sm_80 and sm_90 with the real compiler (no
GPU needed) and no kernel spills registers on either target."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_report.py"

triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
    pytest.skip("this triton build ships no ptxas/cuobjdump", allow_module_level=True)


def registered_kernels() -> set[str]:
    """Names in every existing kernel module's GPU_REPORT (importing under the interpreter is fine for names)."""
    modules = importlib.import_module("srpo_core.bench.gpu_report").MODULES
    names = set()
    for modname in modules:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue
            raise
        names |= {entry["name"] for entry in getattr(mod, "GPU_REPORT", [])}
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"gpu_report.py failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text()), proc.stdout


def test_every_registered_kernel_compiles_for_both_targets(report):
    data, stdout = report
    expected = registered_kernels()
    assert expected, "no kernel module registers a GPU_REPORT"
    assert not data["errors"], data["errors"]
    got = {(r["kernel"], r["target"]) for r in data["rows"]}
    missing = {(name, t) for name in expected for t in ("sm_80", "sm_90")} - got
    assert not missing, f"kernels missing from the report: {sorted(missing)}"
    for name in expected:
        assert name in stdout, f"{name} not in the printed table"


def test_no_kernel_spills(report):
    data, _ = report
    spills = [(r["kernel"], r["target"], r["local_bytes"]) for r in data["rows"] if r["local_bytes"] > 0]
    assert not spills, f"register spills (local memory bytes per thread): {spills}"


def test_report_records_what_a_gpu_would_get(report):
    data, _ = report
    for r in data["rows"]:
        assert 0 < r["registers"] <= 255, r
        assert r["global_loads"] > 0, r
    contrast = [r for r in data["rows"] if r["kernel"].startswith("token_contrast")]
    assert contrast and all(r["global_loads_128bit"] > 0 for r in contrast), "logit loads are not 128-bit"
    assert data["environment"]["triton"] == triton.__version__


def test_gpu_bench_without_cuda_exits_with_a_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu_bench.py would time for real")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr and "Nothing was timed" in proc.stderr
    assert proc.stdout == ""


GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"


def test_gpu_check_plan_without_cuda():
    """`make gpu-check`'s plan off CUDA: the message, the static and parity phases on the CPU, no large/bench."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the plan would include the CUDA part")
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "no CUDA device: skipping the CUDA part" in out
    assert "[static]" in out and "tests/test_gpu_static.py" in out
    parity = next(line for line in out.splitlines() if line.startswith("[parity]"))
    assert "SRPO_TEST_DEVICE=cpu" in parity and "-p pytest_device_only" in parity
    for f in ("tests/test_token_logprobs.py", "tests/test_linear_logprobs.py", "tests/test_token_contrast.py",
              "tests/test_role_weights_kernel.py"):
        assert f in parity, f
    assert "[large]" not in out and "[bench]" not in out
    assert out.strip().splitlines()[-1].startswith("gpu-check (dry run): no CUDA device: 2 phases planned")


def test_gpu_check_cpu_fallback_runs_a_tiny_selection(tmp_path):
    """The real CPU path on one parity test: the device-only plugin selects it, the summary line counts it, exit 0;
    a selection that runs no test is a FAIL (exit 1), not a pass."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu_check.py would run the CUDA part")
    env = {k: v for k, v in os.environ.items() if k not in ("SRPO_TEST_DEVICE", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--phases", "parity", "-k",
                           "test_constant_role_gives_sigma_zero", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu-check: PASS: no CUDA device: tests 1 passed, 0 failed"), last
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and summary["phases"]["parity"]["passed"] == 1 and summary["bench"] is None
    assert (tmp_path / "parity.xml").exists() and (tmp_path / "gpu_check.log").exists()

    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--phases", "static", "-k", "no_such_test_anywhere",
                           "--out", str(tmp_path / "none")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and "gpu-check: FAIL: no CUDA device: tests 0 passed" in proc.stdout, proc.stdout
