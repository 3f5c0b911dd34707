"""Public ``linear_token_contrast``: ``token_contrast`` (per-token ``kl`` / ``js`` between two next-token
distributions, plus both sampled-token log-probs) of two conditions' hidden states through one LM head, without ever
materialising either ``[N, V]`` logit set.

    x  = hidden @ weightᵀ + bias,   x' = hidden_ref @ weightᵀ + bias,   p = softmax(x/τ),   p' = softmax(x'/τ)
    kl:  Σ_v p_v (log p_v − log p'_v)          js:  ½ KL(p ‖ m) + ½ KL(p' ‖ m),  m = ½ (p + p')
    logp = log p_id,  logp_ref = log p'_id

Backends (``"auto" | "triton" | "torch"``; auto = Triton for CUDA tensors, torch otherwise):

- **torch** (``srpo_core/cpu/linear_token_contrast.py``): ``kl`` vocabulary-tiled like ``linear_token_logprobs``'s
  forward (same tile sizes and tile GEMM), one pass per tile pair (an online ``Σ p (log p − log p')``); rows that the
  fp32 fast path cannot finish (``−inf`` logits, a logit far above the running log-sum-exp, NaN/inf inputs) are
  recomputed from their materialised logits in float64, in row chunks (D212). ``js`` (which needs both normalisers
  before any term) in row chunks of both logit sets, at most 8 M logits each, through ``token_contrast``'s torch
  path (D214); sharded, it takes the tiled two-pass walk instead.
- **triton** (``srpo_core.kernels.linear_token_contrast``): one program per block of rows walks the vocabulary in
  ``tl.dot`` tiles of both conditions with fp32 accumulation and the same online sums (``js``: a second walk).

Input checks are ``linear_token_logprobs``'s (``srpo_core/ops/linear_token_logprobs_checks.py``); ignored rows are
dropped before any work (its ``_rows``); vocab-parallel (``process_group``) uses its shard-layout check and
combines each shard's ``(lse, lse', t, target, target')`` with one max and one sum all-reduce (``js``: the
log-sum-exps first, then one sum all-reduce of the shards' partial sums).

Without a process group the op is registered as ``torch.ops.srpo_core.linear_token_contrast`` (a ``torch.library``
custom op with a fake kernel), so ``torch.compile(fullgraph=True)`` traces through it. Forward only (D210).
"""

from __future__ import annotations

import math

import torch

from srpo_core import _dispatch
from srpo_core._validate import brief, describe
from srpo_core.cpu import linear_token_contrast as cpu
from srpo_core.cpu.linear_token_logprobs import _acc_dtype
from srpo_core.ops.linear_token_logprobs import _rows
from srpo_core.ops.linear_token_logprobs_checks import (
    autocast_dtype,
    check_id_values,
    check_options,
    check_tensors,
    compute_dtype,
)
from srpo_core.ops.linear_token_logprobs_parallel import _combine_shards, _global_vocab
from srpo_core.ops.token_contrast import KINDS, TokenContrast

OP = "linear_token_contrast"


# ---------------------------------------------------------------------------------------------------------- combine
def _dist_reducers(group):
    import torch.distributed as dist

    def reduce(op):
        def run(x):
            x = x.clone()
            dist.all_reduce(x, op=op, group=group)
            return x

        return run

    return reduce(dist.ReduceOp.MAX), reduce(dist.ReduceOp.SUM)


# ------------------------------------------------------------------------------------------------------ the passes
def _local_stats(backend, hidden, hidden_ref, weight, bias, ids_local, inv_tau, kind):
    if backend == "triton":
        from srpo_core.kernels.linear_token_contrast import linear_contrast_stats

        return linear_contrast_stats(hidden, hidden_ref, weight, bias, ids_local, inv_tau=inv_tau, kind=kind)
    return cpu.local_stats(hidden, hidden_ref, weight, bias, ids_local, inv_tau, kind)


def _js_local(backend, hidden, hidden_ref, weight, bias, inv_tau, lse_x, lse_y):
    if backend == "triton":
        from srpo_core.kernels.linear_token_contrast import linear_contrast_js

        return linear_contrast_js(hidden, hidden_ref, weight, bias, lse_x, lse_y, inv_tau=inv_tau)
    return cpu.js_local(hidden, hidden_ref, weight, bias, inv_tau, lse_x, lse_y)


