"""Public ``linear_token_logprobs``: per-token log-probs (and entropy) of ``hidden @ weightᵀ + bias`` without ever
materialising the ``[N, V]`` logits.

Math (SPEC "Log-prob ops"), with ``u = (hidden @ weightᵀ + bias) / τ``:

    logp[n] = u[n, id_n] − lse_n,        lse_n = log Σ_v exp u[n, v]
    H[n]    = lse_n − Σ_v p[n, v] u[n, v],  p = softmax(u)

Backends (``backend="auto" | "triton" | "torch"``; auto = Triton for CUDA tensors, torch otherwise):

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
- **triton** (``srpo_core.kernels.linear_logprobs``): a fused forward (``tl.dot`` tiles + online logsumexp, split
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
import math

import torch

from srpo_core import _dispatch
from srpo_core._linear_cpu import (  # noqa: F401  (the torch path; re-exported, callers use L._torch_fwd etc.)
    LN2,
    LOG2E,
    LOW_PRECISION,
    _acc_dtype,
    _torch_bwd,
    _torch_fwd,
    tile_sizes,
)
from srpo_core._validate import describe, require_tensor

OP = "linear_token_logprobs"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------------------
# Backend dispatch of the local (per-shard) passes


def _local_fwd(backend, hidden, weight, bias, ids_local, inv_tau, want_entropy):
    if backend == "triton":
        from srpo_core.kernels.linear_logprobs import linear_logprobs_fwd

        return linear_logprobs_fwd(hidden, weight, bias, ids_local, inv_tau=inv_tau, want_entropy=want_entropy)
    return _torch_fwd(hidden, weight, bias, ids_local, inv_tau, want_entropy)


def _local_bwd(backend, hidden, weight, bias, ids_local, inv_tau, lse, ent, g_lp, g_h, needs):
    if backend == "triton":
        from srpo_core.kernels.linear_logprobs import linear_logprobs_bwd

        return linear_logprobs_bwd(hidden, weight, bias, ids_local, lse, ent, g_lp, g_h, inv_tau=inv_tau, needs=needs)
    return _torch_bwd(hidden, weight, bias, ids_local, inv_tau, lse, ent, g_lp, g_h, needs)


def _combine_shards(lse_r, tgt_r, ent_r, owned, group):
    """All-reduce per-shard ``(lse_r, target_r, H_r)`` into the whole vocabulary's ``(lse, target, H)``."""
    import torch.distributed as dist

    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_r = torch.exp(lse_r - m_safe)  # this shard's share of Σ exp, relative to the global max
    parts = [w_r, torch.where(owned, tgt_r - m_safe, torch.zeros_like(tgt_r))]
    if ent_r is not None:
        parts.append(torch.where(w_r > 0, w_r * (ent_r + m_safe - lse_r), torch.zeros_like(w_r)))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    s = stacked[0]
    lse = m_safe + torch.log(s)
    tgt = stacked[1] + m_safe
    ent = (stacked[2] / s + torch.log(s)) if ent_r is not None else None  # Σ_r w_r (H_r + lse − lse_r), rescaled
    return lse, tgt, ent


def _rows(hidden, ids, ignore_index, vocab_start, compact):
    """The rows the passes compute, and their shard-local ids. With ``compact`` (the default on every backend),
    ignored rows are dropped before any work when there are any (a host sync: ``nonzero``); without it (Triton with
    ``check_ids=False``: no host sync) every row is computed, the ignored ones with zero upstream coefficients and a
    saved ``lse = 0``, which the backward kernel is safe for (it clamps ``log p`` at 0)."""
    keep = ids != ignore_index
    compact = compact and ids.shape[0] > 0 and not bool(keep.all())
    rows = torch.nonzero(keep)[:, 0] if compact else None
    h_k = hidden[rows] if compact else hidden
    ids_k = ids[rows] if compact else ids
    ids_local = torch.where(ids_k == ignore_index, torch.full_like(ids_k, -1), ids_k - vocab_start)
    return keep, rows, h_k, ids_local


AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer in on ``device`` now, or None when autocast is off there."""
    if device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


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
def _fwd(hidden, weight, bias, ids, inv_tau, want_entropy, ignore_index, group, vocab_start, backend, compact=True):
    """→ ``(logp [N], ent [N] or None, lse [N], ent_all [N])``: the outputs (0 at ignored rows) and what backward
    needs (per-row logsumexp and entropy of the whole vocabulary)."""
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    n = ids.shape[0]
    keep, rows, h_k, ids_local = _rows(hidden, ids, ignore_index, vocab_start, compact or backend == "torch")
    owned = (ids_local >= 0) & (ids_local < weight.shape[0])
    if h_k.shape[0] == 0:
        lse_k = tgt_k = torch.zeros(0, dtype=acc, device=dev)
        ent_k = torch.zeros(0, dtype=acc, device=dev) if want_entropy else None
    else:
        lse_k, tgt_k, ent_k = _local_fwd(backend, h_k, weight, bias, ids_local, inv_tau, want_entropy)
    if group is not None:
        lse_k, tgt_k, ent_k = _combine_shards(lse_k, tgt_k, ent_k, owned, group)
    zero = torch.zeros((), dtype=acc, device=dev)

    def full(x):
        if rows is not None:
            return torch.zeros(n, dtype=acc, device=dev).index_copy_(0, rows, x)
        return torch.where(keep, x, zero)

    lse = full(lse_k)
    ent = full(ent_k) if want_entropy else None
    return full(tgt_k - lse_k), ent, lse, ent if want_entropy else lse


@_autocast_off(2)
def _bwd(g_logp, g_ent, hidden, weight, bias, ids, lse, ent, inv_tau, want_entropy, ignore_index, group,
         vocab_start, backend, needs, compact=True):
    """Gradients ``(grad_hidden, grad_weight, grad_bias)`` (None where ``needs`` says no): the logits tiles are
    recomputed from ``hidden``, ``weight`` and the saved per-row ``lse`` (and ``ent``)."""
    need_h, need_w, need_b = needs
    keep, rows, h_k, ids_local = _rows(hidden, ids, ignore_index, vocab_start, compact or backend == "torch")
    acc = lse.dtype
    zero = torch.zeros((), dtype=acc, device=lse.device)

    def local(g):
        if g is None:
            return None
        g = g.to(acc)
        return g[rows] if rows is not None else torch.where(keep, g, zero)

    g_lp, g_h = local(g_logp), local(g_ent if want_entropy else None)
    lse_k, ent_k = (lse[rows], ent[rows]) if rows is not None else (lse, ent)
    if (g_lp is None and g_h is None) or not (need_h or need_w or need_b) or h_k.shape[0] == 0:
        gh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        if group is not None and need_h:
            import torch.distributed as dist

            dist.all_reduce(gh, group=group)  # the other ranks may have work: keep the collective in step
        return gh, gw, gb
    gh, gw, gb = _local_bwd(backend, h_k, weight, bias, ids_local, inv_tau, lse_k, ent_k if want_entropy else None,
                            g_lp, g_h, needs)
    if need_h:
        if rows is not None:
            gh = torch.zeros(hidden.shape, dtype=acc, device=h_k.device).index_copy_(0, rows, gh)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(gh, group=group)
        gh = gh.to(hidden.dtype)
    if need_b:
        gb = gb.to(bias.dtype)
    return gh, gw, gb


class _ShardedLinearTokenLogprobs(torch.autograd.Function):
    """The vocab-parallel path (a process group cannot be a custom-op argument)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, inv_tau, want_entropy, ignore_index, group, vocab_start, backend):
        ctx.set_materialize_grads(False)
        logp, ent, lse, ent_all = _fwd(hidden, weight, bias, ids, inv_tau, want_entropy, ignore_index, group,
                                       vocab_start, backend)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, ent_all)
        ctx.cfg = (inv_tau, want_entropy, ignore_index, group, vocab_start, backend)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
        gh, gw, gb = _bwd(g_logp, g_ent, hidden, weight, bias, ids, lse, ent, *ctx.cfg, ctx.needs_input_grad[:3])
        return gh, gw, gb, None, None, None, None, None, None, None


