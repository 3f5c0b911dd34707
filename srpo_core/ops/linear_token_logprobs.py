"""Public ``linear_token_logprobs``: per-token log-probs (and entropy) of ``hidden @ weightᵀ + bias`` without ever
materialising the ``[N, V]`` logits.

Math (SPEC "Log-prob ops"), with ``x = hidden @ weightᵀ + bias`` and ``u = f(x) / τ`` (``f(x) = logit_scale·x``, or
``softcap·tanh(logit_scale·x / softcap)`` with a softcap; the defaults give ``u = x/τ``):

    logp[n] = u[n, id_n] − lse_n,        lse_n = log Σ_v exp u[n, v]
    H[n]    = lse_n − Σ_v p[n, v] u[n, v],  p = softmax(u)

The public function accepts ``hidden [..., H]`` / ``ids [...]`` (flattened as views), ``shift`` (next-token ids),
mixed precision and autocast (cast up front, D67 / D69), and returns ``out_dtype`` outputs (fp32 by default). Ignored
rows are dropped before any work on every backend unless ``check_ids=False`` (D65 / D66; ``srpo_core.common.rows``).
Input checks live in ``srpo_core/_validate.py``, the torch path in ``srpo_core/cpu/linear_token_logprobs.py``, the
vocab-parallel collectives in ``srpo_core/common/vocab_parallel.py``.

Backends (``backend="auto" | "triton" | "torch" | "reference"``; auto = Triton for CUDA tensors, torch otherwise;
reference = ``srpo_core.reference.linear_token_logprobs`` with plain autograd, not with a process group):

- **torch** (the default off-GPU): a custom ``autograd.Function`` that tiles the *vocabulary*. The forward walks
  vocabulary tiles ``W[v0:v1]`` (each read once per pass) and, inside each, chunks of tokens; each ``[n, v]`` logits
  tile is folded into a running ``(c, s)`` per token (``s = Σ 2^(u₂ − c)``, base-2 units ``u₂ = u·log₂e`` because
  ``exp2`` is ~3× cheaper than ``exp`` on CPU) and the sampled-token logit is picked on the way. After the first tile,
  ``c`` is the running logsumexp, so the GEMM itself subtracts it (``addmm(−c, h, Wᵀ, alpha=log₂e/τ)``) and the tile
  needs one ``exp2`` and one row sum — no max pass. A row whose tile sum overflows (a logit more than ~127 bits above
  the running logsumexp) is redone with an explicit max. The backward saves
  only ``lse`` (and ``H``) per token, recomputes each tile, turns it into ``G = ∂L/∂logits`` in place and runs
  ``grad_hidden += G @ W_tile`` and ``grad_weight[v0:v1] = Gᵀ @ hidden``.
  Peak extra memory is one tile (plus, for bf16/fp16, a low-precision copy of it): see :func:`tile_sizes`.
- **triton** (``srpo_core.kernels.linear_token_logprobs``): a fused forward (``tl.dot`` tiles + online logsumexp, split
  over the vocabulary and combined deterministically) and a fused backward tile kernel that writes ``G`` for one
  vocabulary chunk, followed by two cuBLAS GEMMs per chunk (deterministic; no float atomics).

Without a process group the op is registered as ``torch.ops.srpo_core.linear_token_logprobs`` (and ``…_backward``),
``torch.library`` custom ops with fake kernels and an autograd formula, so ``torch.compile(fullgraph=True)`` traces a
training step through it; the vocab-parallel path is an ``autograd.Function`` (a process group is not an op argument).

Vocab-parallel: with ``process_group``, ``weight`` (and ``bias``) is this rank's shard ``[V_local, H]`` of a global
vocabulary, starting at ``vocab_start``. Each rank folds its shard into ``(lse_r, target_r, H_r)``; the max and the
rescaled sums are all-reduced, the sampled-token logit comes from its owner, so every rank returns the result of
the whole vocabulary. In backward, ``grad_weight``/``grad_bias`` are this rank's shard of the full gradient and
``grad_hidden`` is all-reduced (summed) over the group, so it equals the unsharded gradient — this assumes, as
Megatron's vocab-parallel cross-entropy does, that the upstream gradient is the same on every rank.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from srpo_core import _dispatch
from srpo_core._validate import (
    AUTOCAST_DEVICES,
    autocast_inputs,
    check_flags,
    check_id_range,
    check_lm_head,
    check_number,
    check_out_dtype,
    linear_compute_dtype,
    refuse_nan_rows,
)
from srpo_core.common import chunked, vocab_parallel
from srpo_core.common.rows import shard_rows
from srpo_core.cpu.linear_token_logprobs import _acc_dtype, _torch_bwd, _torch_fwd, tile_sizes
from srpo_core.reference.linear_token_logprobs import linear_token_logprobs as _reference

OP = "linear_token_logprobs"

# ---------------------------------------------------------------------------------------------------------------------
# Backend dispatch of the local (per-shard) passes


class _Spec(NamedTuple):
    """The scalar options of one call. Logits ``u = f(x)/τ``, ``x = hidden @ weightᵀ + bias``, with
    ``f(x) = logit_scale·x`` or, when ``softcap > 0``, ``softcap·tanh(logit_scale·x/softcap)``."""

    inv_tau: float
    logit_scale: float
    softcap: float  # 0: none
    want_entropy: bool
    ignore_index: int
    backend: str
    compact: bool

    def transform(self) -> dict:
        """The launchers' logits keywords: without a softcap the scale folds into the inverse temperature."""
        if self.softcap:
            return {"inv_tau": self.inv_tau, "logit_scale": self.logit_scale, "softcap": self.softcap}
        return {"inv_tau": self.inv_tau * self.logit_scale}


