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
