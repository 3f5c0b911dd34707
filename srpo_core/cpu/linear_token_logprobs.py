"""The torch path of ``linear_token_logprobs`` (the default off-GPU): vocabulary-tiled forward and backward passes
that never hold more than one ``[token_chunk, vocab_tile]`` logits tile; see ``srpo_core.ops.linear_token_logprobs``
for the math and docs/decisions.md D49 / D56 for the tiling and the recomputing backward."""

from __future__ import annotations

import math

import torch

from srpo_core.tuning import TUNING

LOW_PRECISION = (torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------------------------------
# Tile sizes of the torch path (chosen by measurement on a 2-core AVX-512 CPU: vocabulary tiles of 512-2048 and tiles
# of 1-4 M elements all ran within a few % of each other and ~5-8% under the bare GEMM; see docs/benchmarks_linear.md).
# A logits tile holds at most TUNING.linear_tile_elements values; vocabulary tiles are TUNING.linear_vocab_tile wide
# (each weight tile, linear_vocab_tile·H values, is read once per pass and stays in the last-level cache while the
# token chunks stream past it); token chunks take the rest of the budget (2048 tokens × 1024 vocabulary entries =
# 8 MiB fp32 by default).
# Peak extra memory of a pass = one fp32 tile (+ one low-precision tile for bf16/fp16, + one more fp32 tile when the
# entropy is requested) + O(N) per-token state (+ in backward the fp32 grad_hidden accumulator, [N, H]).
# The forward's tiles are TUNING.linear_forward_tile_scale times wider and hold as many times more elements (D72):
# measured on an AVX2 host (issue 12), 2048-wide tiles of 4 M elements made the forward faster than the naive
# log_softmax(h @ Wᵀ) where 1024 × 2 M was 1.2-1.5× slower; the backward (four GEMMs per tile) keeps the measured
# D49 tiles.


def tile_sizes(n: int, v: int, *, forward: bool = False) -> tuple[int, int]:
    """``(token_chunk, vocab_tile)`` for ``n`` tokens and a vocabulary (shard) of ``v``: ``vocab_tile =
    min(v, linear_vocab_tile)``, ``token_chunk = min(n, linear_tile_elements // vocab_tile)`` (both
    ×linear_forward_tile_scale for the forward), from :data:`srpo_core.tuning.TUNING` at call time."""
    k = max(1, TUNING.linear_forward_tile_scale) if forward else 1
    vt = max(1, min(v, TUNING.linear_vocab_tile * k))
    nc = max(1, min(n, TUNING.linear_tile_elements * k // vt))
    return nc, vt


LOG2E = 1.4426950408889634  # the tiles work in base-2 units, u₂ = u·log₂e: exp2 is ~3× cheaper than exp on CPU
LN2 = 0.6931471805599453


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# torch path: forward


def _tile_logits_shifted(h, w, b, c, scale, out, cap=None):
    """``out = f(h @ wᵀ + b)·scale − c[:, None]`` in the accumulation dtype (``out`` is ``[n, v]``; ``scale`` is
    ``log₂e / τ``, so ``out`` is in base-2 units); ``f`` is the identity, or with ``cap = (pre, softcap)``
    ``softcap·tanh(pre·x)`` (``pre = logit_scale / softcap``).

    fp32/fp64: one GEMM that starts from ``−c`` (and the scaled bias). bf16/fp16: the logits are computed (and
    rounded) in the input dtype, as a plain model computes them, then shifted while upcasting in one pass."""
    if cap is not None:
        pre, softcap = cap
        if h.dtype in LOW_PRECISION:
            out.copy_(torch.mm(h, w.T) if b is None else torch.addmm(b, h, w.T))
        elif b is None:
            torch.mm(h, w.T, out=out)
        else:
            torch.addmm(b[None, :].expand_as(out), h, w.T, out=out)
        out.mul_(pre).tanh_().mul_(softcap * scale).sub_(c[:, None])
        return None
    if h.dtype in LOW_PRECISION:
        z = torch.mm(h, w.T) if b is None else torch.addmm(b, h, w.T)
        torch.add(-c[:, None], z, alpha=scale, out=out)
        return z
    if b is None:
        out.copy_((-c)[:, None].expand_as(out))
    else:
        torch.sub((b * scale)[None, :], c[:, None], out=out)
    torch.addmm(out, h, w.T, alpha=scale, out=out)
    return None


def _fold_safe(u, c, s, t, want_entropy):
    """Fold a tile ``u`` ``[n, v]`` (base-2 units, overwritten) into the rows' ``(c, s, t)`` with an explicit max (first
    tile, or rows whose fast-path sum overflowed): ``s = Σ 2^(u − c)``, ``t = Σ 2^(u − c)·(u − c)``."""
    m = u.amax(1)
    c_new = torch.maximum(c, m)
    shift = torch.where(torch.isinf(c_new) & (c_new < 0), torch.zeros_like(c_new), c_new)  # all −inf: shift by 0
    had = s > 0
    scale = torch.where(had, torch.exp2(c - shift), torch.zeros_like(s))
    if want_entropy:
        t = torch.where(had, scale * (t + (c - shift) * s), torch.zeros_like(t))
    u.sub_(shift[:, None])
    if want_entropy:
        e = torch.exp2(u)
        s = s * scale + e.sum(1)
        t = t + torch.where(e > 0, e * u, torch.zeros((), dtype=u.dtype)).sum(1)
    else:
        s = s * scale + u.exp2_().sum(1)
    return shift, s, t


def _torch_fwd(hidden, weight, bias, ids_local, inv_tau, want_entropy, *, logit_scale=1.0, softcap=None):
    """Per row: ``(lse, target, H)`` in natural units of ``u`` (acc dtype). ``target`` is ``u[id]`` where the id falls
    in this weight shard (``0 <= ids_local < V``), 0 elsewhere; ``H`` is the entropy of the shard's own softmax.

    Internally everything is in base-2 units (``u₂ = u·log₂e``). ``u = x·inv_tau`` without ``softcap`` (fold a logit
    scale into ``inv_tau``), ``u = softcap·tanh(logit_scale·x/softcap)·inv_tau`` with one."""
    n_all, _ = hidden.shape
    v_all = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    scale = inv_tau * LOG2E
    cap = (logit_scale / softcap, softcap) if softcap else None
    c = torch.full((n_all,), -math.inf, dtype=acc, device=dev)
    s = torch.zeros(n_all, dtype=acc, device=dev)
    t = torch.zeros(n_all, dtype=acc, device=dev)
    tgt = torch.zeros(n_all, dtype=acc, device=dev)
    nc, vt = tile_sizes(n_all, v_all, forward=True)
    buf = torch.empty(nc * vt, dtype=acc, device=dev)
    for v0 in range(0, v_all, vt):
        v1 = min(v_all, v0 + vt)
        w = weight[v0:v1]
        b = None if bias is None else bias[v0:v1]
        for n0 in range(0, n_all, nc):
            n1 = min(n_all, n0 + nc)
            h = hidden[n0:n1]
            cn, sn, tn = c[n0:n1], s[n0:n1], t[n0:n1]
            loc = ids_local[n0:n1] - v0
            sel = (loc >= 0) & (loc < v1 - v0)
            idx = loc.clamp(0, v1 - v0 - 1)[:, None]
            u = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            if v0 == 0:  # no reference point yet: explicit max
                _tile_logits_shifted(h, w, b, torch.zeros_like(cn), scale, u, cap)
                tgt[n0:n1] = torch.where(sel, u.gather(1, idx)[:, 0], tgt[n0:n1])
                cn, sn, tn = _fold_safe(u, cn, sn, tn, want_entropy)
            else:
                _tile_logits_shifted(h, w, b, cn, scale, u, cap)  # u − c
                tgt[n0:n1] = torch.where(sel, u.gather(1, idx)[:, 0] + cn, tgt[n0:n1])
                if want_entropy:
                    e = torch.exp2(u)
                    st = e.sum(1)
                    tt = torch.where(e > 0, e * u, torch.zeros((), dtype=acc)).sum(1)
                else:
                    st = u.exp2_().sum(1)
                    tt = None
                bad = ~torch.isfinite(st)
                if bool(bad.any()):  # a logit > c + ~127 (or a NaN/inf logit): redo these rows with an explicit max
                    rows = torch.nonzero(bad)[:, 0]
                    ur = torch.empty(rows.numel(), v1 - v0, dtype=acc, device=dev)
                    _tile_logits_shifted(h[rows], w, b, torch.zeros_like(cn[rows]), scale, ur, cap)
                    cr, sr, tr = _fold_safe(ur, cn[rows], sn[rows], tn[rows], want_entropy)
                    sn = sn + st
                    if want_entropy:
                        tn = tn + tt
                    cn, sn, tn = cn.clone(), sn.clone(), tn.clone()
                    cn[rows], sn[rows], tn[rows] = cr, sr, tr
                else:
                    sn = sn + st
                    if want_entropy:
                        tn = tn + tt
            # rebase to the running logsumexp: c ← c + log₂ s, s ← 1 (t follows), so the next tile's 2^x stays ≲ 1
            ls = torch.log2(sn)
            ok = sn > 0
            if want_entropy:
                tn = torch.where(ok, tn / sn - ls, tn)
            cn = torch.where(ok, cn + ls, cn)
            sn = torch.where(ok, torch.ones_like(sn), sn)
            c[n0:n1], s[n0:n1], t[n0:n1] = cn, sn, tn
    lse = (c + torch.log2(s)) * LN2
    ent = ((torch.log2(s) - t / s) * LN2) if want_entropy else None
    return lse, tgt * LN2, ent


# ---------------------------------------------------------------------------------------------------------------------
# torch path: backward


def _grad_coefficients(g_lp, g_h, g_lse, ent, lse2, gsc):
    """Per-row ``(a, b, c)`` of ``G = p·(a + b·log₂p) + c·onehot``: ``a = (g_lse − g_lp − g_h·H)·gsc``,
    ``b = −g_h·ln2·gsc`` (``ln p = ln2·log₂p``; None without ``g_h``), ``c = g_lp·gsc`` (None without ``g_lp``)."""
    a = torch.zeros_like(lse2)
    for x, sign in ((g_lse, 1.0), (g_lp, -1.0), (None if g_h is None else g_h * ent, -1.0)):
        if x is not None:
            a = a + sign * x
    return (a * gsc, None if g_h is None else -g_h * gsc * LN2, None if g_lp is None else g_lp * gsc)


def _tile_grad(g, rows, loc, coefs, lse2, scale, cap, buf2, buf3):
    """``g: [n, v]`` holding ``log₂ p`` of the rows ``rows`` (a slice) → ``G`` in place; ``loc`` = the rows' ids
    relative to the tile's first column; ``buf2`` / ``buf3``: workspaces (the entropy term, the softcap factor)."""
    a, bcoef, coef_lp = coefs
    if cap is not None:  # 1 − t², t = tanh(pre·x) = u₂ / (softcap·scale)
        fac = buf3[: g.numel()].view_as(g)
        torch.add(g, lse2[rows, None], out=fac).mul_(1.0 / (cap[1] * scale)).square_()
        fac.neg_().add_(1.0)
    if bcoef is None:
        g.exp2_().mul_(a[rows, None])  # p·a
    else:
        lp = buf2[: g.numel()].view_as(g)
        lp.copy_(g)
        g.exp2_()
        lp.mul_(bcoef[rows, None]).add_(a[rows, None])
        g.mul_(torch.where(g > 0, lp, torch.zeros((), dtype=g.dtype)))
    if coef_lp is not None:  # + g/τ at the sampled token
        hit = torch.nonzero((loc >= 0) & (loc < g.shape[1]))[:, 0]
        if hit.numel():
            g.index_put_((hit, loc[hit]), coef_lp[rows][hit], accumulate=True)
    if cap is not None:
        g.mul_(fac)


def _torch_bwd(hidden, weight, bias, ids_local, inv_tau, lse, ent, g_lp, g_h, needs, *, g_lse=None, logit_scale=1.0,
               softcap=None):
    """Gradients ``(grad_hidden, grad_weight, grad_bias)`` for upstream ``g_lp``/``g_h``/``g_lse`` (``[N]`` acc dtype
    or None) given the rows' true ``lse`` (ignored rows must have been dropped: unlike the Triton kernel this path
    does not clamp ``log p``).

    ``G = ∂L/∂x = (g_lp·(onehot − p) − g_h·p·(log p + H) + g_lse·p)·f'(x) / τ`` tile by tile, ``log p = u − lse``
    (computed in base 2: ``p = 2^(u₂ − lse₂)``); ``f'(x) = 1`` without a softcap (a logit scale folded into
    ``inv_tau``), ``logit_scale·(1 − tanh²)`` with one."""
    n_all, h_dim = hidden.shape
    v_all = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    low = hidden.dtype in LOW_PRECISION
    need_h, need_w, need_b = needs
    scale = inv_tau * LOG2E
    cap = (logit_scale / softcap, softcap) if softcap else None
    gsc = inv_tau * logit_scale if softcap else inv_tau  # the coefficients' factor: f'(x) = logit_scale·(1 − t²)
    lse2 = lse * LOG2E
    gh = torch.zeros(n_all, h_dim, dtype=acc, device=dev) if need_h else None
    gw = torch.empty_like(weight) if need_w else None
    gb = torch.zeros(v_all, dtype=acc, device=dev) if need_b else None
    nc, vt = tile_sizes(n_all, v_all)
    multi_chunk = nc < n_all
    buf = torch.empty(nc * vt, dtype=acc, device=dev)
    buf2 = torch.empty(nc * vt, dtype=acc, device=dev) if g_h is not None else None
    buf3 = torch.empty(nc * vt, dtype=acc, device=dev) if cap is not None else None
    coefs = _grad_coefficients(g_lp, g_h, g_lse, ent, lse2, gsc)
    for v0 in range(0, v_all, vt):
        v1 = min(v_all, v0 + vt)
        w = weight[v0:v1]
        b = None if bias is None else bias[v0:v1]
        gw_acc = torch.zeros(v1 - v0, h_dim, dtype=acc, device=dev) if (need_w and multi_chunk) else None
        w_acc = w.to(acc) if (need_h and low) else w  # bf16/fp16: grad_hidden accumulates in fp32 (no bf16 partials)
        for n0 in range(0, n_all, nc):
            n1 = min(n_all, n0 + nc)
            h = hidden[n0:n1]
            g = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            _tile_logits_shifted(h, w, b, lse2[n0:n1], scale, g, cap)  # log₂ p
            _tile_grad(g, slice(n0, n1), ids_local[n0:n1] - v0, coefs, lse2, scale, cap, buf2, buf3)
            if need_b:
                gb[v0:v1] += g.sum(0)
            if need_h:  # fp32 G @ fp32 W tile, accumulated in place into the fp32 [N, H] accumulator
                gh[n0:n1].addmm_(g, w_acc)
            gm = g.to(weight.dtype) if low else g
            if need_w:
                if gw_acc is not None and low:
                    gw_acc += torch.mm(gm.T, h)
                elif gw_acc is not None:
                    gw_acc.addmm_(gm.T, h)
                else:
                    torch.mm(gm.T, h, out=gw[v0:v1])
        if gw_acc is not None:
            gw[v0:v1] = gw_acc
    return gh, gw, gb
