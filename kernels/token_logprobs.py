"""Fused per-token log-prob (and entropy) of the sampled token, forward and backward.

``z = x / τ`` for a row ``x = logits[n]`` of ``V`` logits, ``p = softmax(z)``:

    logp = z_id − logsumexp(z),        H = logsumexp(z) − Σ_v p_v z_v

One program per row, a loop over the vocabulary in blocks of ``BLOCK_V``; ``V``, the row strides and ``1/τ`` are
runtime arguments, so a new vocabulary size or temperature costs no compile (the JIT only specialises integers on
``== 1`` and ``% 16``).

Forward (one read of the row). With ``c`` the running max of ``x`` (raw units), ``u = (x − c)/τ ≤ 0``,
``s = Σ e^u`` and ``t = Σ e^u u`` are kept online: when the max moves, ``a = e^{(c_old − c_new)/τ}`` and
``Δ = (c_new − c_old)/τ`` give ``s ← a·s``, ``t ← a·(t − Δ·s)``. Then ``logsumexp(z) = c/τ + log s``,
``logp = (x_id − c)/τ − log s`` and ``H = log s − t/s``: everything is in max-shifted units, so logits of ±1e4 lose
no digits. The kernel stores ``row_max = c`` and ``row_logsum = log s`` (the log-sum-exp split in two, so backward
recomputes ``log p = (x − c)/τ − log s`` exactly) and ``H`` when asked for.

Backward (one read of the row, one write of ``grad_logits``), for upstream grads ``g_l`` (logp) and ``g_H`` (entropy):

    ∂logp/∂x_v = (δ_{v,id} − p_v)/τ,       ∂H/∂x_v = −p_v (log p_v + H)/τ

Conventions: a ``−inf`` logit has ``p = 0`` and adds 0 to every sum (``0 · (−inf) = 0``); a row of all ``−inf`` (or
with ``+inf``/NaN) gives NaN; ``ids[n] == ignore_index`` gives 0 (forward: ``logp = H = 0``, ``row_max =
row_logsum = 0``; backward: a zero row) and skips the row's loads; an id outside ``[0, V)`` gives ``logp = NaN`` but
valid row statistics (the vocab-parallel path relies on that: a rank that does not own the id still reduces its
shard), and no ``δ`` term in backward.

Bytes moved (the floor is one read of the logits for forward, one read plus one write for backward): forward reads
each kept row once (``N·V·s`` bytes, ``s`` the logit size) plus ``O(N)``; backward reads each row once and writes
``grad_logits`` once (``2·N·V·s``) plus ``O(N)``. Ignored rows are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from srpo_core import _dispatch
from srpo_core._dispatch import empty
from srpo_core.common.chunked import collapse_rows
from srpo_core.kernels._rounding import emulate_bf16, round_to

# Pinned default config (no autotuning). The loop body holds BLOCK_V / (32 · num_warps) elements per thread; the block
# is sized so that each thread issues four 128-bit loads per iteration (enough bytes in flight to stream a row):
# fp32 8 warps × 4096 → 16 per thread = 4 × LDG.128; bf16/fp16 8 warps × 8192 → 32 per thread = 4 × LDG.128.
# Registers: 32-87 per thread, no spills, on sm_80/sm_90 (benchmarks/gpu_report.py); at ≤ 96 an 8-warp program
# keeps two or more blocks resident per SM.
MAX_BLOCK_V = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}


def default_config(V: int, dtype: torch.dtype = torch.float32) -> dict:
    """``{"BLOCK_V", "num_warps"}`` the launcher uses for ``V`` columns of ``dtype`` logits."""
    block_v = min(MAX_BLOCK_V.get(dtype, 4096), max(16, triton.next_power_of_2(V)))
    num_warps = 8 if block_v >= 2048 else (4 if block_v >= 512 else 1)
    return {"BLOCK_V": block_v, "num_warps": num_warps}


@triton.heuristics({"HAS_ENTROPY": lambda a: a["p_ent"] is not None})
@triton.jit
def token_logprobs_fwd_kernel(
    p_x,  # logits [N, V] as rows (i_b, i_t): offset i_b·stride_xb + i_t·stride_xt, unit stride over V
    p_ids,  # [N]
    p_logp,  # [N] fp32
    p_ent,  # [N] fp32, or None
    p_max,  # [N] fp32: row max of x (raw units)
    p_logs,  # [N] fp32: log Σ_v e^{(x_v − max)/τ}
    V,
    T,  # rows per outer index: row n = (n // T, n % T)
    stride_xb,
    stride_xt,
    stride_ids,
    inv_temperature,
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # logp = (x_id − c)/τ − log s;  H = log s − t/s;  s = Σ e^u, t = Σ e^u·u, u = (x − c)/τ, c = max x
    # Every pointer offset is int64 (program id and column indices cast before any multiply or add to a pointer).
    i_n = tl.program_id(0).to(tl.int64)
    p_x += (i_n // T) * stride_xb + (i_n % T) * stride_xt
    i_id = tl.load(p_ids + i_n * stride_ids).to(tl.int64)
    keep = i_id != ignore_index
    valid = keep & (i_id >= 0) & (i_id < V)
    v_end = tl.where(keep, V, 0)  # an ignored row reads nothing

    m = -float("inf")  # running max of x
    s = 0.0
    t = 0.0
    v0 = 0  # a while loop, not range(): Triton 3.6's interpreter rejects a tensor bound (D178)
    while v0 < v_end:
        o_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
        m_v = o_v < V
        b_x = tl.load(p_x + o_v, mask=m_v, other=-float("inf")).to(tl.float32)  # [BLOCK_V]
        m_new = tl.maximum(m, tl.max(b_x, 0))
        c_new = tl.where(m_new == -float("inf"), 0.0, m_new)
        # e^{−Δ}; 0 while nothing has been accumulated (m = −inf). Every exp below is of a max-shifted value (≤ 0,
        # or −inf): masked lanes hold −inf and give e^{−inf} = 0, never an overflow.
        a = tl.exp((m - c_new) * inv_temperature)
        b_u = (b_x - c_new) * inv_temperature  # [BLOCK_V], ≤ 0, −inf where p_v = 0
        b_e = tl.exp(b_u)
        if HAS_ENTROPY:
            c_old = tl.where(m == -float("inf"), 0.0, m)
            d = (c_new - c_old) * inv_temperature  # Δ (may overflow to +inf for logits of ±3e38)
            b_t = tl.where(b_e > 0.0, b_e * b_u, 0.0)  # p_v = 0 (−inf, or underflow): 0, not 0·(−inf)
            # a = 0: the old mass is below e^{−104} and Δ·e^{−Δ} vanishes with it (never 0·inf)
            t = tl.where(a > 0.0, a * (t - d * s), 0.0) + tl.sum(b_t, 0)
        s = s * a + tl.sum(b_e, 0)
        m = m_new
        v0 += BLOCK_V

    c = tl.where(m == -float("inf"), 0.0, m)
    log_s = tl.log(s)
    i_safe = tl.where(valid, i_id, 0)
    b_xid = tl.load(p_x + i_safe, mask=keep, other=0.0).to(tl.float32)
    logp = tl.where(valid, (b_xid - c) * inv_temperature - log_s, float("nan"))
    tl.store(p_logp + i_n, tl.where(keep, logp, 0.0))
    tl.store(p_max + i_n, tl.where(keep, c, 0.0))
    tl.store(p_logs + i_n, tl.where(keep, log_s, 0.0))
    if HAS_ENTROPY:
        tl.store(p_ent + i_n, tl.where(keep, log_s - t / s, 0.0))


@triton.heuristics({
    "HAS_GRAD_LOGP": lambda a: a["p_glogp"] is not None,
    "HAS_GRAD_ENT": lambda a: a["p_gent"] is not None,
    "HAS_GRAD_LSE": lambda a: a["p_glse"] is not None,
    "EMULATE_BF16": lambda a: emulate_bf16(a["p_gx"].dtype),  # interpreter only: its fp32 → bf16 cast truncates
})
@triton.jit
def token_logprobs_bwd_kernel(
    p_x,  # logits [N, V] as rows (i_b, i_t), unit stride over V
    p_ids,  # [N]
    p_max,  # [N] fp32 (forward's row_max)
    p_logs,  # [N] fp32 (forward's row_logsum)
    p_ent,  # [N] fp32 (forward's entropy), or None
    p_glogp,  # [N] fp32 upstream grad of logp, or None
    p_gent,  # [N] fp32 upstream grad of the entropy, or None
    p_glse,  # [N] fp32 upstream grad of lse = c/τ + log s, or None
    p_gx,  # grad_logits [N, V] as rows (i_b, i_t) with its own strides (p_x itself for the in-place backward)
    V,
    T,
    stride_xb,
    stride_xt,
    stride_gb,
    stride_gt,
    stride_ids,
    inv_temperature,
    ignore_index,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # grad_x_v = [g_l δ_{v,id} − g_p p_v − g_H p_v (log p_v + H)] / τ, g_p = g_l − g_lse, log p_v = (x_v − c)/τ − log s
    # In place (p_gx = p_x): each element is loaded, then stored, by the same lanes of the same program; the sampled
    # logit is not needed after the forward. Every pointer offset is int64.
    i_n = tl.program_id(0).to(tl.int64)
    p_x += (i_n // T) * stride_xb + (i_n % T) * stride_xt
    p_gx += (i_n // T) * stride_gb + (i_n % T) * stride_gt
    i_id = tl.load(p_ids + i_n * stride_ids).to(tl.int64)
    keep = i_id != ignore_index
    v_read = tl.where(keep, V, 0)  # an ignored row reads nothing (and writes zeros)
    c = tl.load(p_max + i_n)
    log_s = tl.load(p_logs + i_n)
    g_l = 0.0
    g_p = 0.0
    g_h = 0.0
    h = 0.0
    if HAS_GRAD_LOGP:
        g_l = tl.where(keep, tl.load(p_glogp + i_n), 0.0)
        g_p = g_l
    if HAS_GRAD_LSE:
        g_p -= tl.where(keep, tl.load(p_glse + i_n), 0.0)
    if HAS_GRAD_ENT:
        g_h = tl.where(keep, tl.load(p_gent + i_n), 0.0)
        h = tl.load(p_ent + i_n)
    v0 = 0  # a while loop, not range(): Triton 3.6's interpreter rejects a tensor bound (D178)
    while v0 < V:  # every row is written, an ignored one with zeros (its loads are skipped)
        o_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
        m_v = o_v < V
        # ignored rows and masked lanes load −inf: (−inf − c)/τ − log s = −inf, e^{−inf} = 0 (no unshifted exp)
        b_x = tl.load(p_x + o_v, mask=o_v < v_read, other=-float("inf")).to(tl.float32)
        b_lp = (b_x - c) * inv_temperature - log_s  # log p_v
        b_p = tl.exp(b_lp)
        b_g = tl.where(o_v == i_id, g_l, 0.0) - b_p * g_p
        if HAS_GRAD_ENT:
            b_g -= tl.where(b_p > 0.0, b_p * (b_lp + h), 0.0) * g_h
        # fp32 up to here; one rounding (to nearest even) to grad_logits' dtype at the store
        tl.store(p_gx + o_v, round_to(b_g * inv_temperature, p_gx, EMULATE_BF16), mask=m_v)
        v0 += BLOCK_V


def token_logprobs_fwd(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch on ``logits: [..., V]`` (fp32/bf16/fp16, any strides), ``ids: [...]`` →
    ``(logp, entropy or None, row_max, row_logsum)``, each fp32 of ``ids``' shape.

    ``block_v`` / ``num_warps`` override the pinned default (tests use a small block to cover the multi-block path).
    """
    assert logits.shape[:-1] == ids.shape and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
    V = logits.shape[-1]
    x, _, T, sb, st = collapse_rows(logits)  # rows (n // T, n % T), no copy for e.g. logits[:, :-1]
    ids1 = ids.reshape(-1)
    N = ids1.numel()
    dev = logits.device
    logp, row_max, row_logsum = (empty(ids.shape, dtype=torch.float32, device=dev) for _ in range(3))
    ent = empty(ids.shape, dtype=torch.float32, device=dev) if return_entropy else None
    if N == 0:
        return logp, ent, row_max, row_logsum
    cfg = default_config(V, logits.dtype)
    cfg.update({k: v for k, v in (("BLOCK_V", block_v), ("num_warps", num_warps)) if v is not None})
    with _dispatch.device_guard(logits):
        token_logprobs_fwd_kernel[(N,)](
            x, ids1, logp, ent, row_max, row_logsum,
            V, T, sb, st, ids1.stride(0), 1.0 / float(temperature), int(ignore_index),
            BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
        )
    return logp, ent, row_max, row_logsum