def _local_fwd(spec, hidden, weight, bias, ids_local):
    if spec.backend == "triton":
        from srpo_core.kernels.linear_token_logprobs import linear_logprobs_fwd

        return linear_logprobs_fwd(hidden, weight, bias, ids_local, want_entropy=spec.want_entropy,
                                   **spec.transform())
    t = spec.transform()
    return _torch_fwd(hidden, weight, bias, ids_local, t.pop("inv_tau"), spec.want_entropy, **t)


def _local_bwd(spec, hidden, weight, bias, ids_local, lse, ent, g_lp, g_h, g_lse, needs):
    if spec.backend == "triton":
        from srpo_core.kernels.linear_token_logprobs import linear_logprobs_bwd

        return linear_logprobs_bwd(hidden, weight, bias, ids_local, lse, ent, g_lp, g_h, needs=needs, g_lse=g_lse,
                                   **spec.transform())
    t = spec.transform()
    return _torch_bwd(hidden, weight, bias, ids_local, t.pop("inv_tau"), lse, ent, g_lp, g_h, needs, g_lse=g_lse,
                      **t)


def _rows(hidden, ids, ignore_index, vocab_start, compact):
    """The rows the passes compute (:class:`srpo_core.common.rows.Rows`), their ``hidden`` and shard-local ids. With
    ``compact`` (the default on every backend) ignored rows are dropped before any work when there are any (a host
    sync: ``nonzero``); without it (Triton with ``check_ids=False``: no host sync) every row is computed, the ignored
    ones with zero upstream coefficients and a saved ``lse = 0``, which the backward kernel is safe for (it clamps
    ``log p`` at 0). → ``(keep, index or None, hidden rows, local ids)``."""
    rows, h_k, ids_local = shard_rows(hidden, ids, ignore_index, vocab_start, compact)
    return rows.keep, rows.index, h_k, ids_local


