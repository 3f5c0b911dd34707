"""pytest plugin (tests/conftest.py loads it): a test that launches a Triton kernel must be one ``make gpu-check``
runs on the GPU (``pytest_device_only.gpu_selected``), or it fails, naming the fix.

Launches are counted where every kernel call ends, whatever wrapper (``triton.autotune``, ``triton.heuristics``,
``torch.library.wrap_triton``) it went through: ``JITFunction.run`` (compiled) and ``InterpretedFunction.run``
(``TRITON_INTERPRET=1``), warm-up compiles excluded. Launches in a subprocess a test spawns are not seen: such tests
are about the processes, not the kernels, and the kernels they drive are tested in-process too.

One exception, set by a harness for its own child process only: ``SRPO_LAUNCH_AUDIT=off``. tests/test_fuzz_subprocess.py
runs the fuzz suites with the Triton backend forced (``SRPO_FUZZ_BACKEND=triton``) on the interpreter, where an
out-of-bounds read can kill the process; that is a crash harness for the interpreter, not a parity selection.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

from srpo_core.bench.pytest_device_only import gpu_selected

LAUNCHES = [0]


def _count(run):
    @functools.wraps(run)
    def counted(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            LAUNCHES[0] += 1
        return run(self, *args, **kwargs)

    counted.srpo_counted = True
    return counted


def install() -> bool:
    """Wrap the two ``run`` methods once; False when Triton is not installed (nothing can launch)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from triton.runtime import interpreter, jit

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        if not getattr(cls.run, "srpo_counted", False):
            cls.run = _count(cls.run)
    return True


INSTALLED = install()


@pytest.fixture(autouse=True)
def _kernel_launch_audit(request):
    before = LAUNCHES[0]
    yield
    launched = LAUNCHES[0] - before
    if launched and not gpu_selected(request.node) and os.environ.get("SRPO_LAUNCH_AUDIT") != "off":
        pytest.fail(
            f"{request.node.nodeid} launched {launched} Triton kernel(s) but `make gpu-check` would not run it on the "
            "GPU: take the `device` fixture and put the tensors on it (benchmarks/pytest_device_only.py)",
            pytrace=False)
