"""``grpo_advantages``: its errors; its values against a plain-Python float64 loop (a group of one gets ``A_i = 0``
under both norms, D12); its TRL conventions ``nan_rewards="zero"`` and ``scale="batch"``, against a hand computation and
against TRL 1.16's own code path (``trl.trainer.utils.nanstd`` and the lines of
``GRPOTrainer._generate_and_score_completions`` that turn rewards into advantages, replayed on the same tensors)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from srpo_core_test_checks import raises  # tests/_checks.py
from srpo_core_test_loops import TOL, examples  # tests/_loops.py

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


# -- errors ----------------------------------------------------------------------------------------------------------
def test_grpo_errors():
    r, g = torch.ones(3), torch.zeros(3, dtype=torch.int64)
    with raises(TypeError, "`rewards`", "floating-point", "torch.int64"):
        grpo_advantages(r.long(), g)
    with raises(TypeError, "`group_ids`", "integer tensor", "torch.float32"):
        grpo_advantages(r, g.float())
    with raises(ValueError, "`group_ids`", "shape of `rewards` (3,)", "shape (2,)"):
        grpo_advantages(r, g[:2])
    with raises(ValueError, "`group_ids`", "on cpu", "on meta"):
        grpo_advantages(r, g.to("meta"))
    with raises(ValueError, "`norm`", "'std' or 'none'", "'mad'"):
        grpo_advantages(r, g, norm="mad")
    with raises(ValueError, "`eps`", "positive", "0"):
        grpo_advantages(r, g, eps=0.0)
    with raises(ValueError, "`rewards`", "must be finite", "first at index 1"):
        grpo_advantages(torch.tensor([0.0, NAN, 1.0]), g)


def test_grpo_empty():
    out = grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0,)


# -- against the float64 loop reference ------------------------------------------------------------------------------
def loop_grpo(rewards: list[float], groups: list[int], norm: str, eps: float) -> list[float]:
    out = []
    for i, g in enumerate(groups):
        members = [rewards[j] for j, h in enumerate(groups) if h == g]
        n = len(members)
        if n == 1:
            out.append(0.0)
            continue
        mean = math.fsum(members) / n
        if norm == "none":
            out.append(rewards[i] - mean)
        else:
            std = math.sqrt(math.fsum((r - mean) ** 2 for r in members) / (n - 1))
            out.append((rewards[i] - mean) / (std + eps))
    return out


@st.composite
def reward_batches(draw):
    b = draw(st.integers(0, 24))
    groups = draw(st.lists(st.integers(-3, 5), min_size=b, max_size=b))
    rewards = draw(st.lists(st.one_of(st.sampled_from((0.0, 1.0, 0.5)), st.floats(-10, 10)), min_size=b,
                            max_size=b))
    return rewards, groups


@settings(max_examples=examples(150))
@given(batch=reward_batches(), norm=st.sampled_from(("std", "none")), eps=st.sampled_from((1e-6, 1e-4, 1.0)),
       group_dtype=st.sampled_from((torch.int64, torch.int32)))
def test_grpo_advantages_matches_loop(batch, norm, eps, group_dtype):
    rewards, groups = batch
    got = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups, dtype=group_dtype),
                          norm=norm, eps=eps)
    assert got.dtype == torch.float64 and got.shape == (len(rewards),)
    want = torch.tensor(loop_grpo(rewards, groups, norm, eps), dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_grpo_group_of_one_is_zero():
    got = grpo_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert got[0].item() == 0.0
    assert got.dtype == torch.float32


@pytest.mark.parametrize(
    ("value", "n", "dtype"),
    [
        pytest.param(1.0, 8, torch.float32, id="binary-fp32"),
        pytest.param(0.0, 3, torch.float64, id="zero-fp64"),
        pytest.param(24.9, 15, torch.float32, id="24.9x15-fp32"),
        pytest.param(0.1, 7, torch.float64, id="0.1x7-fp64"),
    ],
)
def test_grpo_identical_rewards_give_zero(value, n, dtype):
    """A group whose rewards are all equal carries no preference: ``A_i = 0`` exactly (std_g = 0, like D5)."""
    got = grpo_advantages(torch.full((n,), value, dtype=dtype), torch.zeros(n, dtype=torch.int64))
    assert bool((got == 0).all()), got
