"""Fast path of ``linear_policy_loss``: loss, per-token outputs and all gradients in one chunked pass (torch ops,
any device; the default off-GPU).

The loss is a sum of per-token terms, ``L = Σ_t coef_t·ℓ_t(logp_t, H_t)`` (see ``srpo_core.reference.policy_loss``),
and ``ℓ_t`` depends on token ``t``'s own log-prob and entropy only, so ``∂L/∂logits`` of a token is known as soon as
that token's row is. Per chunk of ``k`` tokens (full vocabulary rows, ``[k, V]``, in base-2 units
``u₂ = (h·Wᵀ + b)·log₂e/τ``):

    u₂ ← addmm(h, Wᵀ, α = log₂e/τ)                           GEMM 1 (the logits tile, written once)
    m = max_v u₂;  x = u₂ − m;  e = 2^x;  s = Σ e            (in place)
    logp = ln2·(u₂[id] − m − log₂ s);  H = ln2·(log₂ s − Σ e·x / s)
    (ℓ, ∂ℓ/∂logp, ∂ℓ/∂H) per token (``common.policy_loss.chunk_terms``, explicit derivatives)
    G = p·(a + b·x) + c·onehot   (∂L/∂logits, in place)       a, b, c per token, p = e/s
    grad_hidden[chunk] = G @ W                               GEMM 2
    grad_weight += Gᵀ @ h;  grad_bias += Σ_t G               GEMM 3

So forward + backward is the three GEMMs plus a handful of elementwise passes over the tile; nothing is recomputed
and the peak extra memory is one (two with entropy) ``[k, V]`` tile. The chunk is ``TUNING.policy_loss_token_chunk``
tokens (capped so a tile holds at most ``TUNING.policy_loss_chunk_elements`` values): large enough that each chunk's
GEMMs run at full speed (the weight is streamed once per GEMM per chunk), small enough to stay under 1/8 of the naive
``[N, V]`` buffers at N = 1024.
"""

from __future__ import annotations

import dataclasses

import torch

from srpo_core._dispatch import empty
from srpo_core.common.policy_loss import (
    LOW_PRECISION,
    N_STATS,
    LossConfig,
    add_grad_weight,
    chunk_terms,
    fp16_scales,
    fp16_store,
    mul_fp32,
)
from srpo_core.tuning import TUNING

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def user_caps() -> bool:
    """Whether a chunk size came from the environment: the user's cap, so bf16/fp16 never take the one-chunk path
    (D152)."""
    return bool({"policy_loss_token_chunk", "policy_loss_chunk_elements"} & TUNING.user_set)


