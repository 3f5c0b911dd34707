"""What the CPU path (``srpo_core.cpu.policy_loss``) and the Triton launcher (``srpo_core.kernels.policy_loss``) of
``linear_policy_loss`` share: the per-token loss terms with their explicit derivatives (``token_grads``, one chunk's
accumulation in ``chunk_terms``) and the fp16 helpers that keep the stored gradients clear of fp16's subnormals
(``fp16_scales``, ``fp16_store``, ``mul_fp32(_)``, ``add_grad_weight``).

``L = Σ_t coef_t·ℓ_t(logp_t, H_t)``: ``ℓ_t`` depends on token ``t``'s own log-prob and entropy only (see
``srpo_core.reference.policy_loss``), so either path calls ``chunk_terms`` on a chunk's ``logp`` and ``H`` as soon as
its rows are known and gets ``∂L/∂logp`` back; ``∂L/∂H = −entropy_coeff·coef``.
"""

from __future__ import annotations

import dataclasses

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
N_STATS = 7  # Σ clipped, Σ dual-clipped, Σ ratio, Σ (old − logp), Σ KL, Σ H, number of valid tokens


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The per-token part of ``PolicyLossConfig`` that the paths read (``epsilon_high`` resolved, floats)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    clip_ratio_c: float | None = None
    beta: float = 0.0
    kl_kind: str = "k3"
    entropy_coeff: float = 0.0
    kl_ratio_correction: bool = False


def _kl_and_grad(logp, ref, kind):
    """``(KL_t, ∂KL_t/∂logp_t)`` for the kinds of ``reference.policy_loss.kl_penalty`` (same clamps, same
    subgradients as autograd through ``torch.clamp``)."""
    d = ref - logp
    if kind == "k1":
        return -d, torch.ones_like(d)
    if kind == "k2":
        return 0.5 * d * d, -d
    if kind == "k3":
        ed = torch.exp(d)
        return ed - d - 1, 1 - ed
    dc = torch.clamp(d, -20.0, 20.0)
    ed = torch.exp(dc)
    kv = ed - dc - 1
    live = (d >= -20.0) & (d <= 20.0) & (kv >= -10.0) & (kv <= 10.0)
    return torch.clamp(kv, -10.0, 10.0), torch.where(live, 1 - ed, torch.zeros_like(ed))


