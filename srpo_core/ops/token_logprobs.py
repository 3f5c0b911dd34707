"""Public ``token_logprobs``: the log-prob of the sampled token (and the entropy of the next-token distribution) from
the logit rows, without materialising a softmax, differentiable in the logits.

Backends:

- ``"triton"``: the fused kernels in ``srpo_core.kernels.token_logprobs`` (forward reads each row once; backward reads
  it once more and writes ``grad_logits`` once).
- ``"torch"``: row chunks (``srpo_core.cpu.token_logprobs``). On the CPU, where a C++ compiler works, the chunk
  functions are ``torch.compile``d (inductor fuses each into one or two passes with no ``[rows, V]`` temporaries);
  otherwise (or with ``SRPO_NO_COMPILE=1``, or for inputs under ``TUNING.token_logprobs_compile_min_elements``)
  eager chunks reuse two ``[rows, V]`` fp32 workspaces of at most ``TUNING.token_logprobs_chunk_elements`` elements
  each. Either way the peak extra memory is a chunk, not ``[N, V]``.
- ``"auto"``: Triton for CUDA tensors, torch otherwise.
- ``"reference"``: see below.

Every backend saves per-row statistics for backward: a shift ``row_max = c`` and ``row_logsum =
log Σ_v e^{(x_v − c)/τ}`` (the log-sum-exp split in two, so that ``log p_v = (x_v − c)/τ − row_logsum`` is exact to a
few ulps even for logits of ±1e4), plus the entropy when it is an output. ``c`` is the row max, except on the CPU
forward without entropy, which shifts by the sampled logit to read the logits once; it falls back to the max for
rows where that shift would overflow or lose precision (the sampled token far below the row's top), so the
recomputed ``log p`` keeps the same accuracy. ``c/τ + row_logsum`` is the log-sum-exp on every path. Backward
recomputes ``p`` from the logits and these, once.

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
The collectives live in ``srpo_core.common.vocab_parallel``.

``backend="reference"`` runs ``srpo_core.reference.token_logprobs`` on the float32 (float64) logits with plain
autograd: the math, for checking the fast paths (not with ``process_group``).
"""

from __future__ import annotations

import math

import torch

from srpo_core import _dispatch
from srpo_core._validate import (
    check_flags,
    check_id_range,
    check_number,
    check_out_dtype,
    check_shift,
    describe,
    require_same_device,
    require_tensor,
)
from srpo_core.common import chunked, vocab_parallel
from srpo_core.cpu.token_logprobs import _acc_dtype, _torch_bwd, _torch_fwd
from srpo_core.reference.token_logprobs import token_logprobs as _reference_logprobs

OP = "token_logprobs"


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


def _check(logits, ids, temperature, ignore_index, process_group, vocab_start, out_dtype, flags) -> None:
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
    check_number(OP, "temperature", temperature, "positive")
    check_flags(OP, **flags)
    check_number(OP, "ignore_index", ignore_index, "int")
    check_number(OP, "vocab_start", vocab_start, "int", minimum=0)
    if process_group is None and vocab_start != 0:
        raise ValueError(f"{OP}: `vocab_start` = {vocab_start} needs a `process_group` (vocab-parallel logits); "
                         f"without one `logits` holds the whole vocabulary and `vocab_start` must be 0")
    check_out_dtype(OP, out_dtype)
    check_shift(OP, flags["shift"], logits)
    multi = ids.dim() == logits.dim()
    if process_group is not None and (multi or flags["return_lse"]):
        raise ValueError(f"{OP}: with `process_group` (vocab-parallel logits) `ids` must be [...] (one id per row) and "
                         f"`return_lse` False; got ids {describe(ids)}, return_lse={flags['return_lse']}")


def _check_inplace(logits: torch.Tensor, process_group) -> None:
    if process_group is not None:
        raise ValueError(f"{OP}: `inplace_backward=True` is not supported with `process_group` (vocab-parallel "
                         f"logits); use the default out-of-place backward")
    if logits.is_leaf and logits.requires_grad:
        raise ValueError(f"{OP}: `inplace_backward=True` would write the gradient over `logits`, but `logits` "
                         f"{describe(logits)} is a leaf that requires grad (its .grad would be its own data); pass "
                         f"the output of the layer that produced the logits, or leave inplace_backward=False")
    if not chunked.rows_in_place(logits):
        raise ValueError(f"{OP}: `inplace_backward=True` needs logits whose rows can be written in place (unit "
                         f"stride over V, leading dims that collapse to two strides without a copy, no broadcast "
                         f"rows), got {describe(logits)} with strides {tuple(logits.stride())}")


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
    row_ids = _row_ids(ids, ignore_index)
    _, ent, lse, row_max, row_logsum = torch.ops.srpo_core.token_logprobs(
        logits, row_ids, temperature, ignore_index, return_entropy, backend, inplace)
    safe = torch.where(valid_k, ids, torch.zeros_like(ids)).long()
    lp = _GatherShifted.apply(logits, safe, row_max, row_logsum, 1.0 / temperature)
    lp = lp - (lse - lse.detach()).unsqueeze(-1)  # value unchanged; the −p/τ part of the gradient, via lse
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp = torch.where(keep_k, torch.where(valid_k, lp, torch.full_like(zero, math.nan)), zero)
    return lp, (ent if return_entropy else None), lse


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
        backend: ``"auto" | "triton" | "torch" | "reference"``.
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
    flags = {"return_entropy": return_entropy, "check_ids": check_ids, "inplace_backward": inplace_backward,
             "shift": shift, "return_lse": return_lse}
    _check(logits, ids, temperature, ignore_index, process_group, vocab_start, out_dtype, flags)
    chosen = _dispatch.pick_backend(backend, logits.device, op=OP, dtypes={"logits": logits.dtype})
    if chosen == "reference" and process_group is not None:
        raise ValueError(f"{OP}: backend='reference' computes one device's whole vocabulary; with `process_group` "
                         f"use backend='auto', 'torch' or 'triton'")
    temperature, ignore_index = float(temperature), int(ignore_index)
    multi = ids.dim() == logits.dim()
    on_meta = logits.device.type == "meta"  # shapes are inferred, value checks skipped (the fake kernels run)
    scan_ids = check_ids and not on_meta and not torch.compiler.is_compiling()
    if inplace_backward:
        # under torch.compile the compiler plans the backward's buffers itself: the out-of-place op is traced
        if torch.compiler.is_compiling():
            inplace_backward = False
        else:
            _check_inplace(logits, process_group)
            inplace_backward = logits.requires_grad and chosen != "reference"
    if shift:  # before the scan: the first position's id is never scored
        ids = chunked.shift_ids(ids, ignore_index, dim=-2 if multi else -1)
    if process_group is not None:
        logp, ent = _vocab_parallel(logits, ids, temperature, return_entropy, ignore_index, process_group,
                                    vocab_start, chosen, scan_ids, on_meta)
        lse = None
    else:
        if scan_ids:
            check_id_range(OP, ids, logits.shape[-1], ignore_index)
        if chosen == "reference":
            logp, ent, lse = _reference(logits, ids, temperature, ignore_index, return_entropy)
        elif multi:
            logp, ent, lse = _multi_index(logits, ids, temperature, ignore_index, return_entropy, chosen,
                                          inplace_backward)
        else:
            logp, ent, lse, _, _ = torch.ops.srpo_core.token_logprobs(logits, ids, temperature, ignore_index,
                                                                      return_entropy, chosen, inplace_backward)
    outs = [logp] + ([ent] if return_entropy else []) + ([lse] if return_lse else [])
    if out_dtype is not None:
        outs = [t.to(out_dtype) for t in outs]
    return outs[0] if len(outs) == 1 else tuple(outs)


