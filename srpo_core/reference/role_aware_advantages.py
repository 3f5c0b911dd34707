"""SPEC steps 1-6 on the packed layout: the contrasts, role-wise standardisation, shared baseline, positive weights,
renormalisation, token advantages. Plain vectorised torch (segment sums with ``index_add_``), readable as the math,
float64-friendly; no validation and no backend choice (``srpo_core/ops/role_aware_advantages.py`` does both).

Shapes: ``advantages: [B]``, per-token inputs ``[N]`` (``roles: int [N]``), ``cu_seqlens: [B+1]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from srpo_core.common.role_aware_advantages import RoleWeights
from srpo_core.config import Role, SRPOConfig
from srpo_core.layout import segment_ids, segment_sum
from srpo_core.reference import contrast as contrast_ref

ROLES = (Role.PERCEPTION, Role.REASONING)

__all__ = ["RoleWeights", "role_aware_advantages", "role_weights", "signals", "standardize", "weight_map"]


def role_aware_advantages(advantages: torch.Tensor, logp: torch.Tensor, logp_corrupt: torch.Tensor | None,
                          logp_ablated: torch.Tensor | None, roles: torch.Tensor,
                          perception_signal: torch.Tensor | None, reasoning_signal: torch.Tensor | None,
                          cu_seqlens: torch.Tensor, config: SRPOConfig, group=None, *,
                          dtype: torch.dtype) -> RoleWeights:
    """SPEC steps 1-6 on packed inputs whose values the caller has checked; ``advantages`` in ``dtype``."""
    s, clamped = signals(config, roles, logp, logp_corrupt, logp_ablated, perception_signal, reasoning_signal,
                         dtype=dtype)
    return role_weights(advantages, s, roles, cu_seqlens, config, group, clamped)


def signals(config: SRPOConfig, roles: torch.Tensor, logp: torch.Tensor, logp_corrupt: torch.Tensor | None,
            logp_ablated: torch.Tensor | None, perception_signal: torch.Tensor | None,
            reasoning_signal: torch.Tensor | None, *, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: ``s_t = D_P(ℓ, ℓ̃)`` at perception tokens, ``D_R(ℓ, ℓ°)`` at reasoning tokens (a precomputed signal
    replaces the contrast of its role), 0 elsewhere [N]; and ``clamped: bool [N]``, the log-prob contrasts at a bound
    (D87; precomputed signals never are). A role without tokens reads none of its inputs."""
    s = torch.zeros(roles.shape, dtype=dtype, device=roles.device)
    clamped = torch.zeros(roles.shape, dtype=torch.bool, device=roles.device)
    for role, kind, other, given in ((Role.PERCEPTION, config.perception_contrast, logp_corrupt, perception_signal),
                                     (Role.REASONING, config.reasoning_contrast, logp_ablated, reasoning_signal)):
        sel = roles == role
        if not bool(sel.any()):
            continue
        if given is not None:
            s = torch.where(sel, given.to(dtype), s)
            continue
        a, b = logp.to(dtype), other.to(dtype)
        s = torch.where(sel, contrast_ref.contrast(a, b, kind, config.clamp, config.k3_max), s)
        clamped |= sel & contrast_ref.at_bound(a, b, kind, config.clamp, config.k3_max)
    return s, clamped


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def standardize(signals: torch.Tensor, roles: torch.Tensor, config: SRPOConfig, group=None,
                clamped: torch.Tensor | None = None):
    """Step 2: ``z_t = (s_t − μ_r) / (σ_r + eps)`` per role over the batch (all ranks of ``group``).

    ``config.role_stats="unclamped"`` takes ``μ_r, σ_r`` over the role's signals that are not ``clamped`` (``bool
    [N]``, at a bound of their contrast; D87), and standardises every signal of the role with them.

    ``μ_r`` and the population ``σ_r`` are reduced in float64 in two passes (sum, then sum of squared deviations), so
    that no cancellation creeps in, and ``z`` is formed in float64 too (``s − μ`` cannot overflow). ``σ_r = 0`` gives
    ``z = 0``; a role whose signals are all equal has ``σ_r = 0`` exactly (its min equals its max), whatever the
    rounding of the mean. A role with no tokens contributes nothing.
    Returns ``z: [N]`` (0 at OTHER tokens), ``role_stats: float64 [2, 3]`` and the clamped counts ``float64 [2]``.
    """
    role_sel = torch.stack([roles == r for r in ROLES])  # [2, N]
    sel = role_sel & ~clamped if clamped is not None and config.role_stats == "unclamped" else role_sel
    s = signals.to(torch.float64)
    s_sel = torch.where(sel, s, 0.0)  # [2, N]
    n_clamped = (role_sel & clamped).sum(1, dtype=torch.float64) if clamped is not None else \
        torch.zeros(2, dtype=torch.float64, device=s.device)
    # (stats count, Σ s, all tokens, clamped) per role: one all-reduce, the same [2, 4] as the fast path's, so that
    # ranks on different paths still pair their collectives.
    first = _all_reduce(torch.stack([sel.sum(1, dtype=torch.float64), s_sel.sum(1),
                                     role_sel.sum(1, dtype=torch.float64), n_clamped], dim=1), group)  # [2, 4]
    count, total = first[:, 0], first[:, 1]
    mu = total / count.clamp(min=1.0)
    dev = torch.where(sel, s - mu[:, None], 0.0)
    # max(s) and max(−s) per role detect a constant role exactly.
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=s.device)
    extremes = torch.stack([torch.where(sel, s, -inf).amax(1), torch.where(sel, -s, -inf).amax(1)], dim=1) \
        if s.numel() else torch.full((2, 2), -float("inf"), dtype=torch.float64, device=s.device)
    if group is not None:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    sq = _all_reduce((dev * dev).sum(1), group)
    constant = extremes[:, 0] == -extremes[:, 1]
    sigma = torch.where(constant, 0.0, torch.sqrt(sq / count.clamp(min=1.0)))
    role_stats = torch.stack([first[:, 2], mu, sigma], dim=1)
    if config.standardize == "none":
        z = torch.where(role_sel, signals, 0.0).sum(0)
        return z.to(signals.dtype), role_stats, first[:, 3]
    dev = torch.where(role_sel, s - mu[:, None], 0.0)
    z_r = torch.where(sigma[:, None] > 0, dev / (sigma[:, None] + config.eps), 0.0)  # [2, N]
    z = torch.where(role_sel, z_r, 0.0).sum(0)
    return z.to(signals.dtype), role_stats, first[:, 3]