# The unsharded path as torch.library custom ops (forward, backward, autograd formula, fake kernels), so that
# torch.compile(fullgraph=True) traces a training step through it.
@torch.library.custom_op("srpo_core::linear_token_logprobs", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, inv_tau: float,
        want_entropy: bool, ignore_index: int, backend: str, compact: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ ``(logp, entropy or [0], lse)``; backward saves ``lse`` (and the entropy output when there is one)."""
    logp, ent, lse, _ = _fwd(hidden, weight, bias, ids, inv_tau, want_entropy, ignore_index, None, 0, backend,
                             compact)
    return logp, (ent if want_entropy else logp.new_empty(0)), lse


@_op.register_fake
def _(hidden, weight, bias, ids, inv_tau, want_entropy, ignore_index, backend, compact):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n if want_entropy else 0, dtype=acc), \
        hidden.new_empty(n, dtype=acc)


@torch.library.custom_op("srpo_core::linear_token_logprobs_backward", mutates_args=())
def _op_bwd(g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None, ids: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor, inv_tau: float,
            want_entropy: bool, ignore_index: int, backend: str, compact: bool, need_h: bool, need_w: bool,
            need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gh, gw, gb = _bwd(g_logp, g_ent, hidden, weight, bias, ids, lse, ent, inv_tau, want_entropy, ignore_index, None,
                      0, backend, (need_h, need_w, need_b), compact)
    # a custom op's outputs may not alias each other: a fresh empty tensor for each gradient not asked for
    return tuple(x if x is not None else hidden.new_empty(0) for x in (gh, gw, gb))


@_op_bwd.register_fake
def _(g_logp, g_ent, hidden, weight, bias, ids, lse, ent, inv_tau, want_entropy, ignore_index, backend, compact,
      need_h, need_w, need_b):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b and bias is not None else hidden.new_empty(0))


def _setup(ctx, inputs, output):
    hidden, weight, bias, ids, inv_tau, want_entropy, ignore_index, backend, compact = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, ids, lse, ent if want_entropy else lse)
    ctx.cfg = (inv_tau, want_entropy, ignore_index, backend, compact)


def _backward(ctx, g_logp, g_ent, _g_lse):
    hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
    inv_tau, want_entropy, ignore_index, backend, compact = ctx.cfg
    need_h, need_w = ctx.needs_input_grad[:2]
    need_b = bias is not None and ctx.needs_input_grad[2]
    gh, gw, gb = _op_bwd(g_logp, g_ent if want_entropy else None, hidden, weight, bias, ids, lse, ent, inv_tau,
                         want_entropy, ignore_index, backend, compact, need_h, need_w, need_b)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * 6


_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------------------------
# Validation and the public function


def _shard_layout(group, v_local: int, vocab_start: int, device: torch.device) -> tuple[list[int], list[int]]:
    """All-gather every rank's ``(V_local, vocab_start)``, so that all ranks see (and reject) the same layout."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    got = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(got, torch.tensor([v_local, vocab_start], dtype=torch.int64, device=device), group=group)
    return [int(x[0]) for x in got], [int(x[1]) for x in got]


def _validate(hidden, weight, ids, bias, temperature, ignore_index, vocab_start, return_entropy):
    require_tensor(OP, "hidden", hidden, kind="float", ndim=2)
    require_tensor(OP, "weight", weight, kind="float", ndim=2)
    require_tensor(OP, "ids", ids, kind="int", ndim=1)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{OP}: `weight` must be [V, H] with H = {hidden.shape[1]} (the inner size of `hidden` "
                         f"[N, H]), got {describe(weight)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{OP}: `weight` must have V >= 1 rows (vocabulary entries), got {describe(weight)}")
    if ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"{OP}: `ids` must have shape [N] = [{hidden.shape[0]}] (one id per row of `hidden`), "
                         f"got {describe(ids)}")
    for name, x in (("weight", weight), ("ids", ids)) + ((("bias", bias),) if bias is not None else ()):
        if x.device != hidden.device:
            raise ValueError(f"{OP}: `{name}` must be on {hidden.device} like `hidden`, got {describe(x)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: `weight` must have the dtype of `hidden` ({hidden.dtype}), got {describe(weight)}")
    if bias is not None:
        require_tensor(OP, "bias", bias, kind="float", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{OP}: `bias` must have shape [V] = [{weight.shape[0]}] (one entry per row of "
                             f"`weight`), got {describe(bias)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{OP}: `bias` must have the dtype of `hidden` ({hidden.dtype}), got {describe(bias)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{OP}: `temperature` must be a positive finite float, got {describe(temperature)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{OP}: `temperature` must be a positive finite float, got {temperature!r}")
    for name, x in (("ignore_index", ignore_index), ("vocab_start", vocab_start)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{OP}: `{name}` must be an int, got {describe(x)}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{OP}: `return_entropy` must be a bool, got {describe(return_entropy)}")


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
):
    """Log-prob of each sampled token under ``softmax((hidden @ weightᵀ + bias) / τ)``, never materialising the
    ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` float (fp32/bf16/fp16; float64 on the torch path).
        weight: ``[V, H]`` (the LM head), same dtype and device; with ``process_group`` this rank's vocabulary shard
            ``[V_local, H]`` covering global ids ``[vocab_start, vocab_start + V_local)``.
        ids: ``[N]`` integer sampled tokens (global ids), each in ``[0, V)`` (``V`` = the global vocabulary when
            sharded) or equal to ``ignore_index``.
        bias: optional ``[V]`` (the shard's part when sharded).
        temperature: ``τ > 0``.
        return_entropy: also return the entropy of ``softmax(u)`` per token.
        ignore_index: tokens with this id give 0 (and no gradient).
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (None: not sharded).
        vocab_start: first global vocabulary id of this rank's shard; must equal the sum of the shard sizes of the
            lower ranks.
        backend: ``"auto" | "triton" | "torch"``.
        check_ids: scan ``ids`` for values outside ``[0, V)`` and raise (the default), and drop ignored rows before
            any work. Both read values on the host (a device sync per call). ``False`` skips the scan (an
            out-of-range id then gives an unspecified value, no error) and, on the Triton backend, computes every
            row (ignored ones contribute exactly 0), so the call has no host sync and can be captured in a CUDA
            graph (``torch.compile(mode="reduce-overhead")``). The torch backend always drops ignored rows. Under
            ``torch.compile`` the scan is skipped whatever this says.

    Returns:
        ``logp [N]`` — or ``(logp, entropy)`` when ``return_entropy`` — float32 (float64 for float64 inputs),
        differentiable in ``hidden``, ``weight`` and ``bias``.
    """
    cast = _autocast_dtype(hidden.device) if isinstance(hidden, torch.Tensor) else None
    if cast is not None:  # like F.linear under autocast (D67): floating inputs other than float64 run in its dtype
        hidden, weight, bias = (x.to(cast) if isinstance(x, torch.Tensor) and x.is_floating_point()
                                and x.dtype != torch.float64 else x for x in (hidden, weight, bias))
    _validate(hidden, weight, ids, bias, temperature, ignore_index, vocab_start, return_entropy)
    chosen = _dispatch.pick_backend(backend, hidden.device, op=OP)
    if chosen == "triton" and hidden.dtype not in KERNEL_DTYPES:
        if backend == "triton":
            raise TypeError(f"{OP}: backend='triton' takes fp32/bf16/fp16 inputs, got `hidden` {hidden.dtype}; "
                            f"use backend='torch' for float64")
        chosen = "torch"
    v_local = weight.shape[0]
    v_global = v_local
    if process_group is not None:
        sizes, starts = _shard_layout(process_group, v_local, vocab_start, hidden.device)
        import torch.distributed as dist

        rank = dist.get_rank(process_group)
        for r, start in enumerate(starts):  # every rank checks every rank, so all raise together (no hang)
            expect = sum(sizes[:r])
            if start != expect:
                who = "this rank" if r == rank else f"rank {r}"
                raise ValueError(f"{OP}: `vocab_start` on {who} must be {expect} (the sum of the lower ranks' "
                                 f"shard sizes; shards {sizes}), got {start}")
        v_global = sum(sizes)
    elif vocab_start != 0:
        raise ValueError(f"{OP}: `vocab_start` must be 0 without a process_group (the weight is the whole "
                         f"vocabulary), got {vocab_start}")
    if not isinstance(check_ids, bool):
        raise TypeError(f"{OP}: `check_ids` must be a bool, got {describe(check_ids)}")
    if check_ids and not torch.compiler.is_compiling() and ids.numel():
        bad = (ids != ignore_index) & ((ids < 0) | (ids >= v_global))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            where = "the global vocabulary " if process_group is not None else ""
            raise ValueError(f"{OP}: `ids` must lie in {where}[0, V) = [0, {v_global}) or equal ignore_index="
                             f"{ignore_index}, got ids[{i}] = {int(ids[i])} ({int(bad.sum())} such id(s))")
    inv_tau = 1.0 / float(temperature)
    if process_group is not None:
        logp, ent = _ShardedLinearTokenLogprobs.apply(hidden, weight, bias, ids, inv_tau, return_entropy,
                                                      ignore_index, process_group, vocab_start, chosen)
    else:
        logp, ent, _ = _op(hidden, weight, bias, ids, inv_tau, return_entropy, ignore_index, chosen, check_ids)
    return (logp, ent) if return_entropy else logp


__all__ = ["linear_token_logprobs", "tile_sizes"]
