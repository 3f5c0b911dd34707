"""Fused two-condition contrast: ``KL(p ‖ p')`` or ``JS(p, p')`` per row, plus ``log p_id`` and ``log p'_id``.

``p = softmax(x / τ)``, ``p' = softmax(x' / τ)`` for the rows ``x = logits[n]``, ``x' = logits_ref[n]``.
One program per row, a loop over the vocabulary in blocks of ``BLOCK_V``; ``V``, the strides and ``τ`` are runtime
arguments (the JIT specialises only on ``V % 16`` and on unit strides, so a new vocabulary size costs no compile).

``kl`` reads each row once. With ``c, c'`` the running maxima, ``u = (x − c)/τ`` and ``u' = (x' − c')/τ``:

    KL = Σ_v e^{u_v} (u_v − u'_v) / s − log s + log s',      s = Σ_v e^{u_v},  s' = Σ_v e^{u'_v}

and ``t = Σ_v e^{u_v} (u_v − u'_v)`` is kept online like ``s``: when the maxima move by ``Δ = (c_new − c_old)/τ``
and ``Δ'``, ``t ← e^{−Δ} (t + (Δ' − Δ) s)``. Working in max-shifted units keeps ``KL`` exact to a few ulps when
``x' ≈ x + const`` (no cancellation between two large log-sum-exps).

``js`` needs ``log m_v = log(½ (p_v + p'_v))``, which depends on both normalisers at once: no fixed set of running
sums gives it in one pass. It reads each row twice: pass 1 is the online ``(c, s)``, ``(c', s')``; pass 2 sums
``½ p (log p − log m) + ½ p' (log p' − log m)``.

Conventions: ``p_v = 0`` terms are 0; ``x_v`` finite with ``x'_v = −inf`` gives ``KL = +inf``; a row of all ``−inf``
(or with ``+inf``/NaN) gives NaN; ``ids[n] == ignore_index`` gives 0 and skips the row's loads; an ``id`` outside
``[0, V)`` gives NaN (the public function raises before that can happen).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from srpo_core import _dispatch
from srpo_core._dispatch import empty
from srpo_core.common.chunked import collapse_rows

KIND_KL = 0
KIND_JS = 1
KIND_CODES = {"kl": KIND_KL, "js": KIND_JS}

# Pinned default config (no autotuning): 4096 columns of each row per iteration, 8 warps → 16 elements per thread per
# row, i.e. two 128-bit loads per row per thread for bf16/fp16, four for fp32.
MAX_BLOCK_V = 4096


def default_config(V: int) -> dict:
    block_v = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    return {"BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4}


@triton.jit
def token_contrast_fwd_kernel(
    p_x,  # logits      [N, V] as rows (i_b, i_t): offset i_b·stride_xb + i_t·stride_xt, vocab stride stride_xv
    p_y,  # logits_ref  [N, V] as rows, with its own layout (T_y, stride_yb, stride_yt, stride_yv)
    p_ids,  # [N]
    p_div,  # [N] fp32 (REDO: read, then rewritten where it was not finite)
    p_lp,  # [N] fp32
    p_lq,  # [N] fp32
    V,
    T_x,  # rows per outer index of logits: row n = (n // T_x, n % T_x)
    stride_xb,
    stride_xt,
    stride_xv,
    T_y,
    stride_yb,
    stride_yt,
    stride_yv,
    stride_ids,
    inv_temperature,
    ignore_index,
    KIND: tl.constexpr,  # 0 = kl, 1 = js
    REDO: tl.constexpr,  # False: fp32 pass over every row; True: float64 pass over the rows whose div is not finite
    BLOCK_V: tl.constexpr,
):
    # div = KL(p ‖ p') or JS(p, p'); lp = x_id/τ − lse(x/τ); lq = x'_id/τ − lse(x'/τ)
    # Every pointer offset is int64: program id and column indices are cast before any multiply by a stride.
    ACC = tl.float64 if REDO else tl.float32
    NEG_INF = -float("inf")
    i_n = tl.program_id(0).to(tl.int64)
    p_x += (i_n // T_x) * stride_xb + (i_n % T_x) * stride_xt
    p_y += (i_n // T_y) * stride_yb + (i_n % T_y) * stride_yt
    i_id = tl.load(p_ids + i_n * stride_ids).to(tl.int64)
    keep = i_id != ignore_index
    valid = keep & (i_id >= 0) & (i_id < V)
    todo = keep
    if REDO:  # the fp32 pass marked the rows it could not finish with NaN (a genuine +inf KL is final)
        first = tl.load(p_div + i_n)
        todo = valid & (first != first)
    v_end = tl.where(todo, V, 0)  # an ignored row (or, in REDO, a finished one) reads nothing
    one = tl.full([], 1.0, ACC)
    inv_t = one * inv_temperature
    zero = one * 0.0
    m_x = zero + NEG_INF  # running max of x (raw units)
    m_y = zero + NEG_INF
    s_x = zero  # Σ e^{(x − c_x)/τ}, c_x = m_x or 0 while m_x = −inf
    s_y = zero
    t = zero  # Σ e^{u} (u − u')   (kl only)
    genuine = i_n * 0  # 1 once some x_v > −inf meets x'_v = −inf: KL = +inf exactly, in any precision (kl only)
    v0 = 0  # a while loop, not range(): Triton 3.6's interpreter rejects a tensor bound (D178)
    while v0 < v_end:
        o_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
        m_v = o_v < V
        b_x = tl.load(p_x + o_v * stride_xv, mask=m_v, other=NEG_INF).to(ACC)
        b_y = tl.load(p_y + o_v * stride_yv, mask=m_v, other=NEG_INF).to(ACC)
        c_x_old = tl.where(m_x == NEG_INF, 0.0, m_x)
        c_y_old = tl.where(m_y == NEG_INF, 0.0, m_y)
        m_x_new = tl.maximum(m_x, tl.max(b_x, 0))
        m_y_new = tl.maximum(m_y, tl.max(b_y, 0))
        c_x = tl.where(m_x_new == NEG_INF, 0.0, m_x_new)
        c_y = tl.where(m_y_new == NEG_INF, 0.0, m_y_new)
        # e^{−Δ}; nothing accumulated yet while the old max is −inf. Every exp is of a max-shifted value (≤ 0 or
        # −inf, masked lanes −inf): never an overflow, never e^{unshifted}.
        a_x = tl.where(m_x == NEG_INF, 0.0, tl.exp((c_x_old - c_x) * inv_t))
        a_y = tl.where(m_y == NEG_INF, 0.0, tl.exp((c_y_old - c_y) * inv_t))
        b_u = (b_x - c_x) * inv_t  # [BLOCK_V], ≤ 0, −inf where p_v = 0 (or the shift overflowed: p_v = 0 too)
        b_uy = (b_y - c_y) * inv_t
        b_e = tl.exp(b_u)
        if KIND == 0:
            b_t = tl.where(b_e > 0.0, b_e * (b_u - b_uy), 0.0)  # p_v = 0 in this precision: 0, not 0·(±inf)
            b_gen = (b_x > NEG_INF) & (b_y == NEG_INF)  # p_v > 0 = p'_v: +inf (D24)
            b_t = tl.where(b_gen, float("inf"), b_t)
            genuine = tl.maximum(genuine, tl.max(b_gen.to(tl.int64), 0))
            d = ((c_y - c_y_old) - (c_x - c_x_old)) * inv_t  # Δ' − Δ
            # a_x = 0: the old mass underflowed, and with it its terms (never 0·inf); +inf stays +inf
            t_old = tl.where(a_x > 0.0, a_x * (t + d * s_x), 0.0)
            t = tl.where(t == float("inf"), float("inf"), t_old) + tl.sum(b_t, 0)
        s_x = s_x * a_x + tl.sum(b_e, 0)
        s_y = s_y * a_y + tl.sum(tl.exp(b_uy), 0)
        m_x = m_x_new
        m_y = m_y_new
        v0 += BLOCK_V

    c_x = tl.where(m_x == NEG_INF, 0.0, m_x)
    c_y = tl.where(m_y == NEG_INF, 0.0, m_y)
    log_s_x = tl.log(s_x)
    log_s_y = tl.log(s_y)
    if KIND == 0:
        div = t / s_x - log_s_x + log_s_y
        if not REDO:  # a non-finite KL that is not genuinely infinite: NaN, finished by the float64 pass
            div = tl.where(genuine > 0, float("inf"), tl.where(tl.abs(div) < float("inf"), div, float("nan")))
    else:
        acc = zero
        v0 = 0
        while v0 < v_end:  # second read of both rows
            o_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            m_v = o_v < V
            b_x = tl.load(p_x + o_v * stride_xv, mask=m_v, other=NEG_INF).to(ACC)
            b_y = tl.load(p_y + o_v * stride_yv, mask=m_v, other=NEG_INF).to(ACC)
            b_lp = (b_x - c_x) * inv_t - log_s_x  # log p_v
            b_lq = (b_y - c_y) * inv_t - log_s_y
            b_p = tl.exp(b_lp)
            b_q = tl.exp(b_lq)
            b_lm = tl.log(b_p + b_q) - 0.6931471805599453  # log m_v; finite wherever p_v or p'_v > 0
            # a term whose mass underflowed to 0 is below the smallest normal: drop it rather than risk 0 · (−inf)
            b_j = tl.where(b_p > 0.0, b_p * (b_lp - b_lm), 0.0) + tl.where(b_q > 0.0, b_q * (b_lq - b_lm), 0.0)
            # a NaN row (all −inf, +inf entries) keeps its NaN through the first term's condition
            b_j = tl.where((b_lp != b_lp) | (b_lq != b_lq), float("nan"), b_j)
            acc += tl.sum(b_j, 0)
            v0 += BLOCK_V
        div = 0.5 * acc
        div = tl.where(div > 0.6931471805599453, 0.6931471805599453, div)
        if not REDO:
            div = tl.where(tl.abs(div) < float("inf"), div, float("nan"))
    div = tl.where(div < 0.0, 0.0, div)  # rounding only: both divergences are ≥ 0 (NaN passes through)

    i_safe = tl.where(valid, i_id, 0)
    b_xid = tl.load(p_x + i_safe * stride_xv, mask=todo, other=0.0).to(ACC)
    b_yid = tl.load(p_y + i_safe * stride_yv, mask=todo, other=0.0).to(ACC)
    lp = (b_xid - c_x) * inv_t - log_s_x
    lq = (b_yid - c_y) * inv_t - log_s_y
    # a row with no distribution: lp/lq are NaN already; make the divergence NaN too (kl's t/s can be finite)
    div = tl.where((lp != lp) | (lq != lq) | (s_x != s_x) | (s_y != s_y), float("nan"), div)
    div = tl.where(valid, div, float("nan")).to(tl.float32)
    lp = tl.where(valid, lp, float("nan")).to(tl.float32)
    lq = tl.where(valid, lq, float("nan")).to(tl.float32)
    if REDO:
        tl.store(p_div + i_n, div, mask=todo)
        tl.store(p_lp + i_n, lp, mask=todo)
        tl.store(p_lq + i_n, lq, mask=todo)
    else:
        tl.store(p_div + i_n, tl.where(keep, div, 0.0))
        tl.store(p_lp + i_n, tl.where(keep, lp, 0.0))
        tl.store(p_lq + i_n, tl.where(keep, lq, 0.0))


def token_contrast_fwd(
    logits: torch.Tensor,
    logits_ref: torch.Tensor,
    ids: torch.Tensor,
    *,
    kind: str,
    temperature: float,
    ignore_index: int,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch on ``logits, logits_ref: [..., V]`` (any strides, each its own; read in place when the leading dims
    collapse to two row strides, copied once otherwise), ``ids: [...]`` → three fp32 tensors of ``ids``' shape.

    Two launches, no host sync: the fp32 pass over every row, then a float64 pass that re-reads only the rows whose
    fp32 divergence is not finite for a reason other than a genuine ``+inf`` KL (a NaN row, or an fp32 overflow of a
    shifted logit such as ``(−3e38 − 3e38)/τ``; the fp32 pass marks them NaN) and rewrites their three outputs;
    every other program of it reads two scalars.
    ``block_v`` / ``num_warps`` override the pinned default (tests use a small block to cover the multi-block path).
    """
    assert logits.shape == logits_ref.shape and ids.shape == logits.shape[:-1]
    assert logits.dtype in (torch.float32, torch.float16, torch.bfloat16) and logits_ref.dtype in (
        torch.float32, torch.float16, torch.bfloat16)
    V = logits.shape[-1]
    x, _, T_x, sxb, sxt = collapse_rows(logits, unit_v=False)
    y, _, T_y, syb, syt = collapse_rows(logits_ref, unit_v=False)
    ids1 = ids.reshape(-1)
    N = ids1.numel()
    out = [empty(ids.shape, dtype=torch.float32, device=logits.device) for _ in range(3)]
    if N == 0:
        return tuple(out)
    cfg = default_config(V)
    if block_v is not None:
        cfg["BLOCK_V"] = block_v
    if num_warps is not None:
        cfg["num_warps"] = num_warps
    args = (x, y, ids1, *out, V, T_x, sxb, sxt, x.stride(-1), T_y, syb, syt, y.stride(-1), ids1.stride(0),
            1.0 / float(temperature), int(ignore_index))
    with _dispatch.device_guard(logits):
        for redo in (False, True):
            token_contrast_fwd_kernel[(N,)](*args, KIND=KIND_CODES[kind], REDO=redo, BLOCK_V=cfg["BLOCK_V"],
                                            num_warps=cfg["num_warps"])
    return tuple(out)


