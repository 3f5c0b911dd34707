"""pytest plugin of ``make gpu-check`` (``-p pytest_device_only``): keep only the tests that take the ``device`` fixture
(tests/conftest.py), i.e. the kernel parity tests, which put their tensors on ``SRPO_TEST_DEVICE``. The rest of a file
(CPU-only checks, errors raised off CUDA) is deselected, not copied: the GPU runs the same test functions."""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    keep = [it for it in items if "device" in getattr(it, "fixturenames", ())]
    drop = [it for it in items if "device" not in getattr(it, "fixturenames", ())]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