def token_chunk(n: int, v: int) -> int:
    return max(1, min(n, TUNING.policy_loss_token_chunk, TUNING.policy_loss_chunk_elements // max(v, 1)))


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
    blk = max(1, TUNING.policy_loss_dot_block)
    for j in range(0, x.shape[1], blk):  # Σ e·x over vocabulary blocks: no [k, V] temporary
        ex += torch.linalg.vecdot(e_buf[:, j:j + blk], x[:, j:j + blk], dim=1)
    return tgt, e_buf, e_buf.sum(1), ex


def _chunk_tokens(n: int, v: int, hd: int, *, low: bool, need_w: bool, need_ent: bool) -> int:
    """Tokens per chunk: ``token_chunk``, except for bf16/fp16 with ``grad_weight`` (below)."""
    k_max = token_chunk(n, v)
    if low and need_w and not user_caps() and n * (10 if need_ent else 6) <= 8 * hd:
        # bf16/fp16: several chunks need an fp32 [V, H] sum of their grad_weight GEMMs (4·H bytes per vocab row, one
        # pass over it per chunk); one chunk of all n tokens needs tiles of 6 (10 with entropy) bytes per token and
        # vocab row instead. Up to twice the accumulator's bytes, the single chunk is the faster choice (D152).
        k_max = n
    return k_max


@dataclasses.dataclass
class _Pass:
    """One call's settings, tile buffers and outputs, shared by its chunks' forward and backward steps."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    inv_tau: float
    cfg: LossConfig
    needs: tuple[bool, bool, bool]
    need_ent: bool
    masked: bool  # the sync-free path: rows with ``valid`` False are computed and masked out
    k_max: int
    acc: torch.dtype = dataclasses.field(init=False)
    low: bool = dataclasses.field(init=False)
    scaled: bool = dataclasses.field(init=False)

    def allocate(self, hidden, n: int) -> None:
        hd, v, dev, k_max = hidden.shape[1], self.weight.shape[0], hidden.device, self.k_max
        need_h, need_w, need_b = self.needs
        self.acc = acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.low = low = hidden.dtype in LOW_PRECISION
        self.scaled = hidden.dtype == torch.float16 and any(self.needs)  # G written as S·G (fp16_scales)
        self.w_absmax = self.weight.abs().amax().float() if self.scaled else None
        self.scale = self.inv_tau * LOG2E
        self.buf = empty((k_max * v,), dtype=acc, device=dev)
        self.buf_e = empty((k_max * v,), dtype=acc, device=dev) if self.need_ent else None
        self.buf_low = torch.empty(k_max * v, dtype=hidden.dtype, device=dev) if low else None
        self.gh = empty((n, hd), dtype=acc, device=dev) if need_h else None
        self.gw_acc = None
        if need_w:
            self.gw = empty(tuple(self.weight.shape), dtype=self.weight.dtype, device=dev)
            if low and k_max < n:
                self.gw_acc = empty((v, hd), dtype=acc, device=dev)
        else:
            self.gw = None
        self.gb = torch.zeros(v, dtype=acc, device=dev) if need_b else None
        self.logp = empty((n,), dtype=acc, device=dev)
        self.ent = empty((n,), dtype=acc, device=dev) if self.need_ent else None
        self.loss = torch.zeros((), dtype=acc, device=dev)
        self.stats = torch.zeros(N_STATS, dtype=acc, device=dev)


def _chunk_forward(p: _Pass, h, idc, k: int):
    """GEMM 1 and the row passes of one chunk → ``(x, e, s, log₂ s, logp, H | None)``: ``x`` the shifted base-2
    logits tile, ``e = 2^x`` (the entropy's own tile, or ``x`` overwritten), ``s = Σ e``."""
    weight, bias, scale, acc = p.weight, p.bias, p.scale, p.acc
    v = weight.shape[0]
    dev = h.device
    u = _tile(p.buf, k, v)
    low_t = _tile(p.buf_low, k, v) if p.low else None
    if p.low or p.masked:  # bf16/fp16: logits rounded in the input dtype first (D48), then an explicit
        _logits_tile(h, weight, bias, scale, u, low_t)  # row max (sync-free: no overflow check, below)
        m = u.amax(1)
        u.sub_(m[:, None])  # x = u₂ − m ≤ 0
    else:  # shift by the sampled token's own logit, subtracted by the GEMM itself: no max pass, no sub pass
        m = (h * weight[idc]).sum(1, dtype=acc) * scale
        if bias is not None:
            m = m + bias[idc].to(acc) * scale
        _shifted_tile(h, weight, bias, scale, m, u)
    need_ent = p.need_ent
    tgt, e, s, ex = _exp_rows(u, idc, _tile(p.buf_e, k, v) if need_ent else None)
    # A logit more than 64 bits above the sampled one: redo those rows shifted by their max. Past 127 bits Σ e
    # overflows, from ~121 bits Σ e·x (the entropy) does, and long before either the backward's factors 1/s fall into
    # fp32's subnormals and lose precision; such a sampled token has probability below 2^-64, so the redo is rare.
    bad = ~(s <= 2.0 ** 64)
    if not p.low and not p.masked and bool(bad.any()):
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
    h_t = None
    if need_ent:
        h_t = (log2s - ex / s) * LN2
    return u, e, s, log2s, lp, h_t


def _chunk_backward(p: _Pass, n0: int, h, idc, fwd, d_lp, c_t):
    """``G = ∂L/∂logits`` in place in one chunk's tile, then GEMM 2 (``grad_hidden``), GEMM 3 (``grad_weight``) and
    ``grad_bias``; ``d_lp`` is ``coef·∂ℓ/∂logp``. → fp16: ``1/(S·R)`` of this chunk's GEMM 3, else None."""
    u, e, s, log2s, _, h_t = fwd
    need_h, need_w, need_b = p.needs
    k, v = h.shape[0], p.weight.shape[0]
    inv_tau, low, weight = p.inv_tau, p.low, p.weight
    low_t = _tile(p.buf_low, k, v) if low else None
    c_one = d_lp * inv_tau
    d_h = -p.cfg.entropy_coeff * c_t if p.cfg.entropy_coeff != 0 else None
    if d_h is not None:  # G = e/s·(a + b·x): ∂H/∂u_v = −p_v(ln p_v + H), ln p_v = ln2·(x_v − log₂ s)
        a = (-d_lp - d_h * h_t + d_h * LN2 * log2s) * inv_tau / s
        b = -d_h * LN2 * inv_tau / s
        g = u.mul_(b[:, None]).add_(a[:, None]).mul_(e)
    else:
        g = e.mul_((-c_one / s)[:, None])
    g.index_put_((torch.arange(k, device=h.device), idc), c_one, accumulate=True)
    if need_b:
        p.gb += g.sum(0)
    inv_s = inv_w = None
    if p.scaled:  # fp16: S·G in the tile, h·R into GEMM 3, both GEMMs' results unscaled in fp32
        s16, r16 = fp16_scales(d_lp, d_h, h_t, inv_tau, p.w_absmax, h)
        gm = torch.mul(g, s16, out=low_t)  # fp32 product, one rounding to fp16
        inv_s, inv_w = 1.0 / s16, 1.0 / (s16 * r16)
    else:
        gm = low_t.copy_(g) if low else g
    n1 = n0 + k
    if need_h:
        if low:
            p.gh[n0:n1] = torch.mm(gm, weight)
            if inv_s is not None:
                p.gh[n0:n1].mul_(inv_s)
        else:
            torch.mm(gm, weight, out=p.gh[n0:n1])
    if need_w:
        add_grad_weight(p.gw, p.gw_acc, gm, h if not p.scaled else mul_fp32(h, r16), first=n0 == 0, inv=inv_w)
    return inv_w


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
    need_ent = want_entropy or cfg.entropy_coeff != 0
    k_max = _chunk_tokens(n, v, hd, low=hidden.dtype in LOW_PRECISION, need_w=needs[1], need_ent=need_ent)
    p = _Pass(weight, bias, inv_tau, cfg, needs, need_ent, valid is not None, k_max)
    p.allocate(hidden, n)
    p.stats[-1] = n if valid is None else valid.sum()
    inv_w = None
    for n0 in range(0, n, k_max):
        n1 = min(n, n0 + k_max)
        h, idc = hidden[n0:n1], ids[n0:n1]
        fwd = _chunk_forward(p, h, idc, n1 - n0)
        lp, h_t = fwd[4], fwd[5]
        p.logp[n0:n1] = lp
        if need_ent:
            p.ent[n0:n1] = h_t
        c_t = coef[n0:n1]
        d_lp = chunk_terms(lp, h_t, None if old is None else old[n0:n1], adv[n0:n1],
                           None if ref is None else ref[n0:n1], c_t, None if valid is None else valid[n0:n1], cfg,
                           p.loss, p.stats)
        if any(needs):
            inv_w = _chunk_backward(p, n0, h, idc, fwd, d_lp, c_t)
    gw, gw_inv = p.gw, (inv_w if (p.scaled and needs[1]) else None)  # one fp16 chunk: gw[:, j] holds (S·R_j)·grad
    if p.gw_acc is not None:
        if p.scaled:
            gw, gw_inv = fp16_store(p.gw_acc, out=gw)
        else:
            gw.copy_(p.gw_acc)
    return p.loss, p.logp, p.ent, p.stats, p.gh, gw, p.gb, gw_inv
