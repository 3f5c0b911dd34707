"""Fast CPU path of ``token_logprobs``: row chunks of the logits, forward and backward (torch ops, any device; the
``"torch"`` backend of ``srpo_core.ops.token_logprobs``). No input checks, no backend choice: the public op does both.

On the CPU, where a C++ compiler works, the chunk functions are ``torch.compile``d (inductor fuses each into one or
two passes with no ``[rows, V]`` temporaries); otherwise (or with ``SRPO_NO_COMPILE=1``, or for inputs under
``TUNING.token_logprobs_compile_min_elements``) eager chunks reuse two ``[rows, V]`` fp32 workspaces of at most
``TUNING.token_logprobs_chunk_elements`` elements each. Either way the peak extra memory is a chunk, not ``[N, V]``.

Forward saves per row ``row_max = c = max_v x_v`` and ``row_logsum = log Σ_v e^{(x_v − c)/τ}`` (plus the entropy when
asked); backward recomputes ``p`` from the logits and these, once.
"""

from __future__ import annotations

import math

import torch

from srpo_core.common import chunked
from srpo_core.tuning import TUNING

OP = "token_logprobs"
# chunk sizes: TUNING.token_logprobs_* (srpo_core/tuning.py)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_floor(dtype: torch.dtype) -> float:
    """A ``log p`` so small that ``e^{it} = 0`` in ``dtype``: clamping ``log p`` to it keeps ``p · log p`` at 0 for
    ``p = 0`` (``log p = −inf``) and changes nothing else."""
    return 2.0 * math.log(torch.finfo(dtype).smallest_normal)


# ---------------------------------------------------------------------------------------- compiled chunk functions
# Pure torch on one chunk x: [r, V] (unit stride over V); inductor fuses each into passes over x without temporaries.
def _fwd_chunk(x, ids, inv_t, entropy: bool):
    """→ ``(logp, c, log s[, H])`` per row: ``c = max x``, ``u = (x − c)·inv_t``, ``s = Σ e^u``,
    ``logp = (x_id − c)·inv_t − log s``, ``H = log s − Σ e^u u / s``."""
    xa = x.to(inv_t.dtype)
    m = xa.amax(-1)
    c = torch.where(m == -math.inf, torch.zeros_like(m), m)
    u = (xa - c[:, None]) * inv_t
    e = torch.exp(u)
    s = e.sum(-1)
    log_s = torch.log(s)
    x_id = xa.gather(1, ids[:, None]).squeeze(1)
    logp = (x_id - c) * inv_t - log_s
    if not entropy:
        return logp, c, log_s
    t = torch.where(xa == -math.inf, torch.zeros_like(u), e * u).sum(-1)
    return logp, c, log_s, log_s - t / s


def _fwd_chunk_lp(x, ids, inv_t):
    return _fwd_chunk(x, ids, inv_t, False)


def _fwd_chunk_ent(x, ids, inv_t):
    return _fwd_chunk(x, ids, inv_t, True)


def _bwd_chunk(out, x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t, entropy: bool):
    """``out[r, v] = keep_r · [g_l δ_{v,id} − g_p p_v − g_H p_v (log p_v + H)] · inv_t`` (written once; ``g_p =
    g_l − g_lse``). ``out`` may be ``x`` itself (in-place backward): every element is read before it is written."""
    lp = (x.to(inv_t.dtype) - c[:, None]) * inv_t - log_s[:, None]
    p = torch.exp(lp)
    col = torch.arange(x.shape[1], device=x.device)
    g = torch.where(col[None, :] == delta_ids[:, None], g_l[:, None], torch.zeros_like(p)) - p * g_p[:, None]
    if entropy:
        g = g - torch.where(p > 0, p * (lp + h[:, None]), torch.zeros_like(p)) * g_h[:, None]
    out.copy_(torch.where(keep[:, None], g * inv_t, torch.zeros_like(g)))


def _bwd_chunk_lp(out, x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t):
    _bwd_chunk(out, x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t, False)


def _bwd_chunk_ent(out, x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t):
    _bwd_chunk(out, x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t, True)


def _bwd_chunk_lp_(x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t):  # in place: out is x
    _bwd_chunk(x, x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t, False)


def _bwd_chunk_ent_(x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t):
    _bwd_chunk(x, x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t, True)


def _fwd_chunk_shifted(x, ids, inv_t):
    """→ ``(c, s)`` per row with ``c = x_id``, ``s = Σ_v e^{(x_v − c)·inv_t}`` (see :func:`_fwd_lp_shifted`): one
    read of ``x``."""
    xa = x.to(inv_t.dtype)
    c = xa.gather(1, ids[:, None])
    return c.squeeze(1), torch.exp((xa - c) * inv_t).sum(-1)


