"""Dispatch for SPEC steps 2-6 on the packed layout (the part of ``role_aware_advantages`` after the signals).

``which`` is what :func:`srpo_core._dispatch.pick_backend` resolved: ``"triton"`` runs the two-launch kernel
(``kernels/role_weights.py``), ``"torch"`` the reference (``srpo_core/reference/role_weights.py``). Every backend
returns a :class:`~srpo_core.reference.role_weights.RoleWeights` with the same fields and dtypes.

``clamped: bool [N]`` marks the signals at a bound of their contrast (D87), counted per role for every backend (the
reference folds the count into its first all-reduce; for the kernel it is all-reduced here).
``config.role_stats="unclamped"`` leaves them out of step 2's statistics; the Triton kernel's launch 1 has no
per-token exclusion, so that option runs steps 2-6 on the reference path.

Shapes: ``advantages: [B]``, ``signals: [N]``, ``roles: int [N]``, ``cu_seqlens: int64 [B+1]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from srpo_core.config import Role, SRPOConfig
from srpo_core.reference.role_weights import RoleWeights
from srpo_core.reference.role_weights import role_weights as role_weights_reference


def clamped_counts(clamped: torch.Tensor | None, roles: torch.Tensor, group=None) -> torch.Tensor:
    """``float64 [2]``: clamped signals of perception then reasoning tokens, over the whole batch."""
    if clamped is None:
        counts = torch.zeros(2, dtype=torch.float64, device=roles.device)
    else:
        counts = torch.stack([(clamped & (roles == r)).sum(dtype=torch.float64) for r in (Role.PERCEPTION,
                                                                                             Role.REASONING)])
    if group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def role_weights(which: str, advantages: torch.Tensor, signals: torch.Tensor, roles: torch.Tensor,
                 cu_seqlens: torch.Tensor, config: SRPOConfig, group=None,
                 clamped: torch.Tensor | None = None) -> RoleWeights:
    # float64 takes the reference on the Triton backend too (the kernels compute in fp32): call it here, with the
    # clamped mask, rather than through role_weights_triton's own fallback, which has no mask.
    kernel = which == "triton" and torch.float64 not in (advantages.dtype, signals.dtype)
    if kernel and not (config.role_stats == "unclamped" and clamped is not None):
        from srpo_core.kernels.role_weights import role_weights_triton

        res = role_weights_triton(advantages, signals, roles, cu_seqlens, config, group)
        res.clamped = clamped_counts(clamped, roles, group)
        return res
    return role_weights_reference(advantages, signals, roles, cu_seqlens, config, group, clamped)
