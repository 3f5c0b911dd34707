"""Test-suite set-up: Triton runs through its interpreter on CPU, kernel outputs are poisoned, slow tests are opt-in."""

import importlib
import importlib.util
import os
import pkgutil
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# Both must be set before any Triton kernel is decorated (i.e. before srpo_core.kernels is imported).
os.environ.setdefault("SRPO_POISON", "1")
# The device the kernel parity tests run on: "cpu" (Triton through its interpreter) everywhere but `make gpu-check`,
# which sets SRPO_TEST_DEVICE=cuda and runs the same tests on the GPU (the `device` fixture below).
TEST_DEVICE = torch.device(os.environ.get("SRPO_TEST_DEVICE", "cpu"))
if TEST_DEVICE.type == "cpu" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import srpo_core.kernels as _kernels  # noqa: E402  (after the environment above)

# ``tests/strategies.py`` (the hypothesis strategies) as the module ``srpo_core_test_strategies``: with
# ``--import-mode=importlib`` tests/ is not on sys.path, so the test modules import it by this name.
# Likewise ``tests/ablation_oracle.py`` (the by-hand ablated sequences of the adapter tests),
# ``tests/gloo_group.py`` (``free_port`` for the tests that launch multi-process workers), and the helpers the op
# files share: ``tests/_checks.py`` (``raises``, small valid calls), ``tests/_loops.py`` (the float64 loops),
# ``tests/_fuzz.py`` (the advantages' fuzz calls) and ``tests/_logprob_fuzz.py`` (the log-prob ops' fuzz pieces).
for _name, _file in (("srpo_core_test_strategies", "strategies.py"),
                     ("srpo_core_test_ablation_oracle", "ablation_oracle.py"),
                     ("srpo_core_test_gloo", "gloo_group.py"),
                     ("srpo_core_test_checks", "_checks.py"),
                     ("srpo_core_test_loops", "_loops.py"),
                     ("srpo_core_test_fuzz", "_fuzz.py"),
                     ("srpo_core_test_logprob_fuzz", "_logprob_fuzz.py")):
    _spec = importlib.util.spec_from_file_location(_name, os.path.join(os.path.dirname(__file__), _file))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)

# Decorate every kernel now, while TRITON_INTERPRET is what the session set: ``@triton.jit`` reads it once, at import,
# and a test that later monkeypatches it to "0" (to check the no-CUDA error) must not be the first to import a kernel.
# Without triton (it is an extra: the verl venv has none) there is nothing to decorate and the kernel tests skip.
if importlib.util.find_spec("triton") is not None:
    for _mod in pkgutil.iter_modules(_kernels.__path__):
        importlib.import_module(f"{_kernels.__name__}.{_mod.name}")

# Every test that launches a Triton kernel must be one the GPU check runs (it takes `device`), or it fails.
from srpo_core.bench.kernel_launch_audit import _kernel_launch_audit  # noqa: E402, F401  (an autouse fixture)

# Under pytest-xdist (`make test` runs `-n auto`) each worker takes its share of the cores for torch's threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

settings.register_profile(
    "ci", deadline=None, max_examples=60, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
# `make gpu-check GPU_CHECK_ARGS=--rehearse` (CI): every parity test runs, at a few examples each
settings.register_profile("smoke", deadline=None, max_examples=3, derandomize=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("thorough", deadline=None, max_examples=500, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def device() -> torch.device:
    """Where a kernel parity test puts its tensors: CPU (interpreter) by default, CUDA under `make gpu-check`."""
    return TEST_DEVICE


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
