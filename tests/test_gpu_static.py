"""Two hazards that the interpreter forgives, checked without a GPU (docs/kernels.md, "GPU check").

(a) **Device guard.** Every launch of every ``*_kernel`` in ``srpo_core.kernels`` happens inside
``srpo_core._dispatch.device_guard`` (``torch.cuda.device(x.device)`` on CUDA), and the guarded tensor is on the
device of every tensor the launch takes. Each module's ``*_kernel`` objects are replaced by wrappers that check this
at ``kernel[grid](...)`` and then launch; every public op is driven with ``backend="triton"`` (forward and backward);
a ``*_kernel`` that no case drives fails the coverage test, so a new kernel needs a case here.

(b) **int64 address math.** Every kernel compiles for sm_80 and sm_90 (``benchmarks/gpu_report.py``, from each
module's ``GPU_REPORT``) with every ``tt.addptr`` offset in its TTIR of type i64 (``benchmarks/addr_audit.py``; a
literal constant offset is exempt, an i64 offset widened from an i32 product is not). The ``[V, N]ᵀ`` view at
N = 32,768, V = 151,936 (vocab stride N: ``(V − 1)·N ≈ 5·10⁹ > 2³¹``) would need 10 GB per bf16 tensor, so it is
reasoned about statically: the launchers run on meta tensors, their launches are captured, and each kernel is
compiled at the signature the JIT would give those arguments (strides below 2³¹ are i32, the overflow-prone case)
and audited. Control kernels (tests/addr_controls.py) show the audit flags i32 offsets and late widening.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import srpo_core.kernels as kernels_pkg
from srpo_core import (
    _dispatch,
    linear_token_contrast,
    linear_token_logprobs,
    role_aware_advantages,
    token_contrast,
    token_logprobs,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DEVICE = torch.device(os.environ.get("SRPO_TEST_DEVICE", "cpu"))  # as tests/conftest.py's `device` fixture
RUNNABLE = DEVICE.type == "cuda" or _dispatch.interpreting()


def kernel_modules():
    pkg = kernels_pkg.__name__
    return [importlib.import_module(f"{pkg}.{m.name}") for m in pkgutil.iter_modules(kernels_pkg.__path__)]


def all_kernels() -> dict[str, object]:
    """``module.name`` → every module-level ``*_kernel`` launchable object (JIT, interpreted, heuristics, autotuner)."""
    return {f"{mod.__name__}.{name}": obj for mod in kernel_modules() for name, obj in vars(mod).items()
            if name.endswith("_kernel") and hasattr(obj, "__getitem__") and hasattr(obj, "fn")}


# --- (a) the device guard ---------------------------------------------------------------------------------------

class _Checked:
    """Stands in for a kernel: ``kernel[grid](...)`` records whether the guard is entered (and on the tensors'
    device), then launches the real one, so one missing guard does not hide the kernels launched after it."""

    def __init__(self, qualname, kernel, state):
        self.qualname, self.kernel, self.state = qualname, kernel, state

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.state["launched"].add(self.qualname)
            problems = self.state["problems"]
            guards = self.state["guards"]
            if not guards:
                problems.append(f"{self.qualname} launched outside `_dispatch.device_guard`")
            else:
                dev = guards[-1]
                problems += [f"{self.qualname}: guard on {dev}, but a tensor argument is on {a.device}"
                             for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.device != dev]
                if dev.type == "cuda" and torch.cuda.current_device() != dev.index:
                    problems.append(f"{self.qualname}: current device {torch.cuda.current_device()} inside a guard "
                                    f"on {dev}")
            return self.kernel[grid](*args, **kwargs)

        return launch

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


def _ids(n, v, g):
    ids = torch.randint(0, v, (n,), generator=g)
    ids[0] = -100  # an ignored row too
    return ids.to(DEVICE)


def _case_token_logprobs(g):
    x = torch.randn(2, 5, 37, generator=g).to(DEVICE).requires_grad_()
    lp, ent = token_logprobs(x, _ids(10, 37, g).view(2, 5), return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()


def _case_linear_token_logprobs(g):
    h = torch.randn(6, 16, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(40, 16, generator=g) * 0.25).to(DEVICE).requires_grad_()
    lp, ent = linear_token_logprobs(h, w, _ids(6, 40, g), return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()


def _case_token_contrast(g):
    x, y = (torch.randn(7, 33, generator=g).to(DEVICE) for _ in range(2))
    ids = _ids(7, 33, g)
    for kind in ("kl", "js"):
        token_contrast(x, y, ids, kind=kind, backend="triton")


def _case_linear_token_contrast(g):
    h, r = (torch.randn(6, 16, generator=g).to(DEVICE) for _ in range(2))
    w = (torch.randn(40, 16, generator=g) * 0.25).to(DEVICE)
    for kind in ("kl", "js"):
        linear_token_contrast(h, r, w, _ids(6, 40, g), kind=kind, backend="triton")


def _case_role_aware_advantages(g):
    n = 12
    lp, lc, la = (-torch.rand(n, generator=g).to(DEVICE) for _ in range(3))
    roles = torch.randint(0, 3, (n,), generator=g).to(DEVICE)
    cu = torch.tensor([0, 5, 12], device=DEVICE)
    role_aware_advantages(torch.randn(2, generator=g).to(DEVICE), lp, lc, la, roles, cu_seqlens=cu,
                          backend="triton")


CASES = {"token_logprobs": _case_token_logprobs, "linear_token_logprobs": _case_linear_token_logprobs,
         "token_contrast": _case_token_contrast, "linear_token_contrast": _case_linear_token_contrast,
         "role_aware_advantages": _case_role_aware_advantages}


@pytest.fixture(scope="module")
def guarded_runs():
    """Each case run once with every kernel wrapped: ``{case: (launched kernels, problems, error or None)}``."""
    if not RUNNABLE:
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    state = {"guards": [], "launched": set(), "problems": []}
    real_guard = _dispatch.device_guard

    @contextlib.contextmanager
    def recording_guard(x):
        with real_guard(x):
            state["guards"].append(x.device)
            try:
                yield
            finally:
                state["guards"].pop()

    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_dispatch, "device_guard", recording_guard)
        for mod in kernel_modules():
            if hasattr(mod, "device_guard"):  # `from srpo_core._dispatch import device_guard` works as well
                mp.setattr(mod, "device_guard", recording_guard)
        for qualname, kernel in all_kernels().items():
            modname, name = qualname.rsplit(".", 1)
            mp.setattr(sys.modules[modname], name, _Checked(qualname, kernel, state))
        for case, run in CASES.items():
            state["launched"], state["problems"] = set(), []
            try:
                run(torch.Generator().manual_seed(0))
                results[case] = (state["launched"], state["problems"], None)
            except Exception as e:
                results[case] = (state["launched"], state["problems"], e)
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_launch_is_inside_the_device_guard(guarded_runs, case):
    launched, problems, err = guarded_runs[case]
    if err is not None:
        raise err
    assert launched, f"{case} with backend='triton' launched no kernel"
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_every_kernel_is_driven_by_a_case(guarded_runs):
    launched = set().union(*(ks for ks, _, _ in guarded_runs.values()))
    missing = sorted(set(all_kernels()) - launched)
    assert not missing, f"kernels no case in tests/test_gpu_static.py launches (add one to CASES): {missing}"


def test_the_guard_check_catches_an_unguarded_launch(guarded_runs):
    """Control: a launch outside the guard is recorded as a problem (the launch itself is stubbed out here)."""

    class Stub:
        fn = None

        def __getitem__(self, grid):
            return lambda *a, **k: None

    state = {"guards": [], "launched": set(), "problems": []}
    t = torch.empty(1, device=DEVICE)
    _Checked("k", Stub(), state)[(1,)](t)
    assert state["problems"] == ["k launched outside `_dispatch.device_guard`"]
    state["guards"].append(torch.device("meta"))
    _Checked("k", Stub(), state)[(1,)](t)
    assert state["problems"][1:] == [f"k: guard on meta, but a tensor argument is on {t.device}"]


# --- (b) int64 address math -------------------------------------------------------------------------------------

triton = pytest.importorskip("triton")
HAS_PTXAS = (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()
needs_compiler = pytest.mark.skipif(not HAS_PTXAS, reason="this triton build ships no ptxas/cuobjdump")


def _run(args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_static") / "report.json"
    proc = _run([str(BENCH / "gpu_report.py"), "--json", str(out)])
    assert proc.returncode == 0, f"gpu_report.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _addr_audit():
    return importlib.import_module("srpo_core.bench.addr_audit")


def test_every_kernel_has_a_gpu_report_entry():
    """The compile audit covers every kernel: each ``*_kernel`` is some ``GPU_REPORT`` entry's ``fn``."""
    unwrap = _addr_audit().unwrap
    listed = {id(unwrap(e["fn"])[0].fn) for mod in kernel_modules() for e in getattr(mod, "GPU_REPORT", [])}
    missing = sorted(q for q, k in all_kernels().items() if id(unwrap(k)[0].fn) not in listed)
    assert not missing, f"kernels with no GPU_REPORT entry (benchmarks/gpu_report.py would not compile them): {missing}"


