"""Public API: GRPO's sequence advantages and the elementwise log-prob contrast. SRPO's role-aware token advantages
live in ``srpo_core.ops.role_aware_advantages`` (``from srpo_core import role_aware_advantages``)."""

from __future__ import annotations

import math

import torch

from srpo_core._validate import (
    brief,
    first_true_index,
    refuse_meta,
    require_same_device,
    require_same_shape,
    require_tensor,
)
from srpo_core.config import SIGNAL_MAX
from srpo_core.layout import segment_sum
from srpo_core.reference import contrast as contrast_ref

_MOVED = {"role_aware_advantages": "srpo_core.ops.role_aware_advantages",
          "RoleAwareAdvantages": "srpo_core.ops.role_aware_advantages"}


def __getattr__(name: str):
    """Names that moved out of this module raise an error saying where they went (for one release)."""
    if name in _MOVED:
        raise ImportError(f"srpo_core.advantages.{name} moved to {_MOVED[name]}: use `from {_MOVED[name]} import "
                          f"{name}` or `from srpo_core import {name}`", name=name, path=__file__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def contrast(logp: torch.Tensor, logp_other: torch.Tensor, kind: str = "k3", *, clamp: float = 20.0,
             k3_max: float = 10.0) -> torch.Tensor:
    """Elementwise SPEC step-1 contrast ``D(ℓ, ℓ')`` of two log-prob tensors of the same shape.

    ``kind="logratio"``: ``clamp(ℓ − ℓ', −c, c)``; ``kind="k3"``: ``min(e^δ − δ − 1, k3_max)`` with
    ``δ = clamp(ℓ' − ℓ, −c, c)``. ``−inf`` is allowed; NaN is an error. ``clamp`` and ``k3_max`` must be finite,
    in ``(0, 1e15]``. Returns float32 (float64 if either input is float64), as ``role_aware_advantages`` computes
    it. ``kl`` and ``js`` need the two logit rows:
    use ``token_contrast``.
    """
    op = "contrast"
    require_tensor(op, "logp", logp, kind="float")
    require_tensor(op, "logp_other", logp_other, kind="float")
    require_same_shape(op, "logp", logp, logp_other=logp_other)
    require_same_device(op, "logp", logp, logp_other=logp_other)
    if kind in ("kl", "js"):
        raise ValueError(
            f"{op}: `kind`={brief(kind)} needs the two full logit rows, not log-probs; use srpo_core.token_contrast"
            " (it returns the divergence and both sampled-token log-probs)"
        )
    if kind not in ("logratio", "k3"):
        raise ValueError(f"{op}: `kind` must be 'logratio' or 'k3', got {brief(kind)}")
    for name, value in (("clamp", clamp), ("k3_max", k3_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= SIGNAL_MAX:
            raise ValueError(f"{op}: `{name}` must be a finite number in (0, {SIGNAL_MAX:g}], got {brief(value)}")
    refuse_meta(op, logp=logp, logp_other=logp_other)
    for name, x in (("logp", logp), ("logp_other", logp_other)):
        _reject_bad_values(op, name, x, torch.ones_like(x, dtype=torch.bool), "")
    # float32 for every float input, float64 when either is float64 (D10; D86: a clamp beyond fp16's range, or
    # e^δ of a clamped δ, is then representable).
    dtype = torch.float64 if torch.float64 in (logp.dtype, logp_other.dtype) else torch.float32
    return contrast_ref.contrast(logp.to(dtype), logp_other.to(dtype), kind, clamp, k3_max)


def _reject_bad_values(op: str, name: str, x: torch.Tensor, where: torch.Tensor, what: str) -> None:
    """NaN or +inf where a value is read is an error (a log-prob may be −inf, never NaN or +inf)."""
    bad = where & (torch.isnan(x) | (x == float("inf")))
    if bool(bad.any()):
        kind = "NaN" if bool(torch.isnan(x[bad]).any()) else "+inf"
        raise ValueError(
            f"{op}: `{name}` has {int(bad.sum())} NaN/+inf value(s){what}; first at index {first_true_index(bad)}"
            f" ({kind}); log-probs must be finite or -inf there"
        )


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, norm: str = "std",
                    eps: float = 1e-6, scale: str = "group", nan_rewards: str = "raise") -> torch.Tensor:
    """GRPO's sequence-level advantages: ``A_i = (R_i − mean_g R) / (std R + eps)``.

    ``rewards: [B]`` float, ``group_ids: [B]`` integer labels (any values; equal label = same prompt).
    ``std`` is the unbiased one (as verl and TRL compute it), over the group (``scale="group"``, the default) or over
    the whole batch (``scale="batch"``, TRL's ``scale_rewards="batch"``; the mean stays the group's). A group of one,
    or whose rewards are all equal, gives ``A_i = 0``. ``norm="none"`` gives ``R_i − mean_g R`` (Dr.GRPO).
    ``nan_rewards="raise"`` (default): a NaN reward is an error; ``"zero"`` (TRL's handling of a completion no reward
    function could score): a NaN reward gets ``A_i = 0`` and is left out of its group's mean and std (and of the
    batch std). ``±inf`` is always an error. Returns float32 (float64 for float64 rewards), detached (advantages are
    constants of the policy-gradient loss).
    """
    op = "grpo_advantages"
    require_tensor(op, "rewards", rewards, kind="float", ndim=1)
    require_tensor(op, "group_ids", group_ids, kind="int", ndim=1)
    require_same_shape(op, "rewards", rewards, group_ids=group_ids)
    require_same_device(op, "rewards", rewards, group_ids=group_ids)
    refuse_meta(op, rewards=rewards, group_ids=group_ids)
    if norm not in ("std", "none"):
        raise ValueError(f"{op}: `norm` must be 'std' or 'none', got {brief(norm)}")
    if scale not in ("group", "batch"):
        raise ValueError(f"{op}: `scale` must be 'group' or 'batch', got {brief(scale)}")
    if nan_rewards not in ("raise", "zero"):
        raise ValueError(f"{op}: `nan_rewards` must be 'raise' or 'zero', got {brief(nan_rewards)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{op}: `eps` must be a finite positive number, got {brief(eps)}")
    bad = torch.isinf(rewards) if nan_rewards == "zero" else ~torch.isfinite(rewards)
    if bool(bad.any()):
        what = "must not be ±inf" if nan_rewards == "zero" else "must be finite (or pass nan_rewards='zero')"
        raise ValueError(f"{op}: `rewards` {what}, got {int(bad.sum())} such value(s), "
                         f"first at index {first_true_index(bad)[0]} ({float(rewards[bad][0])})")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(torch.float64)  # group statistics in float64, result cast back
    scored = ~torch.isnan(r)
    r = torch.where(scored, r, 0.0)
    _, g = torch.unique(group_ids, return_inverse=True)
    num_groups = int(g.max()) + 1 if g.numel() else 0
    size = segment_sum(scored.to(torch.float64), g, num_groups)
    mean = segment_sum(r, g, num_groups) / size.clamp(min=1.0)
    # A group whose rewards are all equal has no spread: its advantages are exactly 0, not (ulp of the mean) / eps.
    hi = r.new_full((num_groups,), -float("inf")).scatter_reduce(0, g, torch.where(scored, r, -math.inf), "amax")
    lo = r.new_full((num_groups,), float("inf")).scatter_reduce(0, g, torch.where(scored, r, math.inf), "amin")
    informative = ((size > 1) & (hi > lo))[g] & scored
    centred = torch.where(scored, r - mean[g], 0.0)
    if norm == "none":
        return torch.where(informative, centred, 0.0).to(dtype)
    if scale == "group":
        std = torch.sqrt(segment_sum(centred * centred, g, num_groups) / (size - 1).clamp(min=1))[g]
    else:  # the unbiased std of every scored reward in the batch, about the batch mean
        n = scored.sum()
        dev = torch.where(scored, r - r.sum() / n.clamp(min=1), 0.0)
        std = torch.sqrt((dev * dev).sum() / (n - 1).clamp(min=1))
    return torch.where(informative, centred / (std + eps), 0.0).to(dtype)
