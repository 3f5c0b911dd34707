"""Packaging: ``kernels/`` ships only as ``srpo_core.kernels``, never as a top-level ``kernels`` module (it would
shadow Hugging Face's kernel hub, which transformers probes for), in the wheel and in the editable install."""

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
    "reference": importlib.import_module("srpo_core.reference.role_weights").__file__,
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
    for name in ("srpo_core", "kernels"):
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
    assert "srpo_core/reference/role_weights.py" in names
    top = {n.split("/")[0] for n in names}
    assert "kernels" not in top, sorted(top)
    assert top <= {"srpo_core", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    info = next(t for t in top if t.endswith(".dist-info"))
    top_level = zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split()
    assert top_level == ["srpo_core"]
    # Every kernel file of the source tree is in the wheel.
    for path in (ROOT / "kernels").glob("*.py"):
        assert f"srpo_core/kernels/{path.name}" in names, path.name


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