_COMPILED = {
    "fwd_shifted": chunked.Compiled(_fwd_chunk_shifted),
    "fwd": chunked.Compiled(_fwd_chunk_lp),
    "fwd_ent": chunked.Compiled(_fwd_chunk_ent),
    "bwd": chunked.Compiled(_bwd_chunk_lp),
    "bwd_ent": chunked.Compiled(_bwd_chunk_ent),
    "bwd_": chunked.Compiled(_bwd_chunk_lp_),
    "bwd_ent_": chunked.Compiled(_bwd_chunk_ent_),
}


# ------------------------------------------------------------------------------------------- eager chunk functions
# The same math with in-place ops on reused workspaces (a fresh [r, V] temporary per op costs page faults that make
# eager composition slower than a fused log_softmax).
def _fwd_chunk_eager(x, ids, inv_t: float, entropy: bool, ws: list[torch.Tensor]):
    r = x.shape[0]
    u = ws[0][:r]
    xa = x
    if x.dtype != u.dtype:
        xa = u.copy_(x)
    m = xa.amax(-1)
    c = torch.where(m == -math.inf, torch.zeros_like(m), m)
    torch.sub(xa, c[:, None], out=u)
    if inv_t != 1.0:
        u.mul_(inv_t)
    x_id = x.gather(1, ids[:, None]).squeeze(1).to(u.dtype)
    logp_shift = (x_id - c) * inv_t
    if entropy:
        e = torch.exp(u, out=ws[1][:r])
        s = e.sum(-1)
        u.clamp_(min=_log_floor(u.dtype))  # −inf (p = 0) → a finite floor, so that e·u = 0 there
        t = u.mul_(e).sum(-1)  # torch's cascaded sum (a BLAS dot loses ~1e-4 relative at V = 262,144)
        log_s = torch.log(s)
        return logp_shift - log_s, c, log_s, log_s - t / s
    s = u.exp_().sum(-1)
    log_s = torch.log(s)
    return logp_shift - log_s, c, log_s


def _bwd_chunk_eager(out, x, delta_ids, keep, c, log_s, h, g_l, g_p, g_h, inv_t: float, entropy: bool, ws):
    """As :func:`_bwd_chunk`, on the workspaces; ``out`` may be ``x`` (``x`` is read into ``ws`` first)."""
    r = x.shape[0]
    lp = torch.sub(x, c[:, None], out=ws[0][:r])  # promotes bf16/fp16 x to the fp32 workspace
    if inv_t != 1.0:
        lp.mul_(inv_t)
    lp.sub_(log_s[:, None])  # log p
    if entropy:
        p = torch.exp(lp, out=ws[1][:r])
        # w = g_p + g_H (log p + H), with log p floored so that p·w = 0 where p = 0
        lp.clamp_(min=_log_floor(lp.dtype)).add_(h[:, None]).mul_(g_h[:, None]).add_(g_p[:, None])
        p.mul_(lp)
    else:
        p = lp.exp_().mul_(g_p[:, None])
    p.mul_(-inv_t)
    hit = (delta_ids >= 0).nonzero().squeeze(1)  # rows with a δ term (valid, owned ids)
    if hit.numel():  # in the fp32 workspace: g (1 − p) must round once, not twice
        p.index_put_((hit, delta_ids[hit]), g_l[hit] * inv_t, accumulate=True)
    if not bool(keep.all()):
        p.masked_fill_(~keep[:, None], 0)
    out.copy_(p)


# ------------------------------------------------------------------------------- one-pass log-probs (CPU, no entropy)
SHIFT_MAX_EXTRA = 8.0  # redo a row when log s > log V + this: logp < −(log V + 8), the sampled token far below the top
# rows per chunk: TUNING.token_logprobs_shift_chunk_bytes of fp32 (few Python steps; the passes after the first
# read the workspace from cache)