def _contrast(hidden, hidden_ref, weight, bias, ids, kind, inv_tau, ignore_index, backend, group=None,
              vocab_start=0):
    """``hidden, hidden_ref [N, H]``, ``ids [N]`` → ``(div, logp, logp_ref)`` ``[N]`` (acc dtype), 0 at ignored rows."""
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    n = ids.shape[0]
    keep, rows, h_k, ids_local = _rows(hidden, ids, ignore_index, vocab_start, True)
    h_ref_k = hidden_ref[rows] if rows is not None else hidden_ref
    owned = (ids_local >= 0) & (ids_local < weight.shape[0])
    if h_k.shape[0] == 0 and group is None:
        div = lp = lq = torch.zeros(0, dtype=acc, device=dev)
    elif kind == "js" and group is None and backend == "torch":  # row chunks, one GEMM per condition (D214)
        div, lp, lq = cpu.js_rows(h_k, h_ref_k, weight, bias, ids_local, 1.0 / inv_tau, -1)
    else:
        lse_x, lse_y, t, tgt_x, tgt_y = _local_stats(backend, h_k, h_ref_k, weight, bias, ids_local, inv_tau, kind)
        if group is None:
            lp, lq = tgt_x - lse_x, tgt_y - lse_y
            if kind == "kl":
                div = t
            else:
                div = _js_local(backend, h_k, h_ref_k, weight, bias, inv_tau, lse_x, lse_y)
        elif kind == "kl":
            lse_gx, lse_gy, div, tgt_gx, tgt_gy = cpu.combine_stats(lse_x, lse_y, t, tgt_x, tgt_y, owned,
                                                                    *_dist_reducers(group))
            lp, lq = tgt_gx - lse_gx, tgt_gy - lse_gy
        else:
            import torch.distributed as dist

            lse_gx, tgt_gx, _ = _combine_shards(lse_x, tgt_x, None, owned, group)
            lse_gy, tgt_gy, _ = _combine_shards(lse_y, tgt_y, None, owned, group)
            lp, lq = tgt_gx - lse_gx, tgt_gy - lse_gy
            div = _js_local(backend, h_k, h_ref_k, weight, bias, inv_tau, lse_gx, lse_gy)
            dist.all_reduce(div, group=group)
        if kind == "js":
            div = div.clamp(max=math.log(2.0))
        div = div.clamp(min=0.0)  # rounding only: both divergences are ≥ 0 (NaN passes through)
        broken = torch.isnan(lp) | torch.isnan(lq)
        div = torch.where(broken, torch.full_like(div, math.nan), div)

    def full(x):
        if rows is not None:
            return torch.zeros(n, dtype=acc, device=dev).index_copy_(0, rows, x.to(acc))
        return torch.where(keep, x.to(acc), torch.zeros((), dtype=acc, device=dev))

    return full(div), full(lp), full(lq)


