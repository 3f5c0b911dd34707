"""Fused ``linear_token_contrast`` forward: both conditions' logits tiles ``x = hidden @ Wᵀ + b`` and ``x' =
hidden_ref @ Wᵀ + b`` by ``tl.dot`` (fp32 accumulation, rounded once to the inputs' dtype as ``F.linear`` rounds them,
D48), folded into online sums; never ``[N, V]`` in memory.

Grid ``(row blocks, vocabulary splits)``: each program walks ``tiles_per_split`` vocabulary tiles of ``BLOCK_V`` for
``BLOCK_N`` rows, the ``H`` loop in ``BLOCK_H`` steps loading each weight tile once for both conditions. In base-2
units ``u₂ = x·log₂e/τ`` per row and condition it keeps the running max ``c`` and ``s = Σ 2^(u₂ − c)``, and for
``kl`` also ``t = Σ 2^a (a − b)`` with ``a = u₂ − c``, ``b = u₂' − c'``; when the maxima move by ``Δ``, ``Δ'``,
``t ← 2^(−Δ) (t + (Δ' − Δ) s)`` (the token_contrast kernel's recurrence). It writes the split's
``(lse, lse', t, target, target')`` in natural units; the launcher combines the splits in a fixed order
(:func:`srpo_core.common.linear_contrast.combine_stats`, deterministic, no atomics).

``js`` (MODE 1) takes the whole vocabulary's log-sum-exps and sums ``½ p (log₂ p − log₂ m) + ½ p' (log₂ p' − log₂ m)``
per split; MODE 0 without ``t`` is its first pass.

Masked lanes: columns past ``V`` get ``u₂ = −inf`` (``2^−inf = 0``; every product with them is guarded by
``where(e > 0, …)``, never ``0·inf``); rows past ``N`` read zeros and are never stored. Offsets are int64 (program
ids and index vectors cast before any multiply by a stride). Rows whose results are not finite (``−inf``/NaN/inf
logits, an fp32 overflow) are recomputed in float64 by ``srpo_core.common.linear_contrast.slow_rows`` (one host sync),
the redo the CPU path uses too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from srpo_core import _dispatch
from srpo_core._dispatch import empty, interpreting
from srpo_core.common import linear_contrast
from srpo_core.kernels._rounding import emulate_bf16, round_to
from srpo_core.kernels.linear_token_logprobs import _dot_t  # b_acc + b_x @ b_yᵀ, fp32 accumulation
from srpo_core.tuning import TUNING

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DEFAULT = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 2}
DEFAULT_FP32 = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}


def default_config(dtype: torch.dtype) -> dict:
    """Pinned tiles: two ``[BLOCK_N, BLOCK_V]`` fp32 accumulators live at once (one per condition), so half the
    ``linear_token_logprobs`` tile for bf16/fp16; fp32 keeps its IEEE-dot tile."""
    return dict(DEFAULT_FP32 if dtype == torch.float32 else DEFAULT)


@triton.jit
def _h_step(p_h, p_r, p_w, o_n, m_n, o_v, m_v, h0, H, stride_hn, stride_rn, stride_wv, acc_x, acc_y,
            IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_H: tl.constexpr):
    # acc_x + h[o_n, h0:h0+BLOCK_H] @ w[o_v, …]ᵀ, acc_y the same for hidden_ref: each weight tile loaded once for both
    o_h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
    m_h = o_h < H
    b_w = tl.load(p_w + o_v[:, None] * stride_wv + o_h[None, :], mask=m_v[:, None] & m_h[None, :], other=0.0)
    b_h = tl.load(p_h + o_n[:, None] * stride_hn + o_h[None, :], mask=m_n[:, None] & m_h[None, :], other=0.0)
    b_r = tl.load(p_r + o_n[:, None] * stride_rn + o_h[None, :], mask=m_n[:, None] & m_h[None, :], other=0.0)
    return _dot_t(b_h, b_w, acc_x, IEEE, UPCAST), _dot_t(b_r, b_w, acc_y, IEEE, UPCAST)


@triton.jit
def _logits_tiles(p_h, p_r, p_w, p_b, o_n, m_n, o_v, m_v, H, stride_hn, stride_rn, stride_wv, HAS_BIAS: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr, INTERPRET: tl.constexpr, EMULATE_BF16: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # both conditions' x = h[o_n] @ w[o_v]ᵀ + b[o_v], fp32 accumulation, then rounded once to the inputs' dtype (as
    # F.linear rounds a model's logits, D48) and back to fp32, [BLOCK_N, BLOCK_V] each
    acc_x = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    acc_y = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if INTERPRET:  # Triton 3.6's interpreter rejects range() with a tensor bound (D178)
        h0 = 0
        while h0 < H:
            acc_x, acc_y = _h_step(p_h, p_r, p_w, o_n, m_n, o_v, m_v, h0, H, stride_hn, stride_rn, stride_wv, acc_x,
                                   acc_y, IEEE, UPCAST, BLOCK_H)
            h0 += BLOCK_H
    else:  # compiled: an scf.for, which the software pipeliner stages (num_stages); it leaves while loops alone
        for h0 in range(0, H, BLOCK_H):
            acc_x, acc_y = _h_step(p_h, p_r, p_w, o_n, m_n, o_v, m_v, h0, H, stride_hn, stride_rn, stride_wv, acc_x,
                                   acc_y, IEEE, UPCAST, BLOCK_H)
    if HAS_BIAS:
        b_b = tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)
        acc_x += b_b[None, :]
        acc_y += b_b[None, :]
    # a no-op for fp32; the interpreter truncates fp32 → bf16 casts, so there (EMULATE_BF16) it rounds on the bits
    return (round_to(acc_x, p_h, EMULATE_BF16).to(tl.float32), round_to(acc_y, p_h, EMULATE_BF16).to(tl.float32))


@triton.jit
def _fold_tile(p_h, p_r, p_w, p_b, ids, o_n, m_n, v0, v_hi, H, stride_hn, stride_rn, stride_wv, scale, L_x, L_y,
               c_x, c_y, s_x, s_y, t, tx, ty, HAS_BIAS: tl.constexpr, MODE: tl.constexpr, WANT_T: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr, INTERPRET: tl.constexpr, EMULATE_BF16: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # the vocabulary tile [v0, v0 + BLOCK_V) folded into the rows' running sums
    NEG_INF = -float("inf")
    o_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
    m_v = o_v < v_hi
    acc_x, acc_y = _logits_tiles(p_h, p_r, p_w, p_b, o_n, m_n, o_v, m_v, H, stride_hn, stride_rn, stride_wv, HAS_BIAS,
                                 IEEE, UPCAST, INTERPRET, EMULATE_BF16, BLOCK_N, BLOCK_V, BLOCK_H)
    u_x = tl.where(m_v[None, :], acc_x * scale, NEG_INF)  # [BLOCK_N, BLOCK_V], base 2
    u_y = tl.where(m_v[None, :], acc_y * scale, NEG_INF)
    hit = o_v[None, :] == ids[:, None]
    tx += tl.sum(tl.where(hit, u_x, 0.0), 1)
    ty += tl.sum(tl.where(hit, u_y, 0.0), 1)
    if MODE == 0:
        n_x = tl.maximum(c_x, tl.max(u_x, 1))
        n_y = tl.maximum(c_y, tl.max(u_y, 1))
        k_x = tl.where(n_x == NEG_INF, 0.0, n_x)  # the shift: 0 while the row has no mass yet
        k_y = tl.where(n_y == NEG_INF, 0.0, n_y)
        o_x = tl.where(c_x == NEG_INF, 0.0, c_x)
        o_y = tl.where(c_y == NEG_INF, 0.0, c_y)
        a_x = tl.where(c_x == NEG_INF, 0.0, tl.exp2(o_x - k_x))  # 2^(−Δ); nothing accumulated yet: 0
        a_y = tl.where(c_y == NEG_INF, 0.0, tl.exp2(o_y - k_y))
        b_a = u_x - k_x[:, None]  # ≤ 0 (−inf on masked lanes)
        b_b2 = u_y - k_y[:, None]
        b_e = tl.exp2(b_a)
        if WANT_T:
            b_t = tl.where(b_e > 0.0, b_e * (b_a - b_b2), 0.0)  # p_v = 0 terms: 0, never 0·inf
            d = (k_y - o_y) - (k_x - o_x)  # Δ' − Δ
            t = tl.where(a_x > 0.0, a_x * (t + d * s_x), 0.0) + tl.sum(b_t, 1)
        s_x = s_x * a_x + tl.sum(b_e, 1)
        s_y = s_y * a_y + tl.sum(tl.exp2(b_b2), 1)
        c_x = n_x
        c_y = n_y
    else:
        b_lp = u_x - L_x[:, None]  # log₂ p
        b_lq = u_y - L_y[:, None]
        b_p = tl.exp2(b_lp)
        b_q = tl.exp2(b_lq)
        b_lm = tl.log2(b_p + b_q) - 1.0  # log₂ m
        b_j = tl.where(b_p > 0.0, b_p * (b_lp - b_lm), 0.0) + tl.where(b_q > 0.0, b_q * (b_lq - b_lm), 0.0)
        t += tl.sum(b_j, 1)
    return c_x, c_y, s_x, s_y, t, tx, ty


@triton.heuristics({"HAS_BIAS": lambda a: a["p_b"] is not None})
@triton.jit
def linear_contrast_fwd_kernel(
    p_h,  # hidden      [N, H]
    p_r,  # hidden_ref  [N, H] (its own row stride)
    p_w,  # weight      [V, H]
    p_b,  # bias        [V] (contiguous) or None
    p_ids,  # [N] shard-local ids (−1: none)
    p_lse_x,  # [S, N] fp32 (MODE 1: the whole vocabulary's lse of x, natural units, read)
    p_lse_y,  # [S, N] fp32 (MODE 1: read, as p_lse_x)
    p_t,  # [S, N] fp32: MODE 0 the split's Σ p (log p − log p'), MODE 1 its JS partial sum
    p_tx,  # [S, N] fp32 target logits (natural units) where the id falls in the split, else 0
    p_ty,
    N,
    V,
    H,
    stride_hn,
    stride_rn,
    stride_wv,
    scale,  # log₂e / τ
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr,  # 0: (lse, lse', t, targets); 1: JS partial sums given the lse's
    WANT_T: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,  # interpreter: while loops (Triton 3.6 rejects range() with a tensor bound, D178)
    EMULATE_BF16: tl.constexpr,  # interpreter and bf16: round the logits on the bits (kernels/_rounding.py)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # u₂ = (h·wᵀ + b)·log₂e/τ per condition; kl = ln2·(t/s − log₂ s + log₂ s'), lse = ln2·(c + log₂ s)
    NEG_INF = -float("inf")
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    m_n = o_n < N
    ids = tl.load(p_ids + o_n, mask=m_n, other=-1).to(tl.int64)
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    c_x = zero + NEG_INF
    c_y = zero + NEG_INF
    s_x = zero
    s_y = zero
    t = zero
    tx = zero
    ty = zero
    L_x = zero
    L_y = zero
    if MODE == 1:
        L_x = tl.load(p_lse_x + o_n, mask=m_n, other=0.0) * 1.4426950408889634
        L_y = tl.load(p_lse_y + o_n, mask=m_n, other=0.0) * 1.4426950408889634
    v_lo = i_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)
    if INTERPRET:  # Triton 3.6's interpreter rejects range() with a tensor bound (D178)
        v0 = v_lo
        while v0 < v_hi:
            c_x, c_y, s_x, s_y, t, tx, ty = _fold_tile(
                p_h, p_r, p_w, p_b, ids, o_n, m_n, v0, v_hi, H, stride_hn, stride_rn, stride_wv, scale, L_x, L_y,
                c_x, c_y, s_x, s_y, t, tx, ty, HAS_BIAS, MODE, WANT_T, IEEE, UPCAST, INTERPRET, EMULATE_BF16,
                BLOCK_N, BLOCK_V, BLOCK_H)
            v0 += BLOCK_V
    else:  # compiled: nested scf.for loops, the inner one software-pipelined (num_stages)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            c_x, c_y, s_x, s_y, t, tx, ty = _fold_tile(
                p_h, p_r, p_w, p_b, ids, o_n, m_n, v0, v_hi, H, stride_hn, stride_rn, stride_wv, scale, L_x, L_y,
                c_x, c_y, s_x, s_y, t, tx, ty, HAS_BIAS, MODE, WANT_T, IEEE, UPCAST, INTERPRET, EMULATE_BF16,
                BLOCK_N, BLOCK_V, BLOCK_H)
    o_out = i_s * N + o_n
    if MODE == 0:
        k_x = tl.where(c_x == NEG_INF, 0.0, c_x)
        k_y = tl.where(c_y == NEG_INF, 0.0, c_y)
        l_x = tl.log2(s_x)
        l_y = tl.log2(s_y)
        tl.store(p_lse_x + o_out, (k_x + l_x) * 0.6931471805599453, mask=m_n)
        tl.store(p_lse_y + o_out, (k_y + l_y) * 0.6931471805599453, mask=m_n)
        if WANT_T:
            kl = tl.where(s_x > 0.0, (t / s_x - l_x + l_y) * 0.6931471805599453, 0.0)  # an empty split: 0
            tl.store(p_t + o_out, kl, mask=m_n)
    else:
        tl.store(p_t + o_out, 0.5 * t * 0.6931471805599453, mask=m_n)
    tl.store(p_tx + o_out, tx * 0.6931471805599453, mask=m_n)
    tl.store(p_ty + o_out, ty * 0.6931471805599453, mask=m_n)


def _launch(hidden, hidden_ref, weight, bias, ids_local, inv_tau, mode, want_t, lse=None, config=None,
            splits=None):
    assert hidden.dim() == 2 and hidden.shape == hidden_ref.shape and weight.shape[1] == hidden.shape[1]
    assert hidden.dtype == hidden_ref.dtype == weight.dtype and ids_local.shape == hidden.shape[:1]
    hidden, hidden_ref, weight = (x if x.stride(-1) == 1 else x.contiguous() for x in (hidden, hidden_ref, weight))
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with unit stride
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = {**default_config(hidden.dtype), **(config or {})}
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    programs = triton.cdiv(TUNING.linear_triton_target_programs, max(n_blocks, 1))
    n_splits = splits if splits is not None else max(1, min(n_tiles, programs))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    outs = [empty((n_splits, N), dtype=torch.float32, device=dev) for _ in range(5)]
    if mode == 1:
        outs[0], outs[1] = lse[0].float().contiguous(), lse[1].float().contiguous()  # read, same for every split
    ids_c = ids_local.contiguous()
    if N == 0:  # no rows (a vocab-parallel rank whose batch is empty or all ignored): nothing to launch
        return outs, torch.zeros((n_splits, 0), dtype=torch.bool, device=dev)
    with _dispatch.device_guard(hidden):
        linear_contrast_fwd_kernel[(n_blocks, n_splits)](
            hidden, hidden_ref, weight, bias, ids_c, *outs, N, V, H, hidden.stride(0), hidden_ref.stride(0),
            weight.stride(0), inv_tau * LOG2E, tiles_per_split, MODE=mode, WANT_T=want_t,
            IEEE=hidden.dtype == torch.float32, UPCAST=interpreting() and hidden.dtype != torch.float32,
            INTERPRET=interpreting(), EMULATE_BF16=emulate_bf16(hidden.dtype),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    starts = torch.arange(n_splits, device=dev)[:, None] * (tiles_per_split * cfg["BLOCK_V"])
    owned = (ids_c[None, :] >= starts) & (ids_c[None, :] < starts + tiles_per_split * cfg["BLOCK_V"])
    return outs, owned


def linear_contrast_stats(hidden, hidden_ref, weight, bias, ids_local, *, inv_tau: float, kind: str, config=None,
                          splits=None):
    """``hidden, hidden_ref [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``ids_local [N]`` → this shard's
    ``(lse, lse_ref, t, tgt, tgt_ref)`` fp32 ``[N]`` in natural units (``t`` None for ``js``), as
    :func:`srpo_core.cpu.linear_token_contrast.local_stats` returns them."""
    want_t = kind == "kl"
    outs, owned = _launch(hidden, hidden_ref, weight, bias, ids_local, inv_tau, 0, want_t, config=config,
                          splits=splits)
    lse_x, lse_y, t, tgt_x, tgt_y = linear_contrast.combine_stats(outs[0], outs[1], outs[2] if want_t else None,
                                                                  outs[3], outs[4], owned, lambda x: x.amax(1),
                                                                  lambda x: x.sum(1))
    bad = ~torch.isfinite(lse_x) | ~torch.isfinite(lse_y)
    if want_t:
        bad |= ~torch.isfinite(t)
    if bool(bad.any()):  # −inf/NaN/inf logits, an fp32 overflow: the float64 slow path for these rows
        rows = torch.nonzero(bad)[:, 0]
        slow = linear_contrast.slow_rows(hidden, hidden_ref, weight, bias, ids_local, inv_tau, rows, kind, None).float()
        lse_x[rows], lse_y[rows], tgt_x[rows], tgt_y[rows] = slow[0], slow[1], slow[3], slow[4]
        if want_t:
            t[rows] = slow[2]
    return lse_x, lse_y, t, tgt_x, tgt_y


def linear_contrast_js(hidden, hidden_ref, weight, bias, lse_x, lse_y, *, inv_tau: float, config=None, splits=None):
    """Pass 2 of ``js``: this shard's ``Σ_v ½ p (log p − log m) + ½ p' (log p' − log m)`` fp32 ``[N]`` (natural
    units), ``p`` the whole vocabulary's softmax (``lse_x``, ``lse_y``: its log-sum-exps)."""
    ids = torch.full(hidden.shape[:1], -1, dtype=torch.int64, device=hidden.device)
    outs, _ = _launch(hidden, hidden_ref, weight, bias, ids, inv_tau, 1, False, lse=(lse_x, lse_y), config=config,
                      splits=splits)
    js = outs[2].sum(0)
    bad = ~torch.isfinite(js) & torch.isfinite(lse_x) & torch.isfinite(lse_y)
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:, 0]
        js[rows] = linear_contrast.slow_rows(hidden, hidden_ref, weight, bias, None, inv_tau, rows, "js",
                             (lse_x[rows], lse_y[rows])).float()
    return js


