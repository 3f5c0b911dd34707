"""Public ``token_logprobs``: the log-prob of the sampled token (and the entropy of the next-token distribution) from
the logit rows, without materialising a softmax, differentiable in the logits.

Backends:

- ``"triton"``: the fused kernels in ``srpo_core.kernels.token_logprobs`` (forward reads each row once; backward reads
  it once more and writes ``grad_logits`` once).
- ``"torch"``: row chunks. On the CPU, where a C++ compiler works, the chunk functions are ``torch.compile``d
  (inductor fuses each into one or two passes with no ``[rows, V]`` temporaries); otherwise (or with
  ``SRPO_NO_COMPILE=1``, or for inputs under ``COMPILE_MIN_ELEMENTS``) eager chunks reuse two ``[rows, V]`` fp32
  workspaces of at most ``CHUNK_ELEMENTS`` elements each. Either way the peak extra memory is a chunk, not ``[N, V]``.
- ``"auto"``: Triton for CUDA tensors, torch otherwise.

Every backend saves the same per-row statistics for backward: ``row_max = c = max_v x_v`` and ``row_logsum =
log Σ_v e^{(x_v − c)/τ}`` (the log-sum-exp split in two, so that ``log p_v = (x_v − c)/τ − row_logsum`` is exact to a
few ulps even for logits of ±1e4), plus the entropy when it is an output. Backward recomputes ``p`` from the logits
and these, once.

The op is registered as ``torch.ops.srpo_core.token_logprobs`` (forward: ``logp, entropy, lse, row_max,
row_logsum``) and ``torch.ops.srpo_core.token_logprobs_backward`` (plus ``token_logprobs_backward_``, which writes
the gradient over the logits for ``inplace_backward=True``), ``torch.library`` custom ops with fake kernels and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through a training step that calls
:func:`token_logprobs`, and meta tensors get shapes. ``ids [..., K]``, ``shift``, ``out_dtype`` and ``return_lse``
are handled around the op (D81-D83).

Vocab-parallel (``process_group`` given): ``logits`` is this rank's shard ``[..., V_local]`` of the vocabulary
``[vocab_start, vocab_start + V_local)``. Each rank reduces its shard to ``(row_max, row_logsum, entropy)`` and the
owner of the sampled id adds its logit; one all-reduce of the max and one of three sums give every rank the
full-vocabulary result. Backward needs no communication: each rank writes the gradient of its shard from the global
statistics (the upstream gradients are the same on every rank, as in Megatron's vocab-parallel cross-entropy).
"""

from __future__ import annotations

import math

import torch

from srpo_core import _chunked, _dispatch
from srpo_core._validate import describe, require_same_device, require_tensor

OP = "token_logprobs"
CHUNK_ELEMENTS = 1 << 21  # eager chunks: rows · V ≤ this (8 MiB per fp32 workspace; two workspaces at most)
COMPILED_CHUNK_ELEMENTS = 1 << 26  # compiled chunks hold no [rows, V] temporaries; this keeps indices in int32
COMPILE_MIN_ELEMENTS = 1 << 22  # smaller inputs run the eager chunks: a compile (seconds, once) would not pay off


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


