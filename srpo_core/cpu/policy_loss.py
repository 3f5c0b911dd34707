"""Fast path of ``linear_policy_loss``: loss, per-token outputs and all gradients in one chunked pass (torch ops,
any device; the default off-GPU).

The loss is a sum of per-token terms, ``L = Σ_t coef_t·ℓ_t(logp_t, H_t)`` (see ``srpo_core.reference.policy_loss``),
and ``ℓ_t`` depends on token ``t``'s own log-prob and entropy only, so ``∂L/∂logits`` of a token is known as soon as
that token's row is. Per chunk of ``k`` tokens (full vocabulary rows, ``[k, V]``, in base-2 units
``u₂ = (h·Wᵀ + b)·log₂e/τ``):

    u₂ ← addmm(h, Wᵀ, α = log₂e/τ)                           GEMM 1 (the logits tile, written once)
    m = max_v u₂;  x = u₂ − m;  e = 2^x;  s = Σ e            (in place)
    logp = ln2·(u₂[id] − m − log₂ s);  H = ln2·(log₂ s − Σ e·x / s)
    (ℓ, ∂ℓ/∂logp, ∂ℓ/∂H) per token (``token_grads``, explicit derivatives)
    G = p·(a + b·x) + c·onehot   (∂L/∂logits, in place)       a, b, c per token, p = e/s
    grad_hidden[chunk] = G @ W                               GEMM 2
    grad_weight += Gᵀ @ h;  grad_bias += Σ_t G               GEMM 3

So forward + backward is the three GEMMs plus a handful of elementwise passes over the tile; nothing is recomputed
and the peak extra memory is one (two with entropy) ``[k, V]`` tile. The chunk is ``TOKEN_CHUNK`` tokens (capped so a
tile holds at most ``CHUNK_ELEMENTS`` values): large enough that each chunk's GEMMs run at full speed (the weight is
streamed once per GEMM per chunk), small enough to stay under 1/8 of the naive ``[N, V]`` buffers at N = 1024.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from srpo_core._dispatch import empty

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOW_PRECISION = (torch.bfloat16, torch.float16)
TOKEN_CHUNK = int(os.environ.get("SRPO_POLICY_LOSS_TOKEN_CHUNK", 192))
CHUNK_ELEMENTS = int(os.environ.get("SRPO_POLICY_LOSS_CHUNK_ELEMENTS", 1 << 26))
# a chunk size set through the environment is the user's cap: then bf16/fp16 never take the one-chunk path (D152)
USER_CAPS = any(k in os.environ for k in ("SRPO_POLICY_LOSS_TOKEN_CHUNK", "SRPO_POLICY_LOSS_CHUNK_ELEMENTS"))
N_STATS = 7  # Σ clipped, Σ dual-clipped, Σ ratio, Σ (old − logp), Σ KL, Σ H, number of valid tokens


@dataclasses.dataclass(frozen=True)
class LossConfig:
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    clip_ratio_c: float | None = None
    beta: float = 0.0
    kl_kind: str = "k3"
    entropy_coeff: float = 0.0
    kl_ratio_correction: bool = False


def token_chunk(n: int, v: int) -> int:
    return max(1, min(n, TOKEN_CHUNK, CHUNK_ELEMENTS // max(v, 1)))


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


def _logits_tile(h, weight, bias, scale, out, low_buf):
    """``out = (h @ Wᵀ + b)·scale`` in the accumulation dtype. bf16/fp16: the logits are computed (and rounded) in the
    input dtype first, as the model's own LM head computes them (D48)."""
    if low_buf is not None:
        if bias is None:
            torch.mm(h, weight.T, out=low_buf)
        else:
            torch.addmm(bias, h, weight.T, out=low_buf)
        out.copy_(low_buf).mul_(scale)  # upcast first: a bf16 × scale would round the logits a second time
    elif bias is None:
        torch.addmm(out, h, weight.T, beta=0, alpha=scale, out=out)
    else:
        out.copy_((bias * scale).to(out.dtype)[None, :].expand_as(out))
        torch.addmm(out, h, weight.T, alpha=scale, out=out)


def _shifted_tile(h, weight, bias, scale, c, out):
    """``out = (h @ Wᵀ + b)·scale − c[:, None]`` with the shift and the bias folded into the GEMM's accumulator."""
    if bias is None:
        torch.addmm((-c)[:, None], h, weight.T, alpha=scale, out=out)
    else:
        torch.sub((bias * scale).to(out.dtype)[None, :], c[:, None], out=out)
        torch.addmm(out, h, weight.T, alpha=scale, out=out)


DOT_BLOCK = 2048  # vocabulary rows per block of the entropy's Σ e·x (a [k, DOT_BLOCK] temporary)