def _row_ids(ids: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``ids: [..., K]`` → ``[...]``: each row's first kept id (``ignore_index`` for a row with none)."""
    keep_k = ids != ignore_index
    if not ids.shape[-1]:
        return torch.full(ids.shape[:-1], ignore_index, dtype=ids.dtype, device=ids.device)
    first = ids.gather(-1, keep_k.to(torch.uint8).argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(keep_k.any(-1), first, torch.full_like(first, ignore_index))


def _reference(logits, ids, temperature, ignore_index, return_entropy):
    """``backend="reference"``: ``srpo_core.reference.token_logprobs`` on the logits in float32 (float64 stays),
    plain autograd → ``(logp, entropy or None, lse)``; ``[..., K]`` ids score each id against its row."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    row_ids = _row_ids(ids, ignore_index) if ids.dim() == logits.dim() else ids
    if ids.dim() == logits.dim():
        xs = x.unsqueeze(-2).expand(*ids.shape, x.shape[-1])
        logp = _reference_logprobs(xs, ids, temperature=temperature, ignore_index=ignore_index)
    else:
        logp = _reference_logprobs(x, ids, temperature=temperature, ignore_index=ignore_index)
    ent = None
    if return_entropy:
        _, ent = _reference_logprobs(x, row_ids, temperature=temperature, return_entropy=True,
                                     ignore_index=ignore_index)
    lse = torch.where(row_ids != ignore_index, torch.logsumexp(x / temperature, -1), torch.zeros((), dtype=x.dtype))
    return logp, ent, lse


# ------------------------------------------------------------------------------------------------- vocab-parallel
class _VocabParallel(torch.autograd.Function):
    """Sharded logits ``[..., V_local]`` → full-vocabulary ``(logp, entropy or None)``; see the module docstring."""

    @staticmethod
    def forward(ctx, logits, local_ids, owned, keep, temperature, return_entropy, backend, group):
        # local_ids: the id's column in this shard where owned, V_local (outside the shard) where not, -1 if ignored
        _, ent_r, _, c_r, log_s_r = torch.ops.srpo_core.token_logprobs(
            logits, local_ids, temperature, -1, return_entropy, backend)
        x_id = logits.gather(-1, torch.where(owned, local_ids, 0).unsqueeze(-1)).squeeze(-1).to(c_r.dtype)
        logp, ent, c, log_s = vocab_parallel.combine_shifted(c_r, log_s_r, ent_r if return_entropy else None, x_id,
                                                             owned, keep, temperature, group)
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


def _vocab_parallel(logits, ids, temperature, return_entropy, ignore_index, process_group, vocab_start, chosen,
                    scan_ids, on_meta):
    if on_meta:
        raise ValueError(f"{OP}: vocab-parallel logits (`process_group` given) cannot be meta tensors: the shards are "
                         f"checked with a collective, which needs real tensors; got {describe(logits)}")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError(f"{OP}: `process_group` was given but torch.distributed is not initialized")
    v_local = logits.shape[-1]
    v_global = vocab_parallel.tiling_vocab(OP, logits, vocab_start, process_group)
    if scan_ids:
        check_id_range(OP, ids, v_global, ignore_index, span="[0, V_global)")
    keep = (ids != ignore_index).reshape(-1)
    local = ids.reshape(-1).long() - vocab_start
    owned = keep & (local >= 0) & (local < v_local)
    local_ids = torch.where(owned, local, torch.full_like(local, v_local))
    local_ids = torch.where(keep, local_ids, torch.full_like(local, -1)).view(ids.shape)
    return _VocabParallel.apply(logits, local_ids, owned.view(ids.shape), keep.view(ids.shape), temperature,
                                return_entropy, chosen, process_group)


__all__ = ["token_logprobs"]
