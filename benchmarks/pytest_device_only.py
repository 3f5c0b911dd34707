"""What ``make gpu-check`` runs on the GPU, as one predicate, and the pytest plugin that applies it.

``gpu_selected(item)``: a test runs on the device when it lives in one of the check's own files (``OWN_FILES``: the
``static`` and ``large`` phases run those whole), or when it takes the ``device`` fixture (tests/conftest.py: its
tensors go to ``SRPO_TEST_DEVICE``) and its file is one the ``parity`` phase passes to pytest (``parity_files``: the
kernels' own test files, and any other with a test whose signature names ``device``). ``-p pytest_device_only`` (the
``parity`` phase) keeps the tests that take ``device`` and deselects the rest of the same files: the GPU runs the
same test functions, no copies.

The converse is enforced by ``kernel_launch_audit`` (loaded by tests/conftest.py): a test that launches a Triton
kernel while ``gpu_selected`` is false fails, so no kernel test can silently stay off the GPU, including one that
asks for ``device`` only through another fixture in a file the parity phase would not pass.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

# run whole by the check's `static` and `large` phases
OWN_FILES = ("test_gpu_static.py", "test_gpu_large.py")
KERNEL_TEST_FILES = ("test_token_logprobs.py", "test_linear_token_logprobs.py", "test_token_contrast.py",
                     "test_role_aware_advantages_triton.py", "test_linear_policy_loss.py",
                     "test_linear_token_contrast.py")
TAKES_DEVICE = re.compile(r"def test_\w+\([^)]*\bdevice\b")


def parity_files(tests: Path) -> list[str]:
    """The files the ``parity`` phase runs (names in ``tests``): the kernels' own, then any other test file with a
    test whose signature takes ``device``."""
    found = [f for f in KERNEL_TEST_FILES if (tests / f).exists()]
    for path in sorted(tests.glob("test_*.py")):
        if path.name not in found and path.name not in OWN_FILES and TAKES_DEVICE.search(path.read_text()):
            found.append(path.name)
    return found


@functools.cache
def _parity_names(tests: str) -> frozenset[str]:
    return frozenset(parity_files(Path(tests)))


def gpu_selected(item) -> bool:
    """Whether ``make gpu-check`` runs this pytest item on the GPU."""
    path = Path(str(item.fspath))
    if path.name in OWN_FILES:
        return True
    return "device" in getattr(item, "fixturenames", ()) and path.name in _parity_names(str(path.parent))


def pytest_collection_modifyitems(config, items):
    keep = [it for it in items if "device" in getattr(it, "fixturenames", ())]
    drop = [it for it in items if "device" not in getattr(it, "fixturenames", ())]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
