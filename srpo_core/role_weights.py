"""Dispatch for SPEC steps 2-6 on the packed layout (the part of ``role_aware_advantages`` after the signals).

``which`` is what :func:`srpo_core._dispatch.pick_backend` resolved: ``"triton"`` runs the two-launch kernel
(``kernels/role_weights.py``), ``"torch"`` the reference (``srpo_core/reference/role_weights.py``). Every backend
returns a :class:`~srpo_core.reference.role_weights.RoleWeights` with the same fields and dtypes.

Shapes: ``advantages: [B]``, ``signals: [N]``, ``roles: int [N]``, ``cu_seqlens: int64 [B+1]``.
"""

from __future__ import annotations

import torch

from srpo_core.config import SRPOConfig
from srpo_core.reference.role_weights import RoleWeights
from srpo_core.reference.role_weights import role_weights as role_weights_reference


def role_weights(which: str, advantages: torch.Tensor, signals: torch.Tensor, roles: torch.Tensor,
                 cu_seqlens: torch.Tensor, config: SRPOConfig, group=None) -> RoleWeights:
    if which == "triton":
        from srpo_core._role_weights_triton import role_weights_triton

        return role_weights_triton(advantages, signals, roles, cu_seqlens, config, group)
    return role_weights_reference(advantages, signals, roles, cu_seqlens, config, group)
