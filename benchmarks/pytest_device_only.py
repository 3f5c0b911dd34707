"""What ``make gpu-check`` runs on the GPU, as one predicate, and the pytest plugin that applies it.

``gpu_selected(item)``: a test runs on the device when it takes the ``device`` fixture (tests/conftest.py: its tensors
go to ``SRPO_TEST_DEVICE``) or when it lives in one of the check's own files (``OWN_FILES``: the ``static`` and
``large`` phases run those whole). ``-p pytest_device_only`` (the ``parity`` phase) keeps the tests that take
``device`` and deselects the rest of the same files: the GPU runs the same test functions, no copies.

The converse is enforced by ``kernel_launch_audit`` (loaded by tests/conftest.py): a test that launches a Triton
kernel while ``gpu_selected`` is false fails, so no kernel test can silently stay off the GPU.
"""

from __future__ import annotations

from pathlib import Path

# run whole by the check's `static` and `large` phases
OWN_FILES = ("test_gpu_static.py", "test_gpu_large.py")


def gpu_selected(item) -> bool:
    """Whether ``make gpu-check`` runs this pytest item on the GPU."""
    return "device" in getattr(item, "fixturenames", ()) or Path(str(item.fspath)).name in OWN_FILES


def pytest_collection_modifyitems(config, items):
    keep = [it for it in items if "device" in getattr(it, "fixturenames", ())]
    drop = [it for it in items if "device" not in getattr(it, "fixturenames", ())]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
