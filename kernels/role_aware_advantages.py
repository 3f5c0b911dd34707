"""The Triton path of ``role_aware_advantages``: SPEC step 1 in torch on the packed tokens, then steps 2-6 in two
launches, deterministic.

Inputs (packed): ``signals [N]`` fp32 (``s_t``, read at role tokens only), ``roles [N]`` int, ``cu_seqlens [B+1]``
int64, ``advantages [B]`` fp32. Outputs: ``adv [N]``, ``w [N]``, ``z [N]`` fp32, ``baseline [B]`` fp32.

**Launch 1** (``role_stats_kernel``, one program per ``BLOCK``-token tile): per role ``r ∈ {P, R}`` the tile's
partials ``(n, m, c, M2, min, max)``: the mean as ``m + c`` (fp32 mean plus the mean of the exact differences, so a
signal whose spread is far below its size keeps its digits) and ``M2 = Σ (s − m − c)²`` (two passes over registers:
no ``E[s²] − μ²`` cancellation). The wrapper folds the ``[tiles, 2, 6]`` partials in float64 and a fixed order
(``μ = Σ n_p mean_p / n``, ``M2 = Σ M2_p + n_p (mean_p − μ)²``; all-reduced over a process group when one is given)
into ``(μ_r, σ_r)``; ``σ_r = 0`` exactly when the role's max equals its min.

**Launch 2** (``role_weights_kernel``, one program per trajectory): three passes over the trajectory's tokens (L2
resident for any realistic length): (a) ``b_i = mean z`` over its role tokens; (b) ``w_t = map(β_r · clamp(z − b_i,
±u_max))`` (1 at OTHER) and ``Σ w``; (c) ``w ← w · n_i / Σ w`` (``renorm="mean"``) and the writes of ``w``, ``z`` and
``w · A_i``. ``z = (s − μ_r) / (σ_r + eps)`` is recomputed in each pass from ``s`` rather than stored.

Bytes moved per token (the floor is one read of ``s`` and ``roles`` for the statistics, one more read of both for
the weights, three writes): launch 1 reads ``s, roles`` once; launch 2 reads them three times from the same
trajectory-sized window (from L2 after the first pass) and writes ``adv, w, z`` once: DRAM traffic is the floor,
``2·(4 + r) + 12`` bytes per token with ``r`` the role id's width. No float atomics: every sum has a fixed order.

**The launcher** (``role_weights_triton``) runs the two launches and folds the partials between them (``_fold``;
over ``group``: counts and sums first, then the squared deviations about the global mean, then max / −min); launch 2
reads six floats (each μ as an fp32 pair). The kernels compute in fp32: float64 never comes here (the public entry's
``pick_backend`` refuses it for ``backend="triton"`` and sends ``"auto"`` to the CPU path). Returns
:class:`~srpo_core.common.role_aware_advantages.RoleWeights`.

**Step 1** (``role_aware_advantages_triton``): each role's signal is its precomputed ``s_t`` or the log-prob contrast
of ``srpo_core/common/role_aware_advantages.py`` (torch, elementwise), and the clamped signals are counted per role
(all-reduced over a process group after the two launches' collectives). ``role_stats="unclamped"`` needs a per-token
exclusion launch 1 does not have: the public entry sends those calls to the reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from srpo_core import _dispatch
from srpo_core._dispatch import empty
from srpo_core.common.role_aware_advantages import RoleWeights, signal_and_bound
from srpo_core.config import SRPOConfig

MAP_CODES = {"exp": 0, "linear": 1, "sigmoid": 2}
BLOCK = 1024  # tokens per tile: 8 per thread at 4 warps, two 128-bit loads of fp32 signals
NUM_WARPS = 4


@triton.jit
def _tile_stats(s, sel):
    """(n, m, c, M2, min, max) of the selected values of one tile: the mean is ``m + c`` (``m`` the fp32 mean, ``c``
    the mean of the exact differences ``s − m``), so it keeps the digits of a signal whose spread is far below its
    size; ``M2 = Σ (s − m − c)²``."""
    n = tl.sum(sel.to(tl.float32), axis=0)
    m = tl.sum(tl.where(sel, s, 0.0), axis=0) / tl.maximum(n, 1.0)
    d = tl.where(sel, s - m, 0.0)
    c = tl.sum(d, axis=0) / tl.maximum(n, 1.0)
    e = tl.where(sel, d - c, 0.0)
    m2 = tl.sum(e * e, axis=0)
    lo = tl.min(tl.where(sel, s, float("inf")), axis=0)
    hi = tl.max(tl.where(sel, s, -float("inf")), axis=0)
    return n, m, c, m2, lo, hi


@triton.jit
def role_stats_kernel(
    p_s,  # signals [N] fp32
    p_roles,  # [N] int
    p_part,  # [tiles, 2, 6] fp32: (n, m, c, M2, min, max) per role
    N,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    r = tl.load(p_roles + idx, mask=ok, other=0)
    s = tl.load(p_s + idx, mask=ok & (r != 0), other=0.0)
    base = p_part + pid.to(tl.int64) * 12
    for role in tl.static_range(2):
        n, m, c, m2, lo, hi = _tile_stats(s, ok & (r == role + 1))
        tl.store(base + role * 6 + 0, n)
        tl.store(base + role * 6 + 1, m)
        tl.store(base + role * 6 + 2, c)
        tl.store(base + role * 6 + 3, m2)
        tl.store(base + role * 6 + 4, lo)
        tl.store(base + role * 6 + 5, hi)


@triton.jit
def _z(s, r, mu1, lo1, inv1, mu2, lo2, inv2, STANDARDIZE: tl.constexpr):
    """z at role tokens (0 elsewhere); ``μ_r = mu_r + lo_r`` in two fp32 parts, so that ``s − μ_r`` keeps the digits a
    low-variance signal needs (``s − mu_r`` is exact when they are close); inv_r = 1 / (σ_r + eps), or 0 when
    σ_r = 0."""
    if STANDARDIZE:
        z = tl.where(r == 1, ((s - mu1) - lo1) * inv1, ((s - mu2) - lo2) * inv2)
    else:
        z = s
    return tl.where((r == 1) | (r == 2), z, 0.0)


@triton.jit
def _weight(z, r, base, beta1, beta2, u_max, w_min, MAP: tl.constexpr):
    u = tl.minimum(tl.maximum(z - base, -u_max), u_max)
    x = tl.where(r == 1, beta1, beta2) * u
    if MAP == 0:
        w = tl.exp(x)
    elif MAP == 1:
        w = tl.maximum(1.0 + x, w_min)
    else:
        w = 2.0 / (1.0 + tl.exp(-x))
    return tl.where((r == 1) | (r == 2), w, 1.0)


@triton.jit
def role_weights_kernel(
    p_s,  # signals [N] fp32
    p_roles,  # [N] int
    p_cu,  # cu_seqlens [B+1] int64
    p_a,  # advantages [B] fp32
    p_stats,  # [6] fp32: μ_P (hi, lo), 1/(σ_P+eps) or 0, μ_R (hi, lo), 1/(σ_R+eps) or 0
    p_adv,  # out [N] fp32
    p_w,  # out [N] fp32
    p_z,  # out [N] fp32
    p_base,  # out [B] fp32
    beta1,
    beta2,
    u_max,
    w_min,
    MAP: tl.constexpr,
    STANDARDIZE: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # every address offset is int64 (docs/kernels.md, "GPU check")
    start = tl.load(p_cu + b)
    end = tl.load(p_cu + b + 1)
    mu1 = tl.load(p_stats + 0)
    lo1 = tl.load(p_stats + 1)
    inv1 = tl.load(p_stats + 2)
    mu2 = tl.load(p_stats + 3)
    lo2 = tl.load(p_stats + 4)
    inv2 = tl.load(p_stats + 5)
    a = tl.load(p_a + b)
    # (a) the shared baseline
    zsum = tl.zeros([BLOCK], dtype=tl.float32)
    nrole = tl.zeros([BLOCK], dtype=tl.float32)
    off = start  # a while loop, not range(): Triton 3.6's interpreter rejects a tensor bound (D178)
    while off < end:
        idx = off + tl.arange(0, BLOCK)
        ok = idx < end
        r = tl.load(p_roles + idx, mask=ok, other=0)
        s = tl.load(p_s + idx, mask=ok & (r != 0), other=0.0)
        zsum += _z(s, r, mu1, lo1, inv1, mu2, lo2, inv2, STANDARDIZE)
        nrole += ((r == 1) | (r == 2)).to(tl.float32)
        off += BLOCK
    n_role = tl.sum(nrole, axis=0)
    base = tl.where(n_role > 0, tl.sum(zsum, axis=0) / tl.maximum(n_role, 1.0), 0.0)
    tl.store(p_base + b, base)
    # (b) the weights' sum, for the renormalisation
    scale = 1.0
    if RENORM:
        wsum = tl.zeros([BLOCK], dtype=tl.float32)
        off = start
        while off < end:
            idx = off + tl.arange(0, BLOCK)
            ok = idx < end
            r = tl.load(p_roles + idx, mask=ok, other=0)
            s = tl.load(p_s + idx, mask=ok & (r != 0), other=0.0)
            w = _weight(_z(s, r, mu1, lo1, inv1, mu2, lo2, inv2, STANDARDIZE), r, base, beta1, beta2, u_max, w_min, MAP)
            wsum += tl.where(ok, w, 0.0)
            off += BLOCK
        total = tl.sum(wsum, axis=0)
        scale = (end - start).to(tl.float32) / tl.maximum(total, 1.1754943508222875e-38)
    # (c) the writes
    off = start
    while off < end:
        idx = off + tl.arange(0, BLOCK)
        ok = idx < end
        r = tl.load(p_roles + idx, mask=ok, other=0)
        s = tl.load(p_s + idx, mask=ok & (r != 0), other=0.0)
        z = _z(s, r, mu1, lo1, inv1, mu2, lo2, inv2, STANDARDIZE)
        w = _weight(z, r, base, beta1, beta2, u_max, w_min, MAP) * scale
        tl.store(p_z + idx, z, mask=ok)
        tl.store(p_w + idx, w, mask=ok)
        tl.store(p_adv + idx, w * a, mask=ok)
        off += BLOCK


def partial_stats(signals: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """Launch 1: ``[tiles, 2, 6]`` fp32 partials ``(n, m, c, M2, min, max)`` per tile and role."""
    n = signals.numel()
    tiles = triton.cdiv(max(n, 1), BLOCK)
    part = empty((tiles, 2, 6), dtype=torch.float32, device=signals.device)
    with _dispatch.device_guard(signals):
        role_stats_kernel[(tiles,)](signals, roles, part, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return part


def weights(signals, roles, cu_seqlens, advantages, stats, *, beta_perception, beta_reasoning, u_max, w_min,
            weight_map: str, standardize: bool, renorm: bool):
    """Launch 2: ``(adv, w, z) [N]`` and ``baseline [B]``, fp32. ``stats: [6]`` fp32 as ``role_weights_kernel``
    reads it."""
    n, b = signals.numel(), advantages.numel()
    dev = signals.device
    adv, w, z = (empty((n,), dtype=torch.float32, device=dev) for _ in range(3))
    base = empty((b,), dtype=torch.float32, device=dev)
    if b:
        with _dispatch.device_guard(signals):
            role_weights_kernel[(b,)](
                signals, roles, cu_seqlens, advantages, stats, adv, w, z, base,
                float(beta_perception), float(beta_reasoning), float(u_max), float(w_min),
                MAP=MAP_CODES[weight_map], STANDARDIZE=standardize, RENORM=renorm, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
    return adv, w, z, base


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
    """Steps 2-6: ``advantages [B]``, ``signals [N]``, ``roles int [N]``, ``cu_seqlens int64 [B+1]``, fp32 / bf16 /
    fp16 → ``RoleWeights`` (fp32; ``clamped`` left ``None``)."""
    s = signals.to(torch.float32).contiguous()
    r = roles.contiguous()
    stats = _fold(partial_stats(s, r), group)
    mu, sigma = stats[:, 1], stats[:, 2]
    if config.standardize == "batch":
        inv = torch.where(sigma > 0, 1.0 / (sigma + config.eps), 0.0)
    else:
        inv = torch.zeros_like(sigma)
    hi = mu.to(torch.float32)
    lo = (mu - hi.to(torch.float64)).to(torch.float32)  # μ = hi + lo to ~48 bits
    packed = torch.stack([hi[0], lo[0], inv[0].float(), hi[1], lo[1], inv[1].float()])
    adv, w, z, base = weights(
        s, r, cu_seqlens.to(torch.int64).contiguous(), advantages.to(torch.float32).contiguous(), packed,
        beta_perception=config.beta_perception, beta_reasoning=config.beta_reasoning, u_max=config.u_max,
        w_min=config.w_min, weight_map=config.weight_map, standardize=config.standardize == "batch",
        renorm=config.renorm == "mean")
    # The reference reports μ of an empty role as 0 / 1 = 0 and σ = 0; so does this.
    return RoleWeights(adv, w, z, base, stats)


def role_aware_advantages_triton(advantages: torch.Tensor, logp: torch.Tensor, logp_corrupt: torch.Tensor | None,
                                 logp_ablated: torch.Tensor | None, roles: torch.Tensor,
                                 perception_signal: torch.Tensor | None, reasoning_signal: torch.Tensor | None,
                                 cu_seqlens: torch.Tensor, config: SRPOConfig, group=None) -> RoleWeights:
    """SPEC steps 1-6 on packed inputs whose values the public entry has checked (fp32 / bf16 / fp16, fp32 out)."""
    s, clamped = _signals(config, roles, logp, logp_corrupt, logp_ablated, perception_signal, reasoning_signal)
    res = role_weights_triton(advantages, s, roles, cu_seqlens, config, group)
    counts = torch.stack([(clamped & (roles == r)).sum(dtype=torch.float64) for r in (1, 2)])
    if group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    res.clamped = counts
    return res


def _signals(config, roles, logp, logp_corrupt, logp_ablated, perception_signal, reasoning_signal):
    """Step 1 in fp32: ``s: [N]`` (0 at OTHER tokens) and ``clamped: bool [N]``; a role without tokens reads none of
    its inputs."""
    s = torch.zeros(roles.shape, dtype=torch.float32, device=roles.device)
    clamped = torch.zeros(roles.shape, dtype=torch.bool, device=roles.device)
    for code, kind, other, given in ((1, config.perception_contrast, logp_corrupt, perception_signal),
                                     (2, config.reasoning_contrast, logp_ablated, reasoning_signal)):
        sel = roles == code
        if not bool(sel.any()):
            continue
        if given is not None:
            s = torch.where(sel, given.to(torch.float32), s)
            continue
        value, at_bound = signal_and_bound(logp, other, kind, config.clamp, config.k3_max, torch.float32)
        s = torch.where(sel, value, s)
        clamped |= sel & at_bound
    return s, clamped


def _report_entries() -> list[dict]:
    stats = {
        "name": "role_stats",
        "fn": role_stats_kernel,
        "signature": {"p_s": "*fp32", "p_roles": "*i64", "p_part": "*fp32", "N": "i32", "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": BLOCK},
        "num_warps": NUM_WARPS,
        "num_stages": 3,
        "bytes": "N·(4 + 8) read once = floor",
        "load_dtype": "fp32",
    }
    entries = [stats]
    for name, code in MAP_CODES.items():
        entries.append({
            "name": f"role_weights[{name}]",
            "fn": role_weights_kernel,
            "signature": {"p_s": "*fp32", "p_roles": "*i64", "p_cu": "*i64", "p_a": "*fp32", "p_stats": "*fp32",
                          "p_adv": "*fp32", "p_w": "*fp32", "p_z": "*fp32", "p_base": "*fp32", "beta1": "fp32",
                          "beta2": "fp32", "u_max": "fp32", "w_min": "fp32", "MAP": "constexpr",
                          "STANDARDIZE": "constexpr", "RENORM": "constexpr", "BLOCK": "constexpr"},
            "constexprs": {"MAP": code, "STANDARDIZE": True, "RENORM": True, "BLOCK": BLOCK},
            "num_warps": NUM_WARPS,
            "num_stages": 3,
            "bytes": "reads s, roles 3× per trajectory (L2 after the first), writes 3·4·N: DRAM = floor",
            "load_dtype": "fp32",
        })
    return entries


GPU_REPORT = _report_entries()

__all__ = ["GPU_REPORT", "MAP_CODES", "partial_stats", "role_aware_advantages_triton", "role_stats_kernel",
           "role_weights_kernel", "role_weights_triton", "weights"]
