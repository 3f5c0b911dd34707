"""The risky fuzz cases, in a subprocess: the Triton backends (through the interpreter on CPU, the kernels on a GPU)
take the same generated bad and extreme inputs as the log-prob ops' fuzz files (``fuzz_logprob_ops.args`` lists them
for one child: ``test_token_logprobs_fuzz.py``, ``test_linear_token_logprobs_fuzz.py``, ``test_token_contrast_fuzz.py``)
and ``test_role_aware_advantages_fuzz.py``; an out-of-bounds read that kills the interpreter (a segfault, an abort)
fails this test with the child's output (pytest's faulthandler prints where it died) instead of ending the run. Also a
rollouts file whose JSON nesting could exhaust the C stack."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).parent
# The share of each fuzz test's examples the child runs: the interpreter is ~100x slower than the torch paths.
SCALE = {"ci": "0.2", "dev": "0.2", "thorough": "1"}


def _child(args: list[str], env_extra: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], cwd=TESTS.parent, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _verdict(proc: subprocess.CompletedProcess, what: str) -> None:
    tail = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode < 0:
        pytest.fail(f"{what}: the child process was killed by signal {-proc.returncode} (a crash)\n{tail}")
    assert proc.returncode == 0, f"{what}: rc {proc.returncode}\n{tail}"


@pytest.mark.parametrize("target", [
    "@tests/fuzz_logprob_ops.args",  # pytest reads the three files' names from it: one child, as before
    "tests/test_role_aware_advantages_fuzz.py::test_fuzz_role_aware_advantages",
])
def test_fuzz_triton_backends_in_a_subprocess(target):
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    proc = _child(["-m", "pytest", target, "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts="],
                  {"SRPO_FUZZ_BACKEND": "triton", "SRPO_FUZZ_SCALE": SCALE.get(profile, "0.2"),
                   "OMP_NUM_THREADS": "1", "SRPO_LAUNCH_AUDIT": "off"},  # a crash harness, not a parity selection
                  timeout=1800)
    _verdict(proc, f"{target} with backend='triton'")


def test_deep_json_in_a_subprocess(tmp_path):
    """A 10⁷-deep line: the json module's C scanner recurses; it must be the library's error, not a crash."""
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt_id": 1, "tokens": ' + "[" * 10**7 + "\n")
    code = ("import sys\nfrom srpo_core.rollouts import RolloutError, load\n"
            "try:\n    load(sys.argv[1])\nexcept RolloutError as e:\n    print('library error:', e)\n")
    proc = _child(["-c", code, str(path)], {}, timeout=300)
    _verdict(proc, "deep JSON")
    assert "library error:" in proc.stdout and "deep.jsonl:1" in proc.stdout, proc.stdout + proc.stderr