def token_grads(logp, old, adv, ref, ent, cfg: LossConfig):
    """Per token: ``(ℓ, ∂ℓ/∂logp, stats [N_STATS - 1, k])`` (``∂ℓ/∂H = −entropy_coeff``, a constant).

    Derivatives follow autograd's conventions on the reference's ops: ``clamp`` passes the gradient on its closed
    interval, ``maximum``/``minimum`` split it evenly at a tie."""
    lr = logp - old
    inside = (lr >= -20.0) & (lr <= 20.0)
    ratio = torch.exp(torch.clamp(lr, -20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    clipped = pg2 > pg1
    pg = torch.maximum(pg1, pg2)
    d_ratio = torch.where(clipped, torch.zeros_like(adv), -adv)  # pg1 == pg2 only inside the range (or A = 0)
    zero = torch.zeros_like(adv)
    if cfg.clip_ratio_c is not None:
        pg3 = -adv * cfg.clip_ratio_c
        neg = adv < 0
        dual = (pg > pg3) & neg
        d_dual = torch.where(pg < pg3, d_ratio, torch.where(pg > pg3, zero, 0.5 * d_ratio))
        d_ratio = torch.where(neg, d_dual, d_ratio)
        pg = torch.where(neg, torch.minimum(pg, pg3), pg)
    else:
        dual = torch.zeros_like(clipped)
    loss = pg
    d_logp = torch.where(inside, d_ratio * ratio, zero)
    kl = zero
    if ref is not None:
        kl, d_kl = _kl_and_grad(logp, ref, cfg.kl_kind)
        if cfg.kl_ratio_correction:  # r·KL: d/dlogp = r·dKL + KL·r (the ratio's own clamp applies)
            d_kl = ratio * d_kl + torch.where(inside, kl * ratio, zero)
            kl = kl * ratio
        if cfg.beta != 0:
            loss = loss + cfg.beta * kl
            d_logp = d_logp + cfg.beta * d_kl
    if cfg.entropy_coeff != 0:
        loss = loss - cfg.entropy_coeff * ent
    stats = torch.stack([clipped.to(adv.dtype), dual.to(adv.dtype), ratio, old - logp, kl,
                         ent if ent is not None else zero])
    return loss, d_logp, stats




def chunk_terms(lp, ent, old, adv, ref, coef, live, cfg: LossConfig, loss, stats):
    """One chunk's per-token terms (``[k]`` each; ``old`` None: on-policy, ``π_old = π`` detached; ``ref``, ``ent``,
    ``live`` may be None): adds ``Σ coef·ℓ`` to ``loss`` and the stats' sums to ``stats[:-1]`` in place and returns
    ``coef·∂ℓ/∂logp [k]``. With ``live`` (the sync-free path) the other rows add nothing: a masked row's terms may
    overflow (e.g. k3 of its zeroed ref_logp), so ``where``, not ``· 0``."""
    ell, d_lp, st = token_grads(lp, lp if old is None else old, adv, ref, ent, cfg)
    if live is not None:
        ell, d_lp, st = (torch.where(live, ell, 0.0), torch.where(live, d_lp, 0.0),
                         torch.where(live[None, :], st, 0.0))
    loss += (ell * coef).sum()
    stats[:-1] += st.sum(1)
    return d_lp * coef


SCALE_BLOCK = 1 << 22  # elements per fp32 block of ``mul_fp32_`` (16 MiB)


def mul_fp32_(x, f):
    """``x *= f`` in place, the product computed in fp32 with one rounding to ``x``'s dtype; ``f`` a 0-dim or
    ``[x.shape[-1]]`` fp32 tensor (on ``x``'s device). ``x.mul_(f)`` would not do for bf16/fp16 on CUDA: there only a
    CPU scalar is read in the computation dtype, a 0-dim *device* tensor is cast to ``x``'s dtype first (an fp32
    ``2^-30`` is 0 in fp16, ``1/3`` is 0.334 in bf16). bf16/fp16 go through fp32 copies of at most ``SCALE_BLOCK``
    elements (rows of a contiguous ``x``); no value is read on the host."""
    if x.dtype not in LOW_PRECISION:
        return x.mul_(f)
    if x.numel() == 0:
        return x
    rows = x.view(-1, x.shape[-1])
    for blk in rows.split(max(1, SCALE_BLOCK // rows.shape[1])):
        blk.copy_(blk.float().mul_(f))
    return x


def mul_fp32(x, f):
    """``x·f`` (a new contiguous tensor in ``x``'s dtype) computed in fp32 with one rounding, as ``mul_fp32_``."""
    if x.dtype not in LOW_PRECISION:
        return x * f
    return mul_fp32_(x.contiguous() if not x.is_contiguous() else x.clone(), f)


def add_grad_weight(gw, gw_acc, g, h, *, first: bool, inv=None) -> None:
    """``grad_weight += gᵀ @ h`` for one chunk (``first``: ``=``). With ``gw_acc`` (bf16/fp16 over several chunks) the
    chunk's GEMM lands in ``gw`` (the output's own buffer: a fresh ``[V, H]`` per chunk costs more in page faults than
    the GEMM) and is summed into the fp32 ``gw_acc``; the caller copies ``gw_acc`` into ``gw`` after the last chunk.
    ``inv`` (fp16, fp32 powers of two, 0-dim or one per column ``[H]``): ``g`` or ``h`` came scaled
    (``fp16_scales``), the GEMM's result is multiplied by ``inv`` in fp32 into ``gw_acc``; a single chunk's ``gw``
    stays scaled (``inv`` is its stored scale, applied with the upstream seed in the backward: see ``fp16_store``)."""
    if gw_acc is not None:
        torch.mm(g.T, h, out=gw)
        if inv is not None:  # fp32 (gw_acc's dtype) is the computation dtype: torch.mul(gw, inv, out=) rounds in fp16
            (gw_acc.zero_() if first else gw_acc).addcmul_(gw, inv)
        else:
            gw_acc.copy_(gw) if first else gw_acc.add_(gw)
    elif first:
        torch.mm(g.T, h, out=gw)
    else:
        gw.addmm_(g.T, h)


# fp16 has 5 exponent bits: G = coef·(δ − p)·∂ℓ/τ falls below its smallest subnormal (6e-8) at token-mean coefficients
# and p ≈ 1/V. Each chunk's tile is written as S·G and GEMM 3 reads h·R (S, R powers of two, so both scalings and
# their inverses are exact), the GEMMs' results are unscaled in fp32. FP16_TARGET bounds every scaled tile entry and
# GEMM output (fp16's largest finite value is 65504 ≈ 2^16: a 4× margin).
FP16_TARGET = 2.0 ** 14


def _pow2_at_most(x):
    """The largest power of two ≤ ``x`` (a tensor), its exponent clamped to [-60, 60]; NaN stays NaN."""
    return torch.exp2(torch.floor(torch.log2(x)).clamp(-60.0, 60.0))


def fp16_store(x, out=None):
    """An fp32 gradient ``x`` → ``(x·Q in fp16, 1/Q)``, ``Q`` a power of two (0-dim fp32, on the device) that puts
    ``max|x·Q|`` in ``(2^13, 2^14]``: the stored fp16 gradient keeps fp16's full relative precision wherever the
    value is within 2^24 of the largest, and the backward multiplies it by ``seed/Q`` in fp32 with one rounding, so
    a loss scale (GradScaler's seed) recovers what a seed of 1 would round into fp16's subnormals."""
    if x.numel() == 0:
        q = torch.ones((), dtype=torch.float32, device=x.device)
    else:
        q = _pow2_at_most(FP16_TARGET / x.abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny))
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    torch.mul(x, q, out=out)  # computed in x's dtype (fp32), one rounding to fp16
    return out, 1.0 / q


def fp16_scales(g_logp, g_ent, ent, inv_tau: float, w_absmax, h):
    """``(S, R)``, fp32 powers of two computed on the device (no host read) for one chunk of the fp16 path: ``S``
    0-dim, ``R [H]`` one per hidden column.

    ``G[t, v] = (g_l δ − g_l p_v − g_H p_v (log p_v + H_t))/τ`` (``g_l = ∂L/∂logp_t``, ``g_H = ∂L/∂H_t``) has
    ``max_v |G[t]| ≤ a_t = (|g_l| + |g_H|(1/e + H_t))/τ`` and ``Σ_v |G[t]| ≤ b_t = (2|g_l| + 2|g_H| H_t)/τ``, so
    ``S = pow2(TARGET / max(max_t a_t, max|W|·max_t b_t))`` keeps the tile and ``S·G @ W`` below TARGET, and
    ``R_j = pow2(TARGET / (S·max_t|h_tj|·Σ_t a_t))`` (at most 1) keeps column ``j`` of ``(S·G)ᵀ (h·R)`` below it: the
    largest entries land near TARGET, far above fp16's subnormals, whatever the coefficients' scale, and a hidden
    column with outliers lowers its own ``R_j`` only (one ``R`` for all columns pushed the others into the
    subnormals, D206)."""
    f32 = torch.float32
    g = g_logp.abs().to(f32)
    a, b = g, 2 * g
    if g_ent is not None:
        ge, hh = g_ent.abs().to(f32), ent.to(f32).clamp(min=0)
        a = a + ge * (0.36787944117144233 + hh)
        b = b + 2 * ge * hh
    a, b = a * inv_tau, b * inv_tau
    tiny = torch.finfo(f32).tiny
    s = _pow2_at_most(FP16_TARGET / torch.maximum(a.amax(), b.amax() * w_absmax).clamp(min=tiny))
    gemm3 = s * a.sum() * h.abs().amax(0).to(f32)
    r = _pow2_at_most(FP16_TARGET / gemm3.clamp(min=tiny)).clamp(max=1.0)
    return s, r
