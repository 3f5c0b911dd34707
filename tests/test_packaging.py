"""Packaging: ``kernels/`` ships only as ``srpo_core.kernels``, never as a top-level ``kernels`` module (it would
shadow Hugging Face's kernel hub, which transformers probes for), in the wheel and in the editable install; the wheel
alone carries the code, the example data, the documentation and ``py.typed`` (installed into a fresh venv and run
from an unrelated directory); and nothing needs ``triton``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = """
import importlib, importlib.util, json
import srpo_core, srpo_core.kernels
print(json.dumps({
    "kernels_spec": repr(importlib.util.find_spec("kernels")),
    "srpo_core": srpo_core.__file__,
    "srpo_core.kernels": srpo_core.kernels.__file__,
    "reference": importlib.import_module("srpo_core.reference.role_aware_advantages").__file__,
}))
"""


def probe(cwd: pathlib.Path, pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """A wheel built from a copy of the sources (building in place would write ``build/`` into the shared tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("srpo_core", "kernels", "benchmarks", "docs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("srpo_core-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_kernels_only_under_srpo_core(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "srpo_core/kernels/__init__.py" in names
    assert "srpo_core/reference/role_aware_advantages.py" in names
    top = {n.split("/")[0] for n in names}
    assert "kernels" not in top, sorted(top)
    assert top <= {"srpo_core", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    info = next(t for t in top if t.endswith(".dist-info"))
    top_level = zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split()
    assert top_level == ["srpo_core"]
    # Every kernel file of the source tree is in the wheel.
    for path in (ROOT / "kernels").glob("*.py"):
        assert f"srpo_core/kernels/{path.name}" in names, path.name


def test_wheel_ships_benchmarks_as_srpo_core_bench(wheel):
    """``benchmarks/`` is the one home of the benchmark code: the wheel carries all of it as ``srpo_core.bench``
    (what `srpo-core bench` imports), and no top-level ``benchmarks``."""
    names = zipfile.ZipFile(wheel).namelist()
    for path in (ROOT / "benchmarks").glob("*.py"):
        assert f"srpo_core/bench/{path.name}" in names, path.name
    assert "srpo_core/bench.py" not in names
    assert not any(n.startswith("benchmarks/") for n in names)


def test_installed_wheel_imports_kernels_as_subpackage(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (target / "kernels").exists()
    got = probe(tmp_path, pythonpath=str(target))
    assert got["kernels_spec"] == "None"
    for key in ("srpo_core", "srpo_core.kernels", "reference"):
        assert pathlib.Path(got[key]).is_relative_to(target), got
    assert pathlib.Path(got["srpo_core.kernels"]).parent == target / "srpo_core" / "kernels"


def test_editable_install_has_no_top_level_kernels(tmp_path):
    """The development install (``pip install -e .``): ``srpo_core.kernels`` maps to the root ``kernels/`` folder,
    and ``kernels`` itself is not importable from outside the repository."""
    got = probe(tmp_path)
    assert got["kernels_spec"] == "None"
    assert pathlib.Path(got["srpo_core.kernels"]).resolve() == (ROOT / "kernels" / "__init__.py").resolve()


def test_wheel_carries_data_docs_and_py_typed(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("srpo_core/py.typed", "srpo_core/examples/geometry_demo.jsonl", "srpo_core/docs/spec.md",
                 "srpo_core/docs/rollouts.md", "srpo_core/docs/trl.md", "srpo_core/docs/index.md",
                 "srpo_core/docs/quickstart.md"):
        assert want in names, want
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    hard = [r for r in requires if "extra ==" not in r]
    assert not any("triton" in r for r in hard), hard  # triton is an extra, never a hard dependency
    assert any("triton" in r and 'extra == "triton"' in r for r in requires), requires
    trl = next(r for r in requires if r.startswith("Requires-Dist: trl"))
    spec = trl.split(";")[0]
    assert "==" not in spec and "<" in spec and ">=" in spec, trl  # a tested range, not an exact pin


def _dependency_dirs() -> list[str]:
    """The folders holding srpo-core's dependencies in the test environment (reused, since torch is heavy)."""
    import numpy
    import rich
    import torch

    return sorted({str(pathlib.Path(m.__file__).resolve().parents[1]) for m in (torch, numpy, rich)})


def test_wheel_in_a_fresh_venv_runs_from_an_unrelated_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    site = pathlib.Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                       capture_output=True, text=True, check=True).stdout.strip())
    # Plain path lines: the dependencies' folders join sys.path *after* the venv's own site-packages, and their
    # .pth files (the test environment's editable srpo_core among them) are not run, so srpo_core can only come
    # from the wheel.
    (site / "srpo_deps.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    for rel in ("py.typed", "examples/geometry_demo.jsonl", "docs/spec.md", "kernels/role_aware_advantages.py"):
        assert (site / "srpo_core" / rel).is_file(), rel
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*argv):
        proc = subprocess.run(list(argv), cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"
        return proc.stdout

    got = json.loads(run(str(py), "-c", PROBE).strip().splitlines()[-1])
    for key in ("srpo_core", "srpo_core.kernels", "reference"):
        assert pathlib.Path(got[key]).is_relative_to(site), got
    script = venv / "bin" / "srpo-core"
    assert run(str(script), "--version").strip() == "srpo-core 0.2.0"
    out = run(str(script), "explain", "--example", "--width", "100")
    assert "triangle-area" in out and "what SRPO changed vs GRPO" in out
    assert "the math (contract)" in run(str(script), "docs", "spec")
    assert "usage: srpo-core" in run(str(script))
    # `srpo-core bench` imports its cases, timing and report from the installed srpo_core.bench
    out = run(str(script), "bench", "--tiny", "--op", "role_aware_advantages", "--no-progress")
    assert "role_aware_advantages" in out and "reference composition" in out
    # the generator prints, and leaves the installed file alone
    shipped = site / "srpo_core" / "examples" / "geometry_demo.jsonl"
    before = shipped.stat().st_mtime_ns
    assert run(str(py), "-m", "srpo_core.examples.make_example") == shipped.read_text(encoding="utf-8")
    assert "usage:" in run(str(py), "-m", "srpo_core.examples.make_example", "--help")
    assert shipped.stat().st_mtime_ns == before


NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as on a CPU-only install without the extra
import torch
import srpo_core
from srpo_core import (grpo_advantages, linear_token_logprobs, role_aware_advantages, token_contrast,
                       token_logprobs)
g = torch.Generator().manual_seed(0)
logits = torch.randn(6, 11, generator=g)
other = torch.randn(6, 11, generator=g)
target = torch.randint(0, 11, (6,), generator=g)
hidden, weight = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
B, T = 4, 5
adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.5]), torch.tensor([0, 0, 1, 1]))
lp = -torch.rand(B, T, generator=g)
roles = torch.randint(0, 3, (B, T), generator=g)
calls = {
    "token_logprobs": lambda backend: token_logprobs(logits, target, backend=backend),
    "token_contrast": lambda backend: token_contrast(logits, other, target, backend=backend).div,
    "linear_token_logprobs": lambda backend: linear_token_logprobs(hidden, weight, target, backend=backend),
    "role_aware_advantages": lambda backend: role_aware_advantages(
        adv, lp, lp - 0.5 * torch.rand(B, T, generator=torch.Generator().manual_seed(1)), lp - 0.1, roles,
        mask=torch.ones(B, T, dtype=torch.bool), backend=backend).advantages,
}
for name, call in calls.items():
    auto, ref = call("auto"), call("torch")
    torch.testing.assert_close(auto, ref)
    assert torch.isfinite(auto).all(), name
    try:
        call("triton")
    except RuntimeError as e:
        assert "needs the `triton` package" in str(e) and name in str(e), str(e)
    else:
        raise AssertionError(f"{name}: backend='triton' ran without triton")
assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""


def test_everything_runs_without_triton(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "ok"
