"""SPEC steps 2-6 on the packed layout: role-wise standardisation, shared baseline, positive weights, renormalisation,
token advantages. Plain vectorised torch (segment sums with ``index_add_``), readable as the math, float64-friendly.

Shapes: ``advantages: [B]``, ``signals: [N]`` (``s_t``, read at role tokens only), ``roles: int [N]``,
``cu_seqlens: [B+1]``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from srpo_core.config import Role, SRPOConfig
from srpo_core.layout import segment_ids, segment_sum

ROLES = (Role.PERCEPTION, Role.REASONING)


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