def _autocast_off(hidden_arg: int):
    """Run the decorated pass with autocast disabled on the device of its ``hidden`` argument: the public function
    has already cast the inputs (D67), and the tiles' own GEMMs and ``out=`` ops must keep the dtypes chosen here."""

    def deco(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            dev = args[hidden_arg].device.type
            if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
                with torch.autocast(device_type=dev, enabled=False):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return run

    return deco


@_autocast_off(0)
def _fwd(hidden, weight, bias, ids, spec, group=None, vocab_start=0):
    """``hidden [N, H]``, ``ids [N]`` → ``(logp [N], ent [N] or None, lse [N])``, 0 at ignored rows; backward needs
    ``lse`` and ``ent`` (the whole vocabulary's), and is safe with their 0 at ignored rows (D65)."""
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    rows, h_k, ids_local = shard_rows(hidden, ids, spec.ignore_index, vocab_start,
                                      spec.compact or spec.backend == "torch")
    owned = (ids_local >= 0) & (ids_local < weight.shape[0])
    if h_k.shape[0] == 0:
        lse_k = tgt_k = torch.zeros(0, dtype=acc, device=dev)
        ent_k = torch.zeros(0, dtype=acc, device=dev) if spec.want_entropy else None
    else:
        lse_k, tgt_k, ent_k = _local_fwd(spec, h_k, weight, bias, ids_local)
    if group is not None:
        lse_k, tgt_k, ent_k = vocab_parallel.combine_shards(lse_k, tgt_k, ent_k, owned, group)
    ent = rows.unpack(ent_k, acc) if spec.want_entropy else None
    return rows.unpack(tgt_k - lse_k, acc), ent, rows.unpack(lse_k, acc)


@_autocast_off(3)
def _bwd(g_logp, g_ent, g_lse, hidden, weight, bias, ids, lse, ent, spec, needs, group=None, vocab_start=0):
    """Gradients ``(grad_hidden, grad_weight, grad_bias)`` (None where ``needs`` says no) for upstream gradients of
    ``logp``, ``entropy`` and ``lse`` (each ``[N]`` or None): the logits tiles are recomputed from ``hidden``,
    ``weight`` and the saved per-row ``lse`` (and ``ent``)."""
    need_h, need_w, need_b = needs
    rows, h_k, ids_local = shard_rows(hidden, ids, spec.ignore_index, vocab_start,
                                      spec.compact or spec.backend == "torch")
    acc = lse.dtype
    g_lp, g_z = rows.pack_grad(g_logp, acc), rows.pack_grad(g_lse, acc)
    g_h = rows.pack_grad(g_ent if spec.want_entropy else None, acc)
    lse_k, ent_k = rows.pack(lse), rows.pack(ent)
    if (g_lp is None and g_h is None and g_z is None) or not (need_h or need_w or need_b) or h_k.shape[0] == 0:
        gh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        if group is not None and need_h:
            vocab_parallel.all_sum_(gh, group)  # the other ranks may have work: keep the collective in step
        return gh, gw, gb
    gh, gw, gb = _local_bwd(spec, h_k, weight, bias, ids_local, lse_k, ent_k if spec.want_entropy else None,
                            g_lp, g_h, g_z, needs)
    if need_h:
        if rows.index is not None:
            gh = rows.unpack(gh, acc)
        if group is not None:
            vocab_parallel.all_sum_(gh, group)
        gh = gh.to(hidden.dtype)
    if need_b:
        gb = gb.to(bias.dtype)
    return gh, gw, gb


class _ShardedLinearTokenLogprobs(torch.autograd.Function):
    """The vocab-parallel path (a process group cannot be a custom-op argument)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, spec, group, vocab_start):
        ctx.set_materialize_grads(False)
        logp, ent, lse = _fwd(hidden, weight, bias, ids, spec, group, vocab_start)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, ent if spec.want_entropy else lse)
        ctx.cfg = (spec, group, vocab_start)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_lse):
        hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
        spec, group, vocab_start = ctx.cfg
        gh, gw, gb = _bwd(g_logp, g_ent, g_lse, hidden, weight, bias, ids, lse, ent, spec, ctx.needs_input_grad[:3],
                          group, vocab_start)
        return gh, gw, gb, None, None, None, None


# The unsharded path as torch.library custom ops (forward, backward, autograd formula, fake kernels), so that
# torch.compile(fullgraph=True) traces a training step through it. The fake kernels also serve meta tensors (D70).
@torch.library.custom_op("srpo_core::linear_token_logprobs", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, inv_tau: float,
        want_entropy: bool, ignore_index: int, backend: str, compact: bool = True, logit_scale: float = 1.0,
        softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [N, H]``, ``ids [N]`` → ``(logp, entropy or [0], lse)``, each ``[N]``; backward saves ``lse`` (and
    the entropy output when there is one)."""
    spec = _Spec(inv_tau, logit_scale, softcap, want_entropy, ignore_index, backend, compact)
    logp, ent, lse = _fwd(hidden, weight, bias, ids, spec)
    return logp, (ent if want_entropy else logp.new_empty(0)), lse


@_op.register_fake
def _(hidden, weight, bias, ids, inv_tau, want_entropy, ignore_index, backend, compact=True, logit_scale=1.0,
      softcap=0.0):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n if want_entropy else 0, dtype=acc), \
        hidden.new_empty(n, dtype=acc)