@needs_compiler
def test_the_audit_flags_i32_offsets_and_late_widening():
    """Controls: tests/addr_controls.py's two bad kernels are flagged at the right line, the two good ones pass."""
    script = (
        "import json, sys, torch; sys.path[:0] = [sys.argv[1]]\n"
        "import addr_controls as c\n"
        "from srpo_core.bench import addr_audit as a\n"
        "x = torch.empty(64, device='meta'); out = {}\n"
        "for name in ('i32_product_kernel', 'widened_late_kernel', 'int64_kernel'):\n"
        "    launch = a.jit_signature(getattr(c, name), (x, x, 32768), {'BLOCK': 64})\n"
        "    out[name] = a.audit_ttir(a.compile_ttir(launch, 90))\n"
        "launch = a.jit_signature(c.constant_offset_kernel, (x, x), {})\n"
        "out['constant_offset_kernel'] = a.audit_ttir(a.compile_ttir(launch, 80))\n"
        "print(json.dumps(out))\n")
    proc = _run(["-c", script, str(ROOT / "tests")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    src = (ROOT / "tests" / "addr_controls.py").read_text().splitlines()
    line = {k: next(i + 1 for i, s in enumerate(src) if m in s) for k, m in
            (("i32", "cols * stride + row), axis=0))  # i32"), ("late", "off = (cols * stride)"))}
    assert any(f["kind"] == "i32 offset" and f"addr_controls.py:{line['i32']}" in f["where"]
               for f in found["i32_product_kernel"]), found
    assert [f["kind"] for f in found["widened_late_kernel"]] == ["widened after an i32 multiply"], found
    assert f"addr_controls.py:{line['late']}" in found["widened_late_kernel"][0]["where"], found
    assert found["int64_kernel"] == [] and found["constant_offset_kernel"] == [], found


@needs_compiler
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_every_addptr_offset_is_int64(report, target):
    format_findings = _addr_audit().format_findings
    rows = [r for r in report["rows"] if r["target"] == target]
    assert rows and not report["errors"], report["errors"]
    bad = [format_findings(r["kernel"], target, r["addptr_findings"]) for r in rows if r["addptr_findings"]]
    assert not bad, "pointer offsets not int64 (cast program ids / index vectors to tl.int64 before the " \
                    "multiply by a stride):\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_static") / "large.json"
    proc = _run([str(BENCH / "addr_audit.py"), "--json", str(out)])
    assert out.exists(), f"addr_audit.py wrote nothing:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {r["case"]: r for r in json.loads(out.read_text())}


@needs_compiler
@pytest.mark.parametrize("case", ["token_logprobs fwd [V,N]T", "token_logprobs fwd+bwd [V,N]T",
                                  "token_contrast kl [V,N]T", "token_contrast js [V,N]T",
                                  "token_logprobs fwd+bwd [N,V]", "token_contrast js [N,V]",
                                  "linear_logprobs fwd [V,H] H=16384", "role_weights N=2^31+2^20"])
def test_large_offsets_are_computed_in_int64(large, case):
    """At N = 32,768, V = 151,936 every ``index × stride`` the launch needs reaches ~5·10⁹ while each stride fits in
    i32 (so the JIT passes it as i32): the kernel itself must widen before multiplying."""
    row = large[case]
    assert "error" not in row, f"{case}: {row['error']} (a launcher's signature changed? see benchmarks/addr_audit.py)"
    assert row["largest_offset"] >= 2**31 and row["launches"], row
    if case.startswith("token_"):  # the hazard's configuration: a stride of N or V reaches the kernel as i32
        assert any(la["signature"].get(k) == "i32" and v in (32_768, 151_936)
                   for la in row["launches"] for k, v in la["values"].items()), row["launches"]
    format_findings = _addr_audit().format_findings
    bad = [format_findings(f"{la['kernel']} ({case})", "sm_90", la["findings"]) for la in row["launches"]
           if la["findings"]]
    assert not bad, "\n".join(bad)