_COMPILED = {
    "fwd": _chunked.Compiled(_fwd_chunk_lp),
    "fwd_ent": _chunked.Compiled(_fwd_chunk_ent),
    "bwd": _chunked.Compiled(_bwd_chunk_lp),
    "bwd_ent": _chunked.Compiled(_bwd_chunk_ent),
    "bwd_": _chunked.Compiled(_bwd_chunk_lp_),
    "bwd_ent_": _chunked.Compiled(_bwd_chunk_ent_),
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
        if _chunked.compile_wanted(dev) and N * V >= COMPILE_MIN_ELEMENTS:
            fn = _COMPILED["fwd_ent" if return_entropy else "fwd"]
            inv_t_tensor = torch.tensor(inv_t, dtype=acc)
            rows = max(1, COMPILED_CHUNK_ELEMENTS // V)
            try:
                for n0, chunk in _chunked.row_chunks(logits, rows):
                    parts = fn(chunk, safe[n0:n0 + chunk.shape[0]], inv_t_tensor)
                    for out, part in zip(outs, parts, strict=True):
                        out[n0:n0 + chunk.shape[0]] = part
                done = True
            except Exception as err:  # no C++ compiler, an inductor error: eager chunks, same values
                _chunked.compile_failed(OP, err)
        if not done:
            rows = max(1, min(N, CHUNK_ELEMENTS // V))
            ws = [torch.empty(rows, V, dtype=acc, device=dev) for _ in range(2 if return_entropy else 1)]
            for n0, chunk in _chunked.row_chunks(logits, rows):
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
    grad = logits if inplace else _chunked.empty_large(logits.shape, dtype=logits.dtype, device=dev)
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
    if _chunked.compile_wanted(dev) and N * V >= COMPILE_MIN_ELEMENTS:
        fn = _COMPILED[("bwd_ent" if use_ent else "bwd") + ("_" if inplace else "")]
        inv_t_tensor = torch.tensor(inv_t, dtype=acc)
        rows = max(1, COMPILED_CHUNK_ELEMENTS // V)
        written = False
        try:
            for n0, (chunk, out) in _chunked.row_chunks_multi((logits, grad), rows):
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
            _chunked.compile_failed(OP, err)
    rows = max(1, min(N, CHUNK_ELEMENTS // V))
    ws = [torch.empty(rows, V, dtype=acc, device=dev) for _ in range(2 if use_ent else 1)]
    for n0, (chunk, out) in _chunked.row_chunks_multi((logits, grad), rows):
        sl = slice(n0, n0 + chunk.shape[0])
        _bwd_chunk_eager(out, chunk, delta_ids[sl], keep[sl], c[sl], log_s[sl], h[sl], g_l[sl], g_p[sl], g_h[sl],
                         inv_t, use_ent, ws)
    return grad


# ------------------------------------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("srpo_core::token_logprobs", mutates_args=())
def _token_logprobs_op(logits: torch.Tensor, ids: torch.Tensor, temperature: float, ignore_index: int,
                       return_entropy: bool, backend: str, inplace_backward: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ ``(logp, entropy, lse, row_max, row_logsum)``, each of ``ids``' shape (``entropy`` is ``[0]`` when not
    asked; ``lse = row_max/τ + row_logsum = logsumexp(logits/τ)``, 0 on ignored rows). ``inplace_backward`` only
    tells the autograd formula where to write the gradient."""
    if backend == "triton":
        from srpo_core.kernels.token_logprobs import token_logprobs_fwd

        logp, ent, row_max, row_logsum = token_logprobs_fwd(logits, ids, temperature=temperature,
                                                            ignore_index=ignore_index, return_entropy=return_entropy)
    else:
        logp, ent, row_max, row_logsum = _torch_fwd(logits, ids, temperature, ignore_index, return_entropy)
    if ent is None:
        ent = logp.new_empty(0)
    lse = row_max * (1.0 / temperature) + row_logsum
    return tuple(_own(t) for t in (logp, ent, lse, row_max, row_logsum))


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it owns its storage, else a copy (``[...]``-sized: cheap). Custom-op outputs must not be views, or
    autograd refuses in-place edits of them (issue 17)."""
    return t if t._base is None else t.clone()


@_token_logprobs_op.register_fake
def _(logits, ids, temperature, ignore_index, return_entropy, backend, inplace_backward=False):
    dtype = _acc_dtype(logits.dtype)
    shape = logits.shape[:-1]
    return (logits.new_empty(shape, dtype=dtype), logits.new_empty(shape if return_entropy else (0,), dtype=dtype),
            logits.new_empty(shape, dtype=dtype), logits.new_empty(shape, dtype=dtype),
            logits.new_empty(shape, dtype=dtype))


def _backward_impl(grad_logp, grad_entropy, grad_lse, logits, ids, row_max, row_logsum, entropy, temperature,
                   ignore_index, backend, inplace):
    if backend == "triton":
        from srpo_core.kernels.token_logprobs import token_logprobs_bwd

        return token_logprobs_bwd(grad_logp, grad_entropy, logits, ids, row_max, row_logsum, entropy,
                                  temperature=temperature, ignore_index=ignore_index, grad_lse=grad_lse,
                                  inplace=inplace)
    return _torch_bwd(grad_logp, grad_entropy, grad_lse, logits, ids, row_max, row_logsum, entropy, temperature,
                      ignore_index, inplace=inplace)


@torch.library.custom_op("srpo_core::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                                grad_lse: torch.Tensor | None, logits: torch.Tensor, ids: torch.Tensor,
                                row_max: torch.Tensor, row_logsum: torch.Tensor, entropy: torch.Tensor | None,
                                temperature: float, ignore_index: int, backend: str) -> torch.Tensor:
    """→ ``grad_logits`` (contiguous, logits' shape and dtype)."""
    return _backward_impl(grad_logp, grad_entropy, grad_lse, logits, ids, row_max, row_logsum, entropy, temperature,
                          ignore_index, backend, False)


@_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, grad_lse, logits, ids, row_max, row_logsum, entropy, temperature, ignore_index,
      backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("srpo_core::token_logprobs_backward_", mutates_args=("logits",))
def _token_logprobs_backward_inplace_op(grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                                        grad_lse: torch.Tensor | None, logits: torch.Tensor, ids: torch.Tensor,
                                        row_max: torch.Tensor, row_logsum: torch.Tensor,
                                        entropy: torch.Tensor | None, temperature: float, ignore_index: int,
                                        backend: str) -> None:
    """Writes ``grad_logits`` over ``logits`` (``inplace_backward=True``; rows checked by the public function)."""
    _backward_impl(grad_logp, grad_entropy, grad_lse, logits, ids, row_max, row_logsum, entropy, temperature,
                   ignore_index, backend, True)


@_token_logprobs_backward_inplace_op.register_fake
def _(grad_logp, grad_entropy, grad_lse, logits, ids, row_max, row_logsum, entropy, temperature, ignore_index,
      backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, ids, temperature, ignore_index, return_entropy, backend, inplace = inputs
    _, ent, _, row_max, row_logsum = output
    # The entropy is an output the caller may edit in place (issue 17): backward keeps its own copy ([...]: cheap).
    ctx.save_for_backward(logits, ids, row_max, row_logsum, ent.detach().clone() if return_entropy else None)
    ctx.args = (temperature, ignore_index, return_entropy, backend, inplace)
    ctx.mark_non_differentiable(row_max, row_logsum)
    ctx.set_materialize_grads(False)  # an output nobody differentiates gives None, not a tensor of zeros


def _backward(ctx, grad_logp, grad_entropy, grad_lse, _grad_max, _grad_logsum):
    temperature, ignore_index, return_entropy, backend, inplace = ctx.args
    logits, ids, row_max, row_logsum, ent = ctx.saved_tensors
    if not return_entropy:
        grad_entropy = None
    none = (None,) * 6
    if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None and grad_lse is None):
        return None, *none
    args = (grad_logp, grad_entropy, grad_lse, logits, ids, row_max, row_logsum, ent, temperature, ignore_index,
            backend)
    if inplace:
        torch.ops.srpo_core.token_logprobs_backward_(*args)
        return logits, *none
    return torch.ops.srpo_core.token_logprobs_backward(*args), *none


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------- vocab-parallel
class _VocabParallel(torch.autograd.Function):
    """Sharded logits ``[..., V_local]`` → full-vocabulary ``(logp, entropy or None)``; see the module docstring."""

    @staticmethod
    def forward(ctx, logits, local_ids, owned, keep, temperature, return_entropy, backend, group):
        # local_ids: the id's column in this shard where owned, V_local (outside the shard) where not, -1 if ignored
        _, ent_r, _, c_r, log_s_r = torch.ops.srpo_core.token_logprobs(
            logits, local_ids, temperature, -1, return_entropy, backend)
        inv_t = 1.0 / temperature
        # global max; a shard whose row is all −inf (stored as c_r = 0, log s_r = −inf) takes no part in it
        c = torch.where(log_s_r == -math.inf, torch.full_like(c_r, -math.inf), c_r)
        if c.numel():
            torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX, group=group)
        c = torch.where(c == -math.inf, torch.zeros_like(c), c)
        a = (c_r - c) * inv_t + log_s_r  # log of this shard's mass relative to e^{c/τ}
        mass = torch.exp(a)
        zero = torch.zeros_like(a)
        x_id = logits.gather(-1, torch.where(owned, local_ids, 0).unsqueeze(-1)).squeeze(-1).to(c.dtype)
        parts = [mass, torch.where(owned, (x_id - c) * inv_t, zero)]  # the owner's sampled logit, shifted
        if return_entropy:  # H = Σ_r w_r (H_r − log w_r), w_r = e^{a_r}/S  ⇒  H = Σ_r e^{a_r} (H_r − a_r) / S + log S
            parts.append(torch.where(mass > 0, mass * (ent_r - a), zero))
        sums = torch.stack(parts)
        if sums.numel():
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
        log_s = torch.log(sums[0])
        logp = torch.where(keep, sums[1] - log_s, zero)
        ent = torch.where(keep, sums[2] / sums[0] + log_s, zero) if return_entropy else None
        c, log_s = torch.where(keep, c, zero), torch.where(keep, log_s, zero)
        ctx.save_for_backward(logits, local_ids, c, log_s, None if ent is None else ent.clone())  # ent: editable
        ctx.args = (temperature, backend)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_ids, c, log_s, ent = ctx.saved_tensors
        temperature, backend = ctx.args
        if ent is None:
            grad_entropy = None
        grad = torch.ops.srpo_core.token_logprobs_backward(grad_logp, grad_entropy, None, logits, local_ids, c, log_s,
                                                           ent, temperature, -1, backend)
        return grad, None, None, None, None, None, None, None


def _check_shards(logits, vocab_start, group) -> int:
    """All-gather every rank's ``(vocab_start, V_local)``; the shards must tile ``[0, V)``. → the global ``V``."""
    dist = torch.distributed
    mine = torch.tensor([vocab_start, logits.shape[-1]], dtype=torch.int64)
    backend = dist.get_backend(group)
    if backend == "nccl":
        mine = mine.to(logits.device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    shards = sorted((int(t[0]), int(t[1]), r) for r, t in enumerate(gathered))
    end = 0
    for start, size, rank in shards:
        if start != end:
            raise ValueError(
                f"{OP}: `vocab_start` must make the ranks' shards tile the vocabulary; the shards (vocab_start, "
                f"V_local) per rank are {[(int(t[0]), int(t[1])) for t in gathered]}: rank {rank}'s starts at "
                f"{start}, expected {end}"
            )
        end = start + size
    return end


def _validate(logits, ids, temperature, return_entropy, ignore_index, process_group, vocab_start) -> None:
    require_tensor(OP, "logits", logits, kind="float")
    require_tensor(OP, "ids", ids, kind="int")
    if logits.dim() == 0:
        raise ValueError(f"{OP}: `logits` must be [..., V] with at least one dim, got {describe(logits)}")
    if ids.shape != logits.shape[:-1] and not (ids.dim() == logits.dim() and ids.shape[:-1] == logits.shape[:-1]):
        raise ValueError(f"{OP}: `ids` must have the leading shape of `logits` {tuple(logits.shape[:-1])} (one id per "
                         f"row of `logits` [..., V]), or that shape plus a last dim K (K ids per row), got "
                         f"{describe(ids)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{OP}: `logits` must have a vocabulary of V >= 1 columns, got {describe(logits)}")
    require_same_device(OP, "logits", logits, ids=ids)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{OP}: `temperature` must be a positive finite float, got {describe(temperature)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{OP}: `temperature` must be a positive finite float, got {temperature!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{OP}: `return_entropy` must be a bool, got {describe(return_entropy)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: `ignore_index` must be an int, got {describe(ignore_index)}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"{OP}: `vocab_start` must be an int >= 0, got {describe(vocab_start)}")
    if process_group is None and vocab_start != 0:
        raise ValueError(f"{OP}: `vocab_start` = {vocab_start} needs a `process_group` (vocab-parallel logits); "
                         f"without one `logits` holds the whole vocabulary and `vocab_start` must be 0")


def _check_inplace(logits: torch.Tensor, process_group) -> None:
    if process_group is not None:
        raise ValueError(f"{OP}: `inplace_backward=True` is not supported with `process_group` (vocab-parallel "
                         f"logits); use the default out-of-place backward")
    if logits.is_leaf and logits.requires_grad:
        raise ValueError(f"{OP}: `inplace_backward=True` would write the gradient over `logits`, but `logits` "
                         f"{describe(logits)} is a leaf that requires grad (its .grad would be its own data); pass "
                         f"the output of the layer that produced the logits, or leave inplace_backward=False")
    if not _chunked.rows_in_place(logits):
        raise ValueError(f"{OP}: `inplace_backward=True` needs logits whose rows can be written in place (unit "
                         f"stride over V, leading dims that collapse to two strides without a copy, no broadcast "
                         f"rows), got {describe(logits)} with strides {tuple(logits.stride())}")


def _check_ids(ids: torch.Tensor, V: int, ignore_index: int, what: str = "V") -> None:
    """Every id is ``ignore_index`` or in ``[0, V)`` (one device sync; skipped while torch.compile traces)."""
    bad = (ids != ignore_index) & ((ids < 0) | (ids >= V))
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        where = f"ids[{', '.join(map(str, idx))}]" if idx else "ids"
        raise ValueError(f"{OP}: `ids` must lie in [0, {what}) = [0, {V}) or equal ignore_index={ignore_index}, "
                         f"got {where} = {int(ids[idx])} ({int(bad.sum())} such id(s))")


class _GatherShifted(torch.autograd.Function):
    """``(logits[..., ids_k] − row_max)/τ − row_logsum`` per gathered id (the max-shifted form, exact for logits of
    ±1e4); its gradient is the ``δ_{v,id_k}/τ`` part only (the ``−p/τ`` part comes through ``lse``). Saves the ids,
    not the logits."""

    @staticmethod
    def forward(ctx, logits, idx, row_max, row_logsum, inv_t):
        ctx.save_for_backward(idx)
        ctx.args = (logits.shape, logits.dtype, inv_t)
        x = logits.gather(-1, idx).to(row_max.dtype)
        return (x - row_max.unsqueeze(-1)) * inv_t - row_logsum.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        shape, dtype, inv_t = ctx.args
        out = torch.zeros(shape, dtype=torch.float32 if dtype != torch.float64 else dtype, device=grad.device)
        out.scatter_add_(-1, idx, (grad * inv_t).to(out.dtype))
        return out.to(dtype), None, None, None, None


def _multi_index(logits, ids, temperature, ignore_index, return_entropy, backend, inplace):
    """``ids: [..., K]`` → ``(logp [..., K], entropy [...] or None, lse [...])``: one pass over each row for its
    statistics (the op, with the row's first kept id), then the K gathers."""
    keep_k = ids != ignore_index
    V = logits.shape[-1]
    valid_k = keep_k & (ids >= 0) & (ids < V)
    if ids.shape[-1]:
        first = ids.gather(-1, keep_k.to(torch.uint8).argmax(-1, keepdim=True)).squeeze(-1)
        row_ids = torch.where(keep_k.any(-1), first, torch.full_like(first, ignore_index))
    else:
        row_ids = torch.full(ids.shape[:-1], ignore_index, dtype=ids.dtype, device=ids.device)
    _, ent, lse, row_max, row_logsum = torch.ops.srpo_core.token_logprobs(
        logits, row_ids, temperature, ignore_index, return_entropy, backend, inplace)
    safe = torch.where(valid_k, ids, torch.zeros_like(ids)).long()
    lp = _GatherShifted.apply(logits, safe, row_max, row_logsum, 1.0 / temperature)
    lp = lp - (lse - lse.detach()).unsqueeze(-1)  # value unchanged; the −p/τ part of the gradient, via lse
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp = torch.where(keep_k, torch.where(valid_k, lp, torch.full_like(zero, math.nan)), zero)
    return lp, (ent if return_entropy else None), lse


OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    process_group=None,
    vocab_start: int = 0,
    backend: str = "auto",
    check_ids: bool = True,
    inplace_backward: bool = False,
    shift: bool = False,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Log-prob of the sampled token, ``logp = z_id − logsumexp(z)`` with ``z = logits / τ``, and optionally the
    entropy ``H = logsumexp(z) − Σ_v p_v z_v`` of ``p = softmax(z)`` and ``lse = logsumexp(z)``.

    Args:
        logits: ``[..., V]`` float (fp32/bf16/fp16; float64 on the torch path, computed in float64); any strides
            (leading dims that collapse to two row strides, such as ``logits[:, :-1]``, are read in place). With
            ``process_group``: this rank's vocabulary shard ``[..., V_local]``.
        ids: ``[...]`` integer (int32/int64), the sampled tokens; each in ``[0, V)`` (the global vocabulary when
            sharded) or equal to ``ignore_index``. Or ``[..., K]`` (signalled by ``ids.dim() == logits.dim()``):
            ``K`` ids per row, as TRL's ``selective_log_softmax`` takes; ``logp`` is then ``[..., K]`` (the row is
            read once for its statistics; the gathered ids' gradient is a second ``[..., V]`` tensor).
        temperature: ``τ > 0``.
        return_entropy: also return ``H`` (``[...]``, one per row).
        ignore_index: positions whose id equals it give 0 in every output and a zero gradient.
        process_group: vocab-parallel logits: a ``torch.distributed`` group over which the vocabulary is sharded.
        vocab_start: the global id of this rank's first column (only with ``process_group``).
        backend: ``"auto" | "triton" | "torch"``.
        check_ids: scan ``ids`` for out-of-range values first (one device-to-host sync per call). ``False`` skips the
            scan: no sync, so a step can be captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``);
            an out-of-range id then gives NaN in its row (and no gradient term for it) instead of an error.
        inplace_backward: **opt-in, destroys the logits.** Backward writes the ``[..., V]`` gradient over
            ``logits``' own buffer instead of allocating one (as Liger-Kernel does: 19.9 GB saved for bf16 logits at
            N = 64k, V = 151,936). You promise not to read ``logits`` after backward (they hold the gradient then)
            and that no other op saved them for its own backward (if one did and its backward runs after ours,
            autograd raises its "modified by an inplace operation" error; if it runs before, nothing is wrong).
            Refused for a leaf that requires grad (its ``.grad`` would be its own data), for logits whose rows cannot
            be written in place (a vocab stride ≠ 1, leading dims that need a copy, broadcast rows) and with
            ``process_group``. Ignored while ``torch.compile`` traces (the compiler plans the buffers). The gradient
            passed on is the (possibly non-contiguous) ``logits`` tensor itself.
        shift: score position ``t`` with the id at ``t + 1`` (cut-cross-entropy's convention: pass the model's
            ``[B, T, V]`` logits and the ``[B, T]`` input ids, no ``[:, :-1]`` copy); the last position gives 0 like
            an ignored one (in every output). The position dim is the last dim of ``ids`` (``[..., T]``), or the one
            before it for ``[..., T, K]`` ids. Needs ``logits.dim() >= 2``.
        return_lse: also return ``lse = logsumexp(logits/τ)`` (``[...]``, 0 on ignored rows), differentiable
            (``∂lse/∂x_v = p_v/τ``): a z-loss ``(lse**2).mean()`` adds no pass over the logits in forward.
            Not with ``process_group``.
        out_dtype: dtype of every output. Default ``None``: **float32** (float64 for float64 logits), whatever the
            logits' dtype; the math runs in float32 (float64) either way, and another dtype (TRL, Liger and torch
            return the input dtype: pass ``out_dtype=logits.dtype``) is a cast of the ``[...]`` results.

    Returns:
        ``logp: [...]`` (``[..., K]`` for ``[..., K]`` ids), then ``entropy`` if ``return_entropy``, then ``lse`` if
        ``return_lse``: a tensor when only ``logp`` is asked, a tuple otherwise; float32 unless ``out_dtype`` says
        otherwise (float64 for float64 logits). Differentiable in ``logits`` (every output); the gradient has the
        logits' shape and dtype. Every output owns its storage (in-place edits under autograd are fine).

    A ``−inf`` logit is a token of probability 0 (it adds nothing to ``Σ p z``); a row of all ``−inf`` (or with a
    ``+inf``/NaN logit) gives NaN. ``ids`` are range-checked eagerly (one device sync) unless ``check_ids=False``;
    while ``torch.compile`` traces, the check is skipped and an out-of-range id gives NaN in its row instead of an
    error. Meta tensors: shapes are inferred, value checks skipped (the ops' fake kernels run), backward included.
    Not offered: ``logit_scale`` / soft-capping (D80: apply it to the logits first).
    """
    _validate(logits, ids, temperature, return_entropy, ignore_index, process_group, vocab_start)
    for name, flag in (("check_ids", check_ids), ("inplace_backward", inplace_backward), ("shift", shift),
                       ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: `{name}` must be a bool, got {describe(flag)}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise TypeError(f"{OP}: `out_dtype` must be None or one of {OUT_DTYPES}, got {describe(out_dtype)}")
    multi = ids.dim() == logits.dim()
    if shift and logits.dim() < 2:
        raise ValueError(f"{OP}: `shift=True` needs positions: `logits` [..., T, V] with at least 2 dims, got "
                         f"{describe(logits)}")
    if process_group is not None and (multi or return_lse):
        raise ValueError(f"{OP}: with `process_group` (vocab-parallel logits) `ids` must be [...] (one id per row) and "
                         f"`return_lse` False; got ids {describe(ids)}, return_lse={return_lse}")
    chosen = _dispatch.pick_backend(backend, logits.device, op=OP, dtypes={"logits": logits.dtype})
    temperature, ignore_index = float(temperature), int(ignore_index)
    on_meta = logits.device.type == "meta"  # shapes are inferred, value checks skipped (the fake kernels run)
    scan_ids = check_ids and not on_meta and not torch.compiler.is_compiling()
    if inplace_backward:
        # under torch.compile the compiler plans the backward's buffers itself: the out-of-place op is traced
        if torch.compiler.is_compiling():
            inplace_backward = False
        else:
            _check_inplace(logits, process_group)
            inplace_backward = logits.requires_grad
    if shift:  # before the scan: the first position's id is never scored
        ids = _chunked.shift_ids(ids, ignore_index, dim=-2 if multi else -1)
    if process_group is None and scan_ids:
        _check_ids(ids, logits.shape[-1], ignore_index)
    if process_group is None:
        if multi:
            logp, ent, lse = _multi_index(logits, ids, temperature, ignore_index, return_entropy, chosen,
                                          inplace_backward)
        else:
            logp, ent, lse, _, _ = torch.ops.srpo_core.token_logprobs(logits, ids, temperature, ignore_index,
                                                                      return_entropy, chosen, inplace_backward)
    else:
        logp, ent = _vocab_parallel(logits, ids, temperature, return_entropy, ignore_index, process_group,
                                    vocab_start, chosen, scan_ids, on_meta)
        lse = None
    outs = [logp] + ([ent] if return_entropy else []) + ([lse] if return_lse else [])
    if out_dtype is not None:
        outs = [t.to(out_dtype) for t in outs]
    return outs[0] if len(outs) == 1 else tuple(outs)


def _vocab_parallel(logits, ids, temperature, return_entropy, ignore_index, process_group, vocab_start, chosen,
                    scan_ids, on_meta):
    if on_meta:
        raise ValueError(f"{OP}: vocab-parallel logits (`process_group` given) cannot be meta tensors: the shards are "
                         f"checked with a collective, which needs real tensors; got {describe(logits)}")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError(f"{OP}: `process_group` was given but torch.distributed is not initialized")
    v_local = logits.shape[-1]
    v_global = _check_shards(logits, vocab_start, process_group)
    if scan_ids:
        _check_ids(ids, v_global, ignore_index, what="V_global")
    keep = (ids != ignore_index).reshape(-1)
    local = ids.reshape(-1).long() - vocab_start
    owned = keep & (local >= 0) & (local < v_local)
    local_ids = torch.where(owned, local, torch.full_like(local, v_local))
    local_ids = torch.where(keep, local_ids, torch.full_like(local, -1)).view(ids.shape)
    return _VocabParallel.apply(logits, local_ids, owned.view(ids.shape), keep.view(ids.shape), temperature,
                                return_entropy, chosen, process_group)


__all__ = ["token_logprobs"]