def _tile(buf, k, v):
    """A ``[k, V]`` tile stored vocabulary-major (``[V, k]`` in memory, strides ``(1, k)``): GEMM 1 then computes
    ``W @ hᵀ``, whose long side is the vocabulary; with ``k`` ≈ 200 tokens a chunk that runs measurably faster than
    ``h @ Wᵀ`` at two threads (the weight is streamed once per chunk either way). The elementwise passes and the row
    reductions see a dense tensor and keep their speed."""
    return buf[: k * v].view(v, k).T


def _exp_rows(x, ids, e_buf):
    """``x [k, V]`` (shifted base-2 logits) → ``(x[id], e = 2^x, s = Σ e, Σ e·x | None)``; ``e`` overwrites ``x``
    unless ``e_buf`` is given (the entropy needs both)."""
    tgt = x.gather(1, ids[:, None])[:, 0]
    if e_buf is None:
        e = x.exp2_()
        return tgt, e, e.sum(1), None
    torch.exp2(x, out=e_buf)
    ex = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for j in range(0, x.shape[1], DOT_BLOCK):  # Σ e·x over vocabulary blocks: no [k, V] temporary
        ex += torch.linalg.vecdot(e_buf[:, j:j + DOT_BLOCK], x[:, j:j + DOT_BLOCK], dim=1)
    return tgt, e_buf, e_buf.sum(1), ex


