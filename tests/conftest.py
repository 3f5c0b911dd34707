"""Test-suite set-up: Triton runs through its interpreter on CPU, kernel outputs are poisoned, slow tests are opt-in."""

import os

# Both must be set before any Triton kernel is decorated (i.e. before srpo_core.kernels is imported).
os.environ.setdefault("SRPO_POISON", "1")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

import importlib
import pkgutil

import pytest
import srpo_core.kernels as _kernels
from hypothesis import HealthCheck, settings

# Decorate every kernel now, while TRITON_INTERPRET is what the session set: ``@triton.jit`` reads it once, at import,
# and a test that later monkeypatches it to "0" (to check the no-CUDA error) must not be the first to import a kernel.
for _mod in pkgutil.iter_modules(_kernels.__path__):
    importlib.import_module(f"{_kernels.__name__}.{_mod.name}")

settings.register_profile(
    "ci", deadline=None, max_examples=60, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