def token_logprobs_bwd(
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    ids: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    entropy: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    grad_lse: torch.Tensor | None = None,
    inplace: bool = False,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``grad_logits: [..., V]`` (logits' dtype) from the upstream grads ``[...]`` (any may be None) and the
    forward's saved ``row_max``, ``row_logsum`` (and ``entropy`` when ``grad_entropy`` is given).

    Contiguous and fresh by default; ``inplace=True`` writes it over ``logits`` itself and returns ``logits`` (whose
    rows must then collapse without a copy: the caller checks, see ``srpo_core.common.chunked.rows_in_place``)."""
    assert logits.shape[:-1] == ids.shape and (grad_entropy is None or entropy is not None)
    V = logits.shape[-1]
    x, _, T, sb, st = collapse_rows(logits)  # rows (n // T, n % T), no copy for e.g. logits[:, :-1]
    ids1 = ids.reshape(-1)
    N = ids1.numel()
    if inplace:
        assert x.data_ptr() == logits.data_ptr(), "in-place backward on logits whose rows do not collapse"
        grad, gb, gt = x, sb, st
    else:
        grad = empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gb, gt = T * V, V  # contiguous [..., V] seen as the same (n // T, n % T) rows
    if N == 0 or V == 0:
        return logits if inplace else grad

    def flat(t):
        return None if t is None else t.reshape(-1).to(torch.float32).contiguous()

    cfg = default_config(V, logits.dtype)
    cfg.update({k: v for k, v in (("BLOCK_V", block_v), ("num_warps", num_warps)) if v is not None})
    with _dispatch.device_guard(logits):
        token_logprobs_bwd_kernel[(N,)](
            x, ids1, flat(row_max), flat(row_logsum), flat(entropy) if grad_entropy is not None else None,
            flat(grad_logp), flat(grad_entropy), flat(grad_lse), grad,
            V, T, sb, st, gb, gt, ids1.stride(0), 1.0 / float(temperature), int(ignore_index),
            BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
        )
    return logits if inplace else grad


def _report_entries() -> list[dict]:
    """What ``benchmarks/gpu_report.py`` compiles: the launcher's default config for a large vocabulary (V ≥ 4096,
    a multiple of 16 like every common vocabulary, contiguous ``[N, V]`` logits), per logits dtype and variant."""
    # contiguous [N, V] logits: one row dim (T = N, stride_xb = 0, stride_xt = V), unit-stride ids
    common = {"V": "i32:16", "T": "i32", "stride_xb": "i32:16", "stride_xt": "i32:16",
              "stride_ids": "constexpr", "inv_temperature": "fp32", "ignore_index": "i32"}
    entries = []
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = default_config(1 << 17, torch_dtype)
        for ent in (False, True):
            entries.append({
                "name": f"token_logprobs_fwd[{dtype}{',entropy' if ent else ''}]",
                "fn": token_logprobs_fwd_kernel.fn,  # the @triton.jit function under the heuristics
                "signature": {"p_x": f"*{dtype}", "p_ids": "*i64", "p_logp": "*fp32",
                              "p_ent": "*fp32" if ent else "constexpr", "p_max": "*fp32", "p_logs": "*fp32",
                              **common, "HAS_ENTROPY": "constexpr", "BLOCK_V": "constexpr"},
                "constexprs": {"stride_ids": 1, "HAS_ENTROPY": ent, "BLOCK_V": cfg["BLOCK_V"],
                               **({} if ent else {"p_ent": None})},
                "num_warps": cfg["num_warps"],
                "bytes": "N·V·s = floor (each row read once)",
                "load_dtype": dtype,
            })
        for grads in ("logp", "both"):  # the grad of logp only, or of logp and the entropy
            ent = grads == "both"
            entries.append({
                "name": f"token_logprobs_bwd[{dtype},{grads}]",
                "fn": token_logprobs_bwd_kernel.fn,
                "signature": {"p_x": f"*{dtype}", "p_ids": "*i64", "p_max": "*fp32", "p_logs": "*fp32",
                              "p_ent": "*fp32" if ent else "constexpr", "p_glogp": "*fp32",
                              "p_gent": "*fp32" if ent else "constexpr", "p_glse": "constexpr", "p_gx": f"*{dtype}",
                              **common, "stride_gb": "i32:16", "stride_gt": "i32:16", "HAS_GRAD_LOGP": "constexpr",
                              "HAS_GRAD_ENT": "constexpr", "HAS_GRAD_LSE": "constexpr", "EMULATE_BF16": "constexpr",
                              "BLOCK_V": "constexpr"},
                "constexprs": {"stride_ids": 1, "HAS_GRAD_LOGP": True, "HAS_GRAD_ENT": ent, "HAS_GRAD_LSE": False,
                               "EMULATE_BF16": False, "p_glse": None, "BLOCK_V": cfg["BLOCK_V"],
                               **({} if ent else {"p_ent": None, "p_gent": None})},
                "num_warps": cfg["num_warps"],
                "bytes": "2·N·V·s = floor (row read once, grad written once)",
                "load_dtype": dtype,
            })
    return entries


GPU_REPORT = _report_entries()

__all__ = [
    "GPU_REPORT",
    "default_config",
    "token_logprobs_bwd",
    "token_logprobs_bwd_kernel",
    "token_logprobs_fwd",
    "token_logprobs_fwd_kernel",
]
