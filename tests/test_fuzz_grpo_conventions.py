"""``grpo_advantages``' TRL conventions (issue 17, last bullet): ``nan_rewards="zero"`` and ``scale="batch"``, against a
hand computation and against TRL 1.16's own code path (``trl.trainer.utils.nanstd`` and the lines of
``GRPOTrainer._generate_and_score_completions`` that turn rewards into advantages, replayed on the same tensors)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_core import grpo_advantages

NAN = math.nan


def test_nan_rewards_raise_by_default():
    with pytest.raises(ValueError, match=r"grpo_advantages: `rewards` must be finite .*nan_rewards='zero'"):
        grpo_advantages(torch.tensor([1.0, NAN]), torch.tensor([0, 0]))


def test_inf_rewards_raise_even_with_nan_zero():
    with pytest.raises(ValueError, match=r"grpo_advantages: `rewards` must not be ±inf.*index 1"):
        grpo_advantages(torch.tensor([1.0, math.inf]), torch.tensor([0, 0]), nan_rewards="zero")


@pytest.mark.parametrize(("name", "value"), [("scale", "global"), ("nan_rewards", "ignore")])
def test_bad_options(name, value):
    with pytest.raises(ValueError, match=f"grpo_advantages: `{name}`"):
        grpo_advantages(torch.ones(2), torch.tensor([0, 0]), **{name: value})


def test_nan_zero_by_hand():
    # group 0: 1, 3, NaN → mean 2, unbiased std √2; group 1: NaN, 5 → one scored reward: 0; group 2: all NaN.
    r = torch.tensor([1.0, 3.0, NAN, NAN, 5.0, NAN, NAN], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = grpo_advantages(r, g, eps=0.0 + 1e-12, nan_rewards="zero")
    s = math.sqrt(2.0) + 1e-12
    assert out.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-15)
    none = grpo_advantages(r, g, norm="none", nan_rewards="zero")
    assert none.tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_batch_scale_by_hand():
    # group means 1.5 and 10; batch mean 5.75, batch unbiased std of (1, 2, 10, 10).
    r = torch.tensor([1.0, 2.0, 10.0, 10.0], dtype=torch.float64)
    g = torch.tensor([7, 7, 3, 3])
    std = math.sqrt(sum((x - 5.75) ** 2 for x in (1, 2, 10, 10)) / 3)
    out = grpo_advantages(r, g, scale="batch", eps=1e-4)
    assert out.tolist() == pytest.approx([-0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0.0, 0.0], rel=1e-14)
    # norm="none" ignores the scale
    assert grpo_advantages(r, g, scale="batch", norm="none").tolist() == [-0.5, 0.5, 0.0, 0.0]


def _trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16 ``sum_then_normalize`` with one reward function: the trainer's lines, on ``rewards [G·n]``."""
    from trl.trainer.utils import nanstd

    rewards_per_func = rewards[:, None]
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * torch.ones(1, dtype=rewards.dtype)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards == "group":
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = (rewards - mean_grouped) / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(groups=st.integers(1, 4), n=st.integers(2, 6), scale=st.sampled_from(["group", "batch"]), data=st.data())
def test_against_trl_code_path(groups, n, scale, data):
    values = data.draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0, NAN]), st.floats(-5, 5, width=32)),
                                min_size=groups * n, max_size=groups * n))
    r = torch.tensor(values, dtype=torch.float64)
    g = torch.arange(groups).repeat_interleave(n)
    ours = grpo_advantages(r, g, eps=1e-4, scale=scale, nan_rewards="zero")
    theirs = _trl_advantages(r.clone(), n, scale)
    # TRL's nanstd forms Bessel's correction count / (count − 1) from int64 counts, i.e. in float32 (4/3 →
    # 1.3333334): its float64 advantages carry a float32-sized relative error, hence rtol 1e-7. Where a group has
    # one scored reward TRL gets NaN → 0, and 0 / (std + 1e-4) where a group's rewards are equal: both 0 here too.
    assert torch.allclose(ours, theirs, rtol=1e-7, atol=1e-12), (values, ours, theirs)