def _report_entries() -> list[dict]:
    """What ``benchmarks/gpu_report.py`` compiles: the launcher's default config for a large vocabulary (V ≥ 4096,
    a multiple of 16 like every common vocabulary, unit vocab stride), per kind and logits dtype."""
    cfg = default_config(1 << 17)
    entries = []
    for kind, code in KIND_CODES.items():
        for dtype, redo in (("bf16", False), ("fp32", False), ("fp32", True)):
            entries.append({
                "name": f"token_contrast_fwd[{kind},{dtype}{',f64' if redo else ''}]",
                "fn": token_contrast_fwd_kernel,
                "signature": {
                    "p_x": f"*{dtype}", "p_y": f"*{dtype}", "p_ids": "*i64",
                    "p_div": "*fp32", "p_lp": "*fp32", "p_lq": "*fp32",
                    "V": "i32:16", "T_x": "i32", "stride_xb": "i32:16", "stride_xt": "i32:16", "stride_xv": "constexpr",
                    "T_y": "i32", "stride_yb": "i32:16", "stride_yt": "i32:16", "stride_yv": "constexpr",
                    "stride_ids": "constexpr", "inv_temperature": "fp32", "ignore_index": "i32",
                    "KIND": "constexpr", "REDO": "constexpr", "BLOCK_V": "constexpr",
                },
                "constexprs": {"stride_xv": 1, "stride_yv": 1, "stride_ids": 1, "KIND": code, "REDO": redo,
                               "BLOCK_V": cfg["BLOCK_V"]},
                "num_warps": cfg["num_warps"],
                "num_stages": 3,
                "bytes": ("O(N) unless a row's fp32 result is not finite (then that row again, in float64)" if redo
                          else "2·N·V·s = floor (both rows once)" if kind == "kl"
                          else "4·N·V·s = 2× floor (rows read twice)"),
                "load_dtype": dtype,
            })
    return entries


GPU_REPORT = _report_entries()

__all__ = ["GPU_REPORT", "KIND_CODES", "default_config", "token_contrast_fwd", "token_contrast_fwd_kernel"]
