"""``role_weights_triton``: SPEC steps 2-6 with the two Triton launches of ``srpo_core.kernels.role_weights``.

Between the launches the ``[tiles, 2, 6]`` partial statistics are folded here, in float64 and a fixed order (and
all-reduced over ``group`` when given: counts and sums first, then the squared deviations about the global mean, then
max / −min), into ``(μ_r, σ_r)``; the kernel of launch 2 reads six floats (each μ as an fp32 pair). Float64 inputs
take the reference path (the kernels compute in fp32). Returns the reference's :class:`RoleWeights`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from srpo_core.config import SRPOConfig
from srpo_core.reference.role_weights import RoleWeights
from srpo_core.reference.role_weights import role_weights as role_weights_reference


def _fold(part: torch.Tensor, group) -> torch.Tensor:
    """``[tiles, 2, 6]`` partials ``(n, m, c, M2, min, max)`` → float64 ``[2, 3]`` ``(count, μ, σ)`` per role
    (population σ; 0 for a constant role)."""
    p = part.to(torch.float64)
    n, mean, m2 = p[..., 0], p[..., 1] + p[..., 2], p[..., 3]  # [tiles, 2]
    first = torch.stack([n.sum(0), (n * mean).sum(0)], dim=1)  # [2, 2]
    if group is not None:
        dist.all_reduce(first, group=group)
    count = first[:, 0]
    mu = first[:, 1] / count.clamp(min=1.0)
    sq = (m2 + n * (mean - mu) ** 2).sum(0)
    extremes = torch.stack([p[..., 5].amax(0), (-p[..., 4]).amax(0)], dim=1)  # [2, 2]: max, −min
    if group is not None:
        dist.all_reduce(sq, group=group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    constant = extremes[:, 0] == -extremes[:, 1]
    sigma = torch.where(constant | (count == 0), 0.0, torch.sqrt(sq / count.clamp(min=1.0)))
    return torch.stack([count, torch.where(count > 0, mu, 0.0), sigma], dim=1)


def role_weights_triton(advantages: torch.Tensor, signals: torch.Tensor, roles: torch.Tensor,
                        cu_seqlens: torch.Tensor, config: SRPOConfig, group=None) -> RoleWeights:
    """``advantages [B]``, ``signals [N]``, ``roles int [N]``, ``cu_seqlens int64 [B+1]`` → ``RoleWeights``."""
    if torch.float64 in (advantages.dtype, signals.dtype):
        return role_weights_reference(advantages, signals, roles, cu_seqlens, config, group)
    from srpo_core.kernels import role_weights as k

    s = signals.to(torch.float32).contiguous()
    r = roles.contiguous()
    stats = _fold(k.partial_stats(s, r), group)
    mu, sigma = stats[:, 1], stats[:, 2]
    if config.standardize == "batch":
        inv = torch.where(sigma > 0, 1.0 / (sigma + config.eps), 0.0)
    else:
        inv = torch.zeros_like(sigma)
    hi = mu.to(torch.float32)
    lo = (mu - hi.to(torch.float64)).to(torch.float32)  # μ = hi + lo to ~48 bits
    packed = torch.stack([hi[0], lo[0], inv[0].float(), hi[1], lo[1], inv[1].float()])
    adv, w, z, base = k.weights(
        s, r, cu_seqlens.to(torch.int64).contiguous(), advantages.to(torch.float32).contiguous(), packed,
        beta_perception=config.beta_perception, beta_reasoning=config.beta_reasoning, u_max=config.u_max,
        w_min=config.w_min, weight_map=config.weight_map, standardize=config.standardize == "batch",
        renorm=config.renorm == "mean")
    # The reference reports μ of an empty role as 0 / 1 = 0 and σ = 0; so does this.
    return RoleWeights(adv, w, z, base, stats)
