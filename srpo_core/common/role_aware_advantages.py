"""What the paths of ``role_aware_advantages`` share: the packed result of SPEC steps 2-6 (:class:`RoleWeights`, which
the reference and the Triton launcher return) and step 1's per-token contrast fused with its at-bound flag (the CPU
path runs it on its row grid, the Triton launcher on the packed tokens). The readable reference of step 1 is
``srpo_core/reference/contrast.py``; the two agree to rounding (the tests compare every path with it).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RoleWeights:
    """Packed results: ``advantages, weights, z: [N]``, ``baseline: [B]``, ``role_stats: float64 [2, 3]`` holding
    ``(count, μ_r, σ_r)`` for perception then reasoning (``count``: all the role's tokens; ``μ_r, σ_r``: over the
    signals ``config.role_stats`` selects), and ``clamped: float64 [2]``, the number of signals at a bound of their
    contrast per role, over the whole batch."""

    advantages: torch.Tensor
    weights: torch.Tensor
    z: torch.Tensor
    baseline: torch.Tensor
    role_stats: torch.Tensor
    clamped: torch.Tensor | None = None


def clamped_difference(a: torch.Tensor, b: torch.Tensor, clamp) -> torch.Tensor:
    """``clamp(a − b, −c, c)``, with ``a == b`` (both ``−inf`` included) giving exactly 0."""
    d = torch.where(a == b, torch.zeros_like(a), a - b)
    return d.clamp(-clamp, clamp)


def signal_and_bound(logp: torch.Tensor, other: torch.Tensor, kind: str, clamp, k3_max, dtype: torch.dtype):
    """Step 1's log-prob contrast ``D(ℓ, ℓ')`` (``kind`` ``"logratio"`` or ``"k3"``) in ``dtype``, and whether it sits
    at a bound of its contrast (decision D87: ``|δ| ≥ c``, or ``k3 ≥ k3_max``). ``clamp`` and ``k3_max``: numbers or
    0-d tensors in ``dtype``."""
    if kind == "logratio":
        d = clamped_difference(logp.to(dtype), other.to(dtype), clamp)
        return d, d.abs() >= clamp
    delta = clamped_difference(other.to(dtype), logp.to(dtype), clamp)
    raw = torch.expm1(delta) - delta
    return raw.clamp_min(0.0).clamp_max(k3_max), torch.where(delta.abs() >= clamp, True, raw >= k3_max)