def _report_entries() -> list[dict]:
    """What ``benchmarks/gpu_report.py`` compiles: the pinned configs, unit inner strides, sizes multiple of 16."""
    entries = []
    for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        cfg = default_config(dtype)
        for mode, want_t, label in ((0, True, "kl"), (0, False, "lse"), (1, False, "js")):
            entries.append({
                "name": f"linear_contrast_fwd[{label},{tname}]",
                "fn": linear_contrast_fwd_kernel.fn,  # the JITFunction under the heuristics
                "signature": {"p_h": f"*{tname}", "p_r": f"*{tname}", "p_w": f"*{tname}", "p_b": "constexpr",
                              "p_ids": "*i64", "p_lse_x": "*fp32", "p_lse_y": "*fp32", "p_t": "*fp32",
                              "p_tx": "*fp32", "p_ty": "*fp32", "N": "i32", "V": "i32:16", "H": "i32:16",
                              "stride_hn": "i32:16", "stride_rn": "i32:16", "stride_wv": "i32:16", "scale": "fp32",
                              "tiles_per_split": "i32", "HAS_BIAS": "constexpr", "MODE": "constexpr",
                              "WANT_T": "constexpr", "IEEE": "constexpr", "UPCAST": "constexpr",
                              "INTERPRET": "constexpr", "EMULATE_BF16": "constexpr", "BLOCK_N": "constexpr",
                              "BLOCK_V": "constexpr", "BLOCK_H": "constexpr"},
                "constexprs": {"p_b": None, "HAS_BIAS": False, "MODE": mode, "WANT_T": want_t,
                               "IEEE": dtype == torch.float32, "UPCAST": False, "INTERPRET": False,
                               "EMULATE_BF16": False,
                               "BLOCK_N": cfg["BLOCK_N"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"]},
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                "bytes": "V·H·s·cdiv(N, BLOCK_N) (weight per row block) + 2·N·H·s·cdiv(V, BLOCK_V·tiles_per_split); "
                         "4·N·V·H FLOPs (both conditions)",
            })
    return entries


GPU_REPORT = _report_entries()

__all__ = ["GPU_REPORT", "default_config", "linear_contrast_fwd_kernel", "linear_contrast_js",
           "linear_contrast_stats"]