def fused_fwd_bwd(hidden, weight, bias, ids, old, adv, ref, coef, *, inv_tau: float, want_entropy: bool,
                  cfg: LossConfig, needs: tuple[bool, bool, bool], valid=None):
    """All rows valid (the caller compacts), or, with ``valid [n]`` bool (the sync-free path), the rows where it
    is False are computed and masked out: their inputs must be finite (the caller zeroes them) and they add nothing
    to the loss, the stats or the gradients; no step reads a value on the host then. ``hidden [n, H]``,
    ``weight [V, H]``, ``bias [V] | None``, ``ids/old/adv/coef [n]``, ``old [n] | None`` (None: on-policy),
    ``ref [n] | None`` → ``(loss [], logp [n], entropy [n] | None, stats [N_STATS], grad_hidden [n, H] | None,
    grad_weight | None, grad_bias | None, gw_inv | None)``; gradients of ``loss`` (acc dtype, grad_weight in
    weight's dtype). fp16: each chunk's ``G`` is written as ``S·G`` and GEMM 3 reads ``R·h`` (``fp16_scales``),
    unscaled in fp32; ``grad_weight`` is returned scaled, ``gw_inv`` (0-dim, or ``[H]``: one factor per column)
    times it is the gradient."""
    n, hd = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    low = hidden.dtype in LOW_PRECISION
    need_h, need_w, need_b = needs
    scaled = hidden.dtype == torch.float16 and any(needs)  # G written as S·G (fp16_scales)
    w_absmax = weight.abs().amax().float() if scaled else None
    need_ent = want_entropy or cfg.entropy_coeff != 0
    scale = inv_tau * LOG2E
    k_max = token_chunk(n, v)
    if low and need_w and not USER_CAPS and n * (10 if need_ent else 6) <= 8 * hd:
        # bf16/fp16: several chunks need an fp32 [V, H] sum of their grad_weight GEMMs (4·H bytes per vocab row, one
        # pass over it per chunk); one chunk of all n tokens needs tiles of 6 (10 with entropy) bytes per token and
        # vocab row instead. Up to twice the accumulator's bytes, the single chunk is the faster choice (D152).
        k_max = n
    multi = k_max < n
    buf = empty((k_max * v,), dtype=acc, device=dev)
    buf_e = empty((k_max * v,), dtype=acc, device=dev) if need_ent else None
    buf_low = torch.empty(k_max * v, dtype=hidden.dtype, device=dev) if low else None
    gh = empty((n, hd), dtype=acc, device=dev) if need_h else None
    gw_acc = None
    if need_w:
        gw = empty(tuple(weight.shape), dtype=weight.dtype, device=dev)
        if low and multi:
            gw_acc = empty((v, hd), dtype=acc, device=dev)
    else:
        gw = None
    gb = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    logp = empty((n,), dtype=acc, device=dev)
    ent = empty((n,), dtype=acc, device=dev) if need_ent else None
    loss = torch.zeros((), dtype=acc, device=dev)
    stats = torch.zeros(N_STATS, dtype=acc, device=dev)
    stats[-1] = n if valid is None else valid.sum()
    inv_w = None
    for n0 in range(0, n, k_max):
        n1 = min(n, n0 + k_max)
        k = n1 - n0
        h = hidden[n0:n1]
        idc = ids[n0:n1]
        u = _tile(buf, k, v)
        low_t = _tile(buf_low, k, v) if low else None
        if low or valid is not None:  # bf16/fp16: logits rounded in the input dtype first (D48), then an explicit
            _logits_tile(h, weight, bias, scale, u, low_t)  # row max (sync-free: no overflow check, below)
            m = u.amax(1)
            u.sub_(m[:, None])  # x = u₂ − m ≤ 0
        else:  # shift by the sampled token's own logit, subtracted by the GEMM itself: no max pass, no sub pass
            m = (h * weight[idc]).sum(1, dtype=acc) * scale
            if bias is not None:
                m = m + bias[idc].to(acc) * scale
            _shifted_tile(h, weight, bias, scale, m, u)
        tgt, e, s, ex = _exp_rows(u, idc, _tile(buf_e, k, v) if need_ent else None)
        bad = ~torch.isfinite(s)
        # a logit > 127 bits above the sampled one: redo those rows with their max
        if not low and valid is None and bool(bad.any()):
            rows = torch.nonzero(bad)[:, 0]
            ur = torch.empty(rows.numel(), v, dtype=acc, device=dev)
            _logits_tile(h[rows], weight, bias, scale, ur, None)
            mr = ur.amax(1)
            ur.sub_(mr[:, None])
            tr, er, sr, exr = _exp_rows(ur, idc[rows], torch.empty_like(ur) if need_ent else None)
            m, tgt, s = m.index_put((rows,), mr), tgt.index_put((rows,), tr), s.index_put((rows,), sr)
            e[rows] = er
            if need_ent:
                u[rows] = ur
                ex = ex.index_put((rows,), exr)
        log2s = torch.log2(s)
        lp = (tgt - log2s) * LN2
        logp[n0:n1] = lp
        h_t = None
        if need_ent:
            h_t = (log2s - ex / s) * LN2
            ent[n0:n1] = h_t
        c_t = coef[n0:n1]
        old_c = lp if old is None else old[n0:n1]  # None: on-policy, π_old = π (detached)
        ell, d_lp, st = token_grads(lp, old_c, adv[n0:n1], None if ref is None else ref[n0:n1], h_t, cfg)
        if valid is not None:  # a masked row's terms may overflow (e.g. k3 of its zeroed ref_logp): where, not · 0
            live = valid[n0:n1]
            ell, d_lp, st = (torch.where(live, ell, 0.0), torch.where(live, d_lp, 0.0),
                             torch.where(live[None, :], st, 0.0))
        loss += (ell * c_t).sum()
        stats[:-1] += st.sum(1)
        if not (need_h or need_w or need_b):
            continue
        d_lp = d_lp * c_t
        c_one = d_lp * inv_tau
        d_h = -cfg.entropy_coeff * c_t if cfg.entropy_coeff != 0 else None
        if d_h is not None:  # G = e/s·(a + b·x): ∂H/∂u_v = −p_v(ln p_v + H), ln p_v = ln2·(x_v − log₂ s)
            a = (-d_lp - d_h * h_t + d_h * LN2 * log2s) * inv_tau / s
            b = -d_h * LN2 * inv_tau / s
            g = u.mul_(b[:, None]).add_(a[:, None]).mul_(e)
        else:
            g = e.mul_((-c_one / s)[:, None])
        g.index_put_((torch.arange(k, device=dev), idc), c_one, accumulate=True)
        if need_b:
            gb += g.sum(0)
        inv_s = inv_w = None
        if scaled:  # fp16: S·G in the tile, h·R into GEMM 3, both GEMMs' results unscaled in fp32
            s16, r16 = fp16_scales(d_lp, d_h, h_t, inv_tau, w_absmax, h)
            gm = torch.mul(g, s16, out=low_t)  # fp32 product, one rounding to fp16
            inv_s, inv_w = 1.0 / s16, 1.0 / (s16 * r16)
        else:
            gm = low_t.copy_(g) if low else g
        if need_h:
            if low:
                gh[n0:n1] = torch.mm(gm, weight)
                if inv_s is not None:
                    gh[n0:n1].mul_(inv_s)
            else:
                torch.mm(gm, weight, out=gh[n0:n1])
        if need_w:
            add_grad_weight(gw, gw_acc, gm, h if not scaled else mul_fp32(h, r16), first=n0 == 0, inv=inv_w)
    gw_inv = inv_w if (scaled and need_w) else None  # one fp16 chunk: gw[:, j] holds (S·R_j)·grad[:, j]
    if gw_acc is not None:
        if scaled:
            gw, gw_inv = fp16_store(gw_acc, out=gw)
        else:
            gw.copy_(gw_acc)
    return loss, logp, ent, stats, gh, gw, gb, gw_inv