@torch.library.custom_op("srpo_core::linear_token_contrast", mutates_args=())
def _linear_token_contrast_op(hidden: torch.Tensor, hidden_ref: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None, ids: torch.Tensor, kind: str, inv_tau: float,
                              ignore_index: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden, hidden_ref: [N, H]``, ``weight: [V, H]``, ``ids: [N]`` → ``(div, logp, logp_ref)`` ``[N]``."""
    return _contrast(hidden, hidden_ref, weight, bias, ids, kind, inv_tau, ignore_index, backend)


@_linear_token_contrast_op.register_fake
def _(hidden, hidden_ref, weight, bias, ids, kind, inv_tau, ignore_index, backend):
    acc = _acc_dtype(hidden.dtype)
    return tuple(hidden.new_empty(ids.shape, dtype=acc) for _ in range(3))


# ------------------------------------------------------------------------------------------------ the public function
def _refuse_nan(div, logp, logp_ref):
    """NaN only comes from logits that are not finite in the compute dtype (an overflow of ``hidden @ weightᵀ / τ``,
    NaN/inf inputs): raise, naming the row, as ``linear_token_logprobs`` does (D150, D211)."""
    bad = torch.isnan(logp) | torch.isnan(logp_ref) | torch.isnan(div)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0, 0])
        raise ValueError(f"{OP}: the logits of row {i} are not finite in {logp.dtype}: `hidden` or `hidden_ref` @ "
                         f"`weight`ᵀ / temperature overflows (|logit| / τ must stay well below 1e38) or `hidden` / "
                         f"`hidden_ref` / `weight` / `bias` hold NaN or inf there ({int(bad.sum())} such row(s)); "
                         f"pass check_ids=False to get the NaN instead")


def linear_token_contrast(
    hidden: torch.Tensor,
    hidden_ref: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    kind: str = "kl",
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    process_group=None,
    vocab_start: int = 0,
    check_ids: bool = True,
) -> TokenContrast:
    """Per-token divergence of ``p = softmax((hidden @ weightᵀ + bias)/τ)`` from ``p' = softmax((hidden_ref @
    weightᵀ + bias)/τ)`` and both log-probs of the sampled token, never materialising the ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` float (fp32/bf16/fp16; float64 on the torch path), the policy's last hidden states.
        hidden_ref: ``[..., H]``, the shape and dtype of ``hidden``: the other condition's (corrupted image, ablated
            perception) hidden states at the same positions.
        weight: ``[V, H]``, the LM head, shared by both conditions; with ``process_group`` this rank's vocabulary
            shard ``[V_local, H]`` covering global ids ``[vocab_start, vocab_start + V_local)``. Same dtype as
            ``hidden``, or mixed precision (bf16/fp16 with fp32: computed in fp32 on the exactly upcast inputs).
        ids: ``[...]`` integer sampled tokens (global ids), each in ``[0, V)`` or equal to ``ignore_index``.
        kind: ``"kl"`` (``KL(p ‖ p')``) or ``"js"`` (Jensen–Shannon, in ``[0, ln 2]``; on the Triton and the
            vocab-parallel paths two passes over the vocabulary, i.e. twice the GEMMs).
        temperature: ``τ > 0``, applied to both conditions.
        bias: optional ``[V]`` (the shard's part when sharded), shared by both conditions.
        ignore_index: positions with this id give 0 in all three outputs; their rows are skipped before any work.
        backend: ``"auto" | "triton" | "torch"``.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (None: not sharded).
        vocab_start: first global vocabulary id of this rank's shard.
        check_ids: scan ``ids`` for values outside ``[0, V)`` and raise, and raise on a NaN result (logits not
            finite in the compute dtype) instead of returning it; ``False`` skips both (one host sync fewer each;
            an out-of-range id then gives an unspecified value in its row, no error).

    Returns:
        ``TokenContrast(div, logp, logp_ref)`` (``srpo_core.token_contrast``'s), each of ``ids``' shape, float32
        (float64 for float64 inputs).

    Forward only (D210): the contrast is a signal read without gradient (SRPO's perception contrast weights the
    advantage, it is not a loss term), so inputs that require grad are read detached and the outputs carry no graph.
    The conventions are ``token_contrast``'s: ``p_v = 0`` terms count 0; ``KL = +inf`` where a finite logit meets a
    ``−inf`` one (only possible through non-finite inputs, since both conditions share ``bias``); the logits are
    computed in the inputs' dtype (as a plain model computes them), everything after in fp32.
    """
    if isinstance(hidden, torch.Tensor):
        cast = autocast_dtype(hidden.device)
        if cast is not None:  # like F.linear under autocast (D67)
            hidden, hidden_ref, weight, bias = (
                x.to(cast) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                else x for x in (hidden, hidden_ref, weight, bias))
    check_tensors(hidden, weight, ids, bias, False, op=OP)
    if not isinstance(hidden_ref, torch.Tensor):
        raise TypeError(f"{OP}: `hidden_ref` must be a tensor of the shape of `hidden` {list(hidden.shape)}, got "
                        f"{describe(hidden_ref)}")
    if hidden_ref.shape != hidden.shape or hidden_ref.dtype != hidden.dtype or hidden_ref.device != hidden.device:
        raise ValueError(f"{OP}: `hidden_ref` must have the shape, dtype and device of `hidden` "
                         f"({list(hidden.shape)}, {hidden.dtype}, {hidden.device}), got {describe(hidden_ref)}")
    check_options(temperature=temperature, ignore_index=ignore_index, vocab_start=vocab_start,
                  flags={"check_ids": check_ids}, out_dtype=None, logit_scale=1.0, softcap=None, op=OP)
    if kind not in KINDS:
        raise ValueError(f"{OP}: `kind` must be one of {KINDS}, got {brief(kind)}")
    dtype = compute_dtype(hidden, weight, bias, op=OP)
    hidden, hidden_ref, weight = hidden.detach().to(dtype), hidden_ref.detach().to(dtype), weight.detach().to(dtype)
    bias = bias.detach().to(dtype) if bias is not None else None
    chosen = _dispatch.pick_backend(backend, hidden.device, op=OP, dtypes={"hidden": dtype})
    if hidden.device.type == "meta":
        chosen = "torch"
    v_global = _global_vocab(process_group, weight.shape[0], vocab_start, hidden.device, op=OP)
    if check_ids and not torch.compiler.is_compiling():
        check_id_values(ids, ignore_index, v_global, process_group is not None, op=OP)
    lead = ids.shape
    h2, r2 = hidden.reshape(-1, hidden.shape[-1]), hidden_ref.reshape(-1, hidden.shape[-1])
    ids1 = ids.reshape(-1)
    inv_tau = 1.0 / float(temperature)
    if process_group is not None:
        outs = _contrast(h2, r2, weight, bias, ids1, kind, inv_tau, int(ignore_index), chosen, process_group,
                         vocab_start)
    else:
        outs = torch.ops.srpo_core.linear_token_contrast(h2, r2, weight, bias, ids1, kind, inv_tau,
                                                         int(ignore_index), chosen)
    if check_ids and not torch.compiler.is_compiling() and hidden.device.type != "meta":
        _refuse_nan(*outs)
    return TokenContrast(*(x.reshape(lead) for x in outs))


__all__ = ["linear_token_contrast"]
