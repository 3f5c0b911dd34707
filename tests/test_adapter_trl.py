"""The TRL adapter's guard: a TRL outside the tested range is refused at import with an error naming the range
(``SRPO_ALLOW_UNTESTED_TRL=1`` makes it a warning), and so is a GRPOTrainer without the private methods it overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("trl")

from srpo_core.adapters import trl as adapter  # noqa: E402


def test_tested_versions_pass_and_others_are_refused(monkeypatch):
    monkeypatch.delenv(adapter.ALLOW_UNTESTED_ENV, raising=False)
    low, high = adapter.TESTED_TRL
    for ok in (f"{low}.0", f"{low}.3", f"{low}.1.post1"):
        adapter.check_trl_version(ok)
    for bad in (f"{high}.0", "1.15.2", "2.0.0", f"{high}.0.dev0"):
        with pytest.raises(ImportError, match=rf"tested with trl>={low},<{high}, and TRL {bad} is installed"):
            adapter.check_trl_version(bad)


def test_untested_version_only_warns_when_allowed(monkeypatch):
    monkeypatch.setenv(adapter.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="trying anyway"):
        adapter.check_trl_version("9.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.check_trl_version(f"{adapter.TESTED_TRL[0]}.0")  # a tested version says nothing


def test_missing_private_method_is_refused_whatever_the_version(monkeypatch):
    monkeypatch.setenv(adapter.ALLOW_UNTESTED_ENV, "1")

    class Trainer:
        def _generate_and_score_completions(self, inputs):
            return inputs

    with pytest.raises(ImportError, match="has no _get_per_token_logps_and_entropies"):
        adapter.check_trl_version(f"{adapter.TESTED_TRL[0]}.0", Trainer)


def test_importing_the_adapter_under_an_untested_trl_fails_clearly():
    code = "import trl; trl.__version__ = '99.0.0'\nimport srpo_core.adapters.trl"
    env = {k: v for k, v in os.environ.items() if k != adapter.ALLOW_UNTESTED_ENV}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: srpo_core.adapters.trl is tested with trl>=") and "99.0.0" in last, last