@torch.library.custom_op("srpo_core::linear_token_logprobs_backward", mutates_args=())
def _op_bwd(g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, g_lse: torch.Tensor | None,
            hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
            lse: torch.Tensor, ent: torch.Tensor, inv_tau: float, want_entropy: bool, ignore_index: int, backend: str,
            compact: bool, logit_scale: float, softcap: float, need_h: bool, need_w: bool, need_b: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _Spec(inv_tau, logit_scale, softcap, want_entropy, ignore_index, backend, compact)
    gh, gw, gb = _bwd(g_logp, g_ent, g_lse, hidden, weight, bias, ids, lse, ent, spec, (need_h, need_w, need_b))
    # a custom op's outputs may not alias each other: a fresh empty tensor for each gradient not asked for
    return tuple(x if x is not None else hidden.new_empty(0) for x in (gh, gw, gb))


@_op_bwd.register_fake
def _(g_logp, g_ent, g_lse, hidden, weight, bias, ids, lse, ent, inv_tau, want_entropy, ignore_index, backend,
      compact, logit_scale, softcap, need_h, need_w, need_b):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b and bias is not None else hidden.new_empty(0))


def _setup(ctx, inputs, output):
    hidden, weight, bias, ids, inv_tau, want_entropy, ignore_index, backend, compact, logit_scale, softcap = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, ids, lse, ent if want_entropy else lse)
    ctx.cfg = (inv_tau, want_entropy, ignore_index, backend, compact, logit_scale, softcap)


def _backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
    inv_tau, want_entropy, ignore_index, backend, compact, logit_scale, softcap = ctx.cfg
    need_h, need_w = ctx.needs_input_grad[:2]
    need_b = bias is not None and ctx.needs_input_grad[2]
    gh, gw, gb = _op_bwd(g_logp, g_ent if want_entropy else None, g_lse, hidden, weight, bias, ids, lse, ent,
                         inv_tau, want_entropy, ignore_index, backend, compact, logit_scale, softcap, need_h, need_w,
                         need_b)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * 8


