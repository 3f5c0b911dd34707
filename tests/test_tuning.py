"""srpo_core.tuning: one object for the size knobs and switches, read at call time."""

from __future__ import annotations

import pytest
import torch

from srpo_core import _dispatch
from srpo_core.common import chunked
from srpo_core.cpu import linear_token_logprobs as cpu_linear
from srpo_core.tuning import TUNING, Tuning


def test_sizes_come_from_the_environment_and_are_recorded_as_user_set():
    t = Tuning.from_env({"SRPO_LINEAR_VOCAB_TILE": "7", "SRPO_POLICY_LOSS_TOKEN_CHUNK": "64"})
    assert t.linear_vocab_tile == 7 and t.policy_loss_token_chunk == 64
    assert t.user_set == frozenset({"linear_vocab_tile", "policy_loss_token_chunk"})
    assert t.linear_tile_elements == Tuning().linear_tile_elements  # the others keep their defaults
    assert Tuning.from_env({}).user_set == frozenset()


@pytest.mark.parametrize("raw", ["abc", "0", "-3", "1.5"])
def test_a_bad_size_variable_names_itself_and_the_field(raw):
    with pytest.raises(ValueError, match=rf"SRPO_LINEAR_TILE_ELEMENTS must be a positive integer \(it sets "
                                         rf"TUNING.linear_tile_elements\), got '{raw}'"):
        Tuning.from_env({"SRPO_LINEAR_TILE_ELEMENTS": raw})


def test_switches_read_the_environment_live(monkeypatch):
    monkeypatch.setattr(TUNING, "use_compile", None)
    monkeypatch.setenv("SRPO_NO_COMPILE", "1")
    assert not TUNING.compile and not chunked.compile_wanted(torch.device("cpu"))
    monkeypatch.setenv("SRPO_NO_COMPILE", "0")
    assert TUNING.compile
    monkeypatch.setattr(TUNING, "use_compile", False)  # an explicit setting wins over the environment
    assert not TUNING.compile
    monkeypatch.setenv("SRPO_AUTOTUNE", "1")
    monkeypatch.setenv("SRPO_POISON", "1")
    assert TUNING.autotune and TUNING.poison and _dispatch.poisoning()
    assert torch.isnan(_dispatch.empty((3,), dtype=torch.float32, device=torch.device("cpu"))).all()
    monkeypatch.setenv("SRPO_AUTOTUNE", "0")
    monkeypatch.setenv("SRPO_POISON", "0")
    assert not TUNING.autotune and not TUNING.poison


def test_paths_read_the_knobs_at_call_time(monkeypatch):
    monkeypatch.setattr(TUNING, "linear_vocab_tile", 5)
    monkeypatch.setattr(TUNING, "linear_tile_elements", 20)
    monkeypatch.setattr(TUNING, "linear_forward_tile_scale", 1)
    assert cpu_linear.tile_sizes(100, 50) == (4, 5)