def weight_map(x: torch.Tensor, config: SRPOConfig) -> torch.Tensor:
    """Step 4's mapping of ``β_r · u_t`` to a positive weight."""
    if config.weight_map == "exp":
        return torch.exp(x)
    if config.weight_map == "linear":
        return torch.clamp(1.0 + x, min=config.w_min)
    return 2.0 * torch.sigmoid(x)


def role_weights(advantages: torch.Tensor, signals: torch.Tensor, roles: torch.Tensor, cu_seqlens: torch.Tensor,
                 config: SRPOConfig, group=None, clamped: torch.Tensor | None = None) -> RoleWeights:
    """SPEC steps 2-6. Values of ``signals`` at OTHER tokens are never read. ``clamped: bool [N]`` or ``None``."""
    b, n = advantages.numel(), signals.numel()
    seg = segment_ids(cu_seqlens, n)  # [N]
    is_role = (roles == Role.PERCEPTION) | (roles == Role.REASONING)
    signals = torch.where(is_role, signals, 0.0)

    # Step 2: role-wise standardisation over the batch.
    z, role_stats, n_clamped = standardize(signals, roles, config, group, clamped)

    # Step 3: one shared baseline per trajectory, the mean of z over its P ∪ R tokens.
    n_role = segment_sum(is_role.to(z.dtype), seg, b)
    baseline = torch.where(n_role > 0, segment_sum(z, seg, b) / n_role.clamp(min=1.0), 0.0)  # [B]

    # Step 4: centred, clipped, mapped to a positive weight with the role's strength; OTHER tokens weigh 1.
    u = torch.clamp(z - baseline[seg], -config.u_max, config.u_max)
    beta = torch.where(roles == Role.PERCEPTION, config.beta_perception, config.beta_reasoning).to(z.dtype)
    w = torch.where(is_role, weight_map(beta * u, config), 1.0)

    # Step 5: each trajectory's mean weight over its valid tokens becomes exactly 1.
    if config.renorm == "mean":
        n_tok = (cu_seqlens[1:] - cu_seqlens[:-1]).to(w.dtype)
        scale = torch.where(n_tok > 0, n_tok / segment_sum(w, seg, b).clamp(min=torch.finfo(w.dtype).tiny), 1.0)
        w = w * scale[seg]

    # Step 6: token advantages keep the sign of A_i.
    token_adv = w * advantages.to(w.dtype)[seg]
    return RoleWeights(token_adv, w, z, baseline, role_stats, n_clamped)