_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------------------------
# The public function


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    process_group=None,
    vocab_start: int = 0,
    backend: str = "auto",
    check_ids: bool = True,
    shift: bool = False,
    out_dtype: torch.dtype | None = None,
    return_lse: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """Log-prob of each sampled token under ``softmax(f(hidden @ weightᵀ + bias) / τ)``, never materialising the
    ``[N, V]`` logits; ``f(x) = logit_scale·x``, or ``softcap·tanh(logit_scale·x / softcap)`` with a softcap.

    Args:
        hidden: ``[..., H]`` float (fp32/bf16/fp16; float64 on the torch path), any leading dimensions (``[N, H]``,
            ``[B, T, H]``); contiguous leading dimensions are flattened as a view (no copy).
        weight: ``[V, H]`` (the LM head), same device; with ``process_group`` this rank's vocabulary shard
            ``[V_local, H]`` covering global ids ``[vocab_start, vocab_start + V_local)``. Same dtype as ``hidden``,
            or mixed precision (bf16/fp16 with fp32, D69): then the op runs in fp32 on the exactly upcast inputs.
        ids: ``[...]`` (the leading dimensions of ``hidden``) integer sampled tokens (global ids), each in
            ``[0, V)`` (``V`` = the global vocabulary when sharded) or equal to ``ignore_index``.
        bias: optional ``[V]`` (the shard's part when sharded).
        temperature: ``τ > 0``.
        return_entropy: also return the entropy of ``softmax(u)`` per token.
        ignore_index: tokens with this id give 0 (and no gradient); their rows are skipped before any work.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (None: not sharded).
        vocab_start: first global vocabulary id of this rank's shard; must equal the sum of the shard sizes of the
            lower ranks.
        backend: ``"auto" | "triton" | "torch" | "reference"``.
        check_ids: scan ``ids`` for values outside ``[0, V)`` and raise (the default), and drop ignored rows before
            any work. Both read values on the host (a device sync per call). ``False`` skips the scan (an
            out-of-range id then gives an unspecified value, no error) and, on the Triton backend, computes every
            row (ignored ones contribute exactly 0), so the call has no host sync and can be captured in a CUDA
            graph (``torch.compile(mode="reduce-overhead")``). The torch backend always drops ignored rows. Under
            ``torch.compile`` the scan is skipped whatever this says. With the check on, a NaN result (logits not
            finite in the compute dtype: an fp32 overflow, or NaN/inf inputs) raises ``ValueError`` instead of
            being returned.
        shift: score position ``t`` with ``ids[..., t + 1]`` (next-token prediction from ``hidden [..., T, H]`` and
            the sequence's own ``ids [..., T]``, as cut-cross-entropy's ``shift``); the last position of each
            sequence gives 0, like an ignored token. Only the ids are shifted: ``hidden`` is read in place, so the
            caller needs no ``[:, :-1]`` slice (a copy).
        out_dtype: dtype of the returned log-probs / entropy / lse. Default (None): float32 (float64 for float64
            inputs), whatever the input dtype (D10); e.g. ``torch.bfloat16`` returns what TRL or a plain torch
            model would.
        return_lse: also return the per-token ``lse = log Σ_v exp u_v`` (for a z-loss ``(lse)²``), differentiable;
            0 at ignored positions.
        logit_scale: ``> 0``, multiplies the logits before the softcap and the temperature.
        softcap: ``> 0`` or None: Gemma-style soft-capping of the (scaled) logits to ``(−softcap, softcap)``.

    Under ``torch.autocast`` the op follows ``F.linear`` (D67): floating inputs other than float64 are cast to the
    autocast dtype and the logits computed in it.

    Returns:
        ``logp`` shaped like ``ids``; with ``return_entropy`` / ``return_lse`` the tuple ``(logp, entropy, lse)``
        with the ones asked for, in that order. Float32 unless ``out_dtype`` says otherwise, differentiable in
        ``hidden``, ``weight`` and ``bias``.
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_lm_head(OP, hidden, weight, ids, bias, shift)
    for name, x in (("temperature", temperature), ("logit_scale", logit_scale)):
        check_number(OP, name, x, "positive")
    check_number(OP, "softcap", softcap, "positive", allow_none=True)
    check_number(OP, "ignore_index", ignore_index, "int")
    check_number(OP, "vocab_start", vocab_start, "int")
    check_flags(OP, return_entropy=return_entropy, check_ids=check_ids, shift=shift, return_lse=return_lse)
    check_out_dtype(OP, out_dtype)
    dtype = linear_compute_dtype(OP, hidden, weight, bias)
    if dtype != hidden.dtype or dtype != weight.dtype or (bias is not None and bias.dtype != dtype):
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # exact upcasts; gradients flow back in each dtype
        bias = bias.to(dtype) if bias is not None else None
    chosen = _dispatch.pick_backend(backend, hidden.device, op=OP, dtypes={"hidden": dtype})
    if chosen == "reference" and process_group is not None:
        raise ValueError(f"{OP}: backend='reference' computes one device's whole vocabulary; with `process_group` "
                         f"use backend='auto', 'torch' or 'triton'")
    if hidden.device.type == "meta" and chosen != "reference":  # shapes only: the torch path's fake kernels
        chosen = "torch"
    v_global = vocab_parallel.rank_ordered_vocab(OP, process_group, weight.shape[0], vocab_start, hidden.device)
    checking = check_ids and not torch.compiler.is_compiling()
    if checking:
        check_id_range(OP, ids, v_global, ignore_index,
                       span="the global vocabulary [0, V)" if process_group is not None else "[0, V)")
    lead = ids.shape
    if shift:
        ids = chunked.shift_ids(ids, ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1])  # a view for contiguous leading dimensions
    ids1 = ids.reshape(-1)
    spec = _Spec(1.0 / float(temperature), float(logit_scale), float(softcap or 0.0), return_entropy, ignore_index,
                 chosen, check_ids)
    if chosen == "reference":
        logp, ent, lse = _reference(h2, weight, ids1, bias=bias, temperature=float(temperature), return_entropy=True,
                                    ignore_index=ignore_index, logit_scale=float(logit_scale), softcap=softcap,
                                    return_lse=True)
    elif process_group is not None:
        logp, ent, lse = _ShardedLinearTokenLogprobs.apply(h2, weight, bias, ids1, spec, process_group, vocab_start)
    else:
        logp, ent, lse = _op(h2, weight, bias, ids1, spec.inv_tau, return_entropy, ignore_index, chosen, check_ids,
                             spec.logit_scale, spec.softcap)
    if checking and logp.device.type != "meta":
        refuse_nan_rows(OP, "`hidden` @ `weight`ᵀ (× logit_scale) / temperature overflows (|logit| / τ must stay "
                        "well below 1e38) or `hidden` / `weight` / `bias` hold NaN or inf there", logp)
    outs = [logp] + ([ent] if return_entropy else []) + ([lse] if return_lse else [])
    outs = [x.reshape(lead) if out_dtype is None else x.reshape(lead).to(out_dtype) for x in outs]
    return outs[0] if len(outs) == 1 else tuple(outs)


__all__ = ["linear_token_logprobs", "tile_sizes"]