def _fwd_lp_shifted(logits, safe, keep, inv_t: float, outs, compiled: bool) -> None:
    """``logp = −log Σ_v e^{(x_v − x_id)·inv_t}``: shifted by the sampled token's own logit instead of the row max, so
    the logits are read from memory once (the max pass is what makes a log-softmax read them twice) and ``s ≥ 1``.
    Writes ``outs = [logp, c, log s]`` with ``c = x_id`` (``lse = c·inv_t + log s`` for any shift). Kept rows are
    redone with the row max (:func:`_fwd_chunk_eager`) where the sum is not finite (a logit more than ~88/inv_t
    above the sampled one, ``x_id = ±inf``/NaN) or where ``log s > log V + SHIFT_MAX_EXTRA``: the sampled token is
    that far below the row's top logits, and the backward's ``(x − c)·inv_t − log s`` would cancel for them (the row
    max keeps it exact). The caller sends only batches whose kept ids are all valid. ``compiled``: the chunks run
    as one inductor kernel each (:func:`_fwd_chunk_shifted`), else as three eager passes over a cached workspace."""
    V = logits.shape[-1]
    acc = outs[0].dtype
    rows = max(1, TUNING.token_logprobs_shift_chunk_bytes // (4 * V))
    ws = torch.empty(min(rows, keep.numel()), V, dtype=acc, device=logits.device)
    logp, c_out, log_s_out = outs
    if compiled:  # one fused pass per chunk: the read of x at exp throughput, no workspace traffic
        inv_t_tensor = torch.tensor(inv_t, dtype=acc)
        try:
            for n0, chunk in chunked.row_chunks(logits, max(1, TUNING.token_logprobs_compiled_chunk_elements // V)):
                r = chunk.shape[0]
                # a one-row chunk (the tail) runs the same function eagerly: dynamic shapes still specialise on 1
                fn = _fwd_chunk_shifted if r == 1 else _COMPILED["fwd_shifted"]
                c_out[n0:n0 + r], log_s_out[n0:n0 + r] = fn(chunk, safe[n0:n0 + r], inv_t_tensor)
        except Exception as err:  # no C++ compiler, an inductor error: the eager chunks below, same values
            chunked.compile_failed(OP, err)
            compiled = False
    if not compiled:
        for n0, chunk in chunked.row_chunks(logits, rows):
            r = chunk.shape[0]
            c = chunk.gather(1, safe[n0:n0 + r, None]).squeeze(1).to(acc)
            u = ws[:r]
            if chunk.dtype == acc:
                torch.sub(chunk, c[:, None], out=u)
            else:  # bf16/fp16: upcast first (a mixed-dtype sub would round in the input dtype)
                u.copy_(chunk).sub_(c[:, None])
            if inv_t != 1.0:
                u.mul_(inv_t)
            c_out[n0:n0 + r] = c
            torch.sum(u.exp_(), -1, out=log_s_out[n0:n0 + r])
    log_s_out.log_()
    torch.neg(log_s_out, out=logp)
    # log s = −logp ≤ log V + 8: the backward's log p of the top tokens, (x − c)·inv_t − log s, then carries at most
    # ~(log V + 8) ulps, against ~log V for the max shift
    redo = (keep & ~(torch.isfinite(log_s_out) & (log_s_out <= math.log(V) + SHIFT_MAX_EXTRA))).nonzero().squeeze(1)
    lead = logits.shape[:-1]
    for i0 in range(0, redo.numel(), ws.shape[0]):  # the rows to redo are few: gather only them (no reshape copy)
        idx = redo[i0:i0 + ws.shape[0]]
        rows_x = logits[torch.unravel_index(idx, lead)] if lead else logits.reshape(1, V)[idx]  # [V]: one row
        parts = _fwd_chunk_eager(rows_x, safe[idx], inv_t, False, [ws[:idx.numel()]])
        for out, part in zip(outs, parts, strict=True):
            out[idx] = part


# ------------------------------------------------------------------------------------------------------ torch path
def _row_info(ids: torch.Tensor, V: int, ignore_index: int):
    """``ids: [...]`` → flat ``keep`` (not ignored), ``valid`` (kept and in ``[0, V)``) and safe gather indices."""
    ids1 = ids.reshape(-1).long()
    keep = ids1 != ignore_index
    valid = keep & (ids1 >= 0) & (ids1 < V)
    return keep, valid, torch.where(valid, ids1, torch.zeros_like(ids1))


def _torch_fwd(logits, ids, temperature, ignore_index, return_entropy):
    V = logits.shape[-1]
    acc = _acc_dtype(logits.dtype)
    dev = logits.device
    keep, valid, safe = _row_info(ids, V, ignore_index)
    N = keep.numel()
    outs = [torch.empty(N, dtype=acc, device=dev) for _ in range(4 if return_entropy else 3)]
    if N:
        inv_t = 1.0 / temperature
        done = False
        # one pass over the logits (the max pass was the second), where every kept id is in range (not for a
        # vocab-parallel shard, whose rows mostly sample another shard's token)
        compiled = chunked.compile_wanted(dev) and N * V >= TUNING.token_logprobs_compile_min_elements
        if not return_entropy and dev.type == "cpu" and bool((valid | ~keep).all()):
            _fwd_lp_shifted(logits, safe, keep, inv_t, outs, compiled)
            done = True
        if not done and compiled:
            fn = _COMPILED["fwd_ent" if return_entropy else "fwd"]
            inv_t_tensor = torch.tensor(inv_t, dtype=acc)
            rows = max(1, TUNING.token_logprobs_compiled_chunk_elements // V)
            try:
                for n0, chunk in chunked.row_chunks(logits, rows):
                    parts = fn(chunk, safe[n0:n0 + chunk.shape[0]], inv_t_tensor)
                    for out, part in zip(outs, parts, strict=True):
                        out[n0:n0 + chunk.shape[0]] = part
                done = True
            except Exception as err:  # no C++ compiler, an inductor error: eager chunks, same values
                chunked.compile_failed(OP, err)
        if not done:
            rows = max(1, min(N, TUNING.token_logprobs_chunk_elements // V))
            ws = [torch.empty(rows, V, dtype=acc, device=dev) for _ in range(2 if return_entropy else 1)]
            for n0, chunk in chunked.row_chunks(logits, rows):
                parts = _fwd_chunk_eager(chunk, safe[n0:n0 + chunk.shape[0]], inv_t, return_entropy, ws)
                for out, part in zip(outs, parts, strict=True):
                    out[n0:n0 + chunk.shape[0]] = part
    # Each output is a fresh tensor of ids' shape (``where`` over shaped views), never a view of a buffer: a custom
    # op whose outputs are views makes autograd refuse in-place edits of them ("returns multiple views").
    shape = ids.shape
    keep, valid = keep.view(shape), valid.view(shape)
    logp, c, log_s = (t.view(shape) for t in outs[:3])
    zero = torch.zeros((), dtype=acc, device=dev)
    nan = torch.full((), math.nan, dtype=acc, device=dev)
    logp = torch.where(keep, torch.where(valid, logp, nan), zero)
    ent = torch.where(keep, outs[3].view(shape), zero) if return_entropy else None
    return logp, ent, torch.where(keep, c, zero), torch.where(keep, log_s, zero)


def _torch_bwd(grad_logp, grad_entropy, grad_lse, logits, ids, row_max, row_logsum, entropy, temperature,
               ignore_index, inplace: bool = False):
    """``grad_logits`` (fresh and contiguous), or written over ``logits`` itself when ``inplace`` (the caller
    checked that its rows collapse without a copy)."""
    V = logits.shape[-1]
    acc = _acc_dtype(logits.dtype)
    dev = logits.device
    keep, valid, _ = _row_info(ids, V, ignore_index)
    N = keep.numel()
    grad = logits if inplace else chunked.empty_large(logits.shape, dtype=logits.dtype, device=dev)
    if N == 0 or V == 0:
        return grad
    use_ent = grad_entropy is not None

    def flat(t):
        return torch.zeros(N, dtype=acc, device=dev) if t is None else t.reshape(-1).to(acc).contiguous()

    c, log_s, g_l, g_h = flat(row_max), flat(row_logsum), flat(grad_logp), flat(grad_entropy)
    h = flat(entropy if use_ent else None)
    g_l = torch.where(keep, g_l, torch.zeros_like(g_l))
    g_p = g_l if grad_lse is None else g_l - torch.where(keep, flat(grad_lse), torch.zeros_like(g_l))
    g_h = torch.where(keep, g_h, torch.zeros_like(g_h))
    delta_ids = torch.where(valid, ids.reshape(-1).long(), torch.full_like(g_l, -1, dtype=torch.long))
    inv_t = 1.0 / temperature
    if chunked.compile_wanted(dev) and N * V >= TUNING.token_logprobs_compile_min_elements:
        fn = _COMPILED[("bwd_ent" if use_ent else "bwd") + ("_" if inplace else "")]
        inv_t_tensor = torch.tensor(inv_t, dtype=acc)
        rows = max(1, TUNING.token_logprobs_compiled_chunk_elements // V)
        written = False
        try:
            for n0, (chunk, out) in chunked.row_chunks_multi((logits, grad), rows):
                sl = slice(n0, n0 + chunk.shape[0])
                args = (delta_ids[sl], keep[sl], c[sl], log_s[sl], h[sl], g_l[sl], g_p[sl], g_h[sl], inv_t_tensor)
                if inplace:
                    fn(chunk, *args)
                else:
                    fn(out, chunk, *args)
                written = True
            return grad
        except Exception as err:
            if inplace and written:  # rows already hold gradients: the eager chunks would read them as logits
                raise
            chunked.compile_failed(OP, err)
    rows = max(1, min(N, TUNING.token_logprobs_chunk_elements // V))
    ws = [torch.empty(rows, V, dtype=acc, device=dev) for _ in range(2 if use_ent else 1)]
    for n0, (chunk, out) in chunked.row_chunks_multi((logits, grad), rows):
        sl = slice(n0, n0 + chunk.shape[0])
        _bwd_chunk_eager(out, chunk, delta_ids[sl], keep[sl], c[sl], log_s[sl], h[sl], g_l[sl], g_p[sl], g_h[sl],
                         inv_t, use_ent, ws)
    return grad
