"""Public ``linear_token_contrast``: ``token_contrast`` (per-token ``kl`` / ``js`` between two next-token
distributions, plus both sampled-token log-probs) of two conditions' hidden states through one LM head, without ever
materialising either ``[N, V]`` logit set.

    x  = hidden @ weightᵀ + bias,   x' = hidden_ref @ weightᵀ + bias,   p = softmax(x/τ),   p' = softmax(x'/τ)
    kl:  Σ_v p_v (log p_v − log p'_v)          js:  ½ KL(p ‖ m) + ½ KL(p' ‖ m),  m = ½ (p + p')
    logp = log p_id,  logp_ref = log p'_id

Backends (``"auto" | "triton" | "torch" | "reference"``; auto = Triton for CUDA tensors, torch otherwise; reference =
``srpo_core.reference.linear_token_contrast``, the two logit sets materialised, not with a process group):

- **torch** (``srpo_core/cpu/linear_token_contrast.py``): ``kl`` vocabulary-tiled like ``linear_token_logprobs``'s
  forward (same tile sizes and tile GEMM), one pass per tile pair (an online ``Σ p (log p − log p')``); rows that the
  fp32 fast path cannot finish (``−inf`` logits, a logit far above the running log-sum-exp, NaN/inf inputs) are
  recomputed from their materialised logits in float64, in row chunks (D212). ``js`` (which needs both normalisers
  before any term) in row chunks of both logit sets, at most 8 M logits each, through ``token_contrast``'s torch
  path (D214); sharded, it takes the tiled two-pass walk instead.
- **triton** (``srpo_core.kernels.linear_token_contrast``): one program per block of rows walks the vocabulary in
  ``tl.dot`` tiles of both conditions with fp32 accumulation and the same online sums (``js``: a second walk).

Input checks are ``linear_token_logprobs``'s (``srpo_core/_validate.py``); ignored rows are dropped before any work
(``srpo_core.common.rows``); vocab-parallel (``process_group``, ``srpo_core.common.vocab_parallel``) uses its
shard-layout check and
combines each shard's ``(lse, lse', t, target, target')`` with one max and one sum all-reduce (``js``: the
log-sum-exps first, then one sum all-reduce of the shards' partial sums).

Without a process group the op is registered as ``torch.ops.srpo_core.linear_token_contrast`` (a ``torch.library``
custom op with a fake kernel), so ``torch.compile(fullgraph=True)`` traces through it. Forward only (D210).
"""

from __future__ import annotations

import math

import torch

from srpo_core import _dispatch
from srpo_core._validate import (
    autocast_inputs,
    brief,
    check_flags,
    check_id_range,
    check_lm_head,
    check_number,
    describe,
    linear_compute_dtype,
    refuse_nan_rows,
)
from srpo_core.common import linear_contrast, vocab_parallel
from srpo_core.common.rows import shard_rows
from srpo_core.cpu import linear_token_contrast as cpu
from srpo_core.cpu.linear_token_logprobs import _acc_dtype
from srpo_core.ops.token_contrast import KINDS, TokenContrast
from srpo_core.reference.linear_token_contrast import linear_token_contrast as _reference

OP = "linear_token_contrast"


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
    rows, h_k, ids_local = shard_rows(hidden, ids, ignore_index, vocab_start, True)
    h_ref_k = rows.pack(hidden_ref)
    if h_k.shape[0] == 0 and group is None:
        div = lp = lq = torch.zeros(0, dtype=acc, device=hidden.device)
    elif kind == "js" and group is None and backend == "torch":  # row chunks, one GEMM per condition (D214)
        div, lp, lq = cpu.js_rows(h_k, h_ref_k, weight, bias, ids_local, 1.0 / inv_tau, -1)
    else:
        div, lp, lq = _walk(h_k, h_ref_k, weight, bias, ids_local, kind, inv_tau, backend, group)
    return rows.unpack(div, acc), rows.unpack(lp, acc), rows.unpack(lq, acc)


def _walk(h_k, h_ref_k, weight, bias, ids_local, kind, inv_tau, backend, group):
    """The vocabulary walks over this shard (and the combine over the group) → ``(div, logp, logp_ref)`` of the
    computed rows, ``div`` clamped to its range (rounding only) and NaN where either log-prob is."""
    owned = (ids_local >= 0) & (ids_local < weight.shape[0])
    lse_x, lse_y, t, tgt_x, tgt_y = _local_stats(backend, h_k, h_ref_k, weight, bias, ids_local, inv_tau, kind)
    if group is None:
        lp, lq = tgt_x - lse_x, tgt_y - lse_y
        div = t if kind == "kl" else _js_local(backend, h_k, h_ref_k, weight, bias, inv_tau, lse_x, lse_y)
    elif kind == "kl":
        lse_gx, lse_gy, div, tgt_gx, tgt_gy = linear_contrast.combine_stats(lse_x, lse_y, t, tgt_x, tgt_y, owned,
                                                                            *vocab_parallel.reducers(group))
        lp, lq = tgt_gx - lse_gx, tgt_gy - lse_gy
    else:
        lse_gx, tgt_gx, _ = vocab_parallel.combine_shards(lse_x, tgt_x, None, owned, group)
        lse_gy, tgt_gy, _ = vocab_parallel.combine_shards(lse_y, tgt_y, None, owned, group)
        lp, lq = tgt_gx - lse_gx, tgt_gy - lse_gy
        div = vocab_parallel.all_sum_(_js_local(backend, h_k, h_ref_k, weight, bias, inv_tau, lse_gx, lse_gy), group)
    if kind == "js":
        div = div.clamp(max=math.log(2.0))
    div = div.clamp(min=0.0)  # rounding only: both divergences are ≥ 0 (NaN passes through)
    broken = torch.isnan(lp) | torch.isnan(lq)
    return torch.where(broken, torch.full_like(div, math.nan), div), lp, lq


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
        backend: ``"auto" | "triton" | "torch" | "reference"``.
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
    hidden, hidden_ref, weight, bias = autocast_inputs(hidden, hidden_ref, weight, bias)
    check_lm_head(OP, hidden, weight, ids, bias, False)
    if not isinstance(hidden_ref, torch.Tensor):
        raise TypeError(f"{OP}: `hidden_ref` must be a tensor of the shape of `hidden` {list(hidden.shape)}, got "
                        f"{describe(hidden_ref)}")
    if hidden_ref.shape != hidden.shape or hidden_ref.dtype != hidden.dtype or hidden_ref.device != hidden.device:
        raise ValueError(f"{OP}: `hidden_ref` must have the shape, dtype and device of `hidden` "
                         f"({list(hidden.shape)}, {hidden.dtype}, {hidden.device}), got {describe(hidden_ref)}")
    check_number(OP, "temperature", temperature, "positive")
    check_number(OP, "ignore_index", ignore_index, "int")
    check_number(OP, "vocab_start", vocab_start, "int")
    check_flags(OP, check_ids=check_ids)
    if kind not in KINDS:
        raise ValueError(f"{OP}: `kind` must be one of {KINDS}, got {brief(kind)}")
    dtype = linear_compute_dtype(OP, hidden, weight, bias)
    hidden, hidden_ref, weight = hidden.detach().to(dtype), hidden_ref.detach().to(dtype), weight.detach().to(dtype)
    bias = bias.detach().to(dtype) if bias is not None else None
    chosen = _dispatch.pick_backend(backend, hidden.device, op=OP, dtypes={"hidden": dtype})
    if chosen == "reference" and process_group is not None:
        raise ValueError(f"{OP}: backend='reference' computes one device's whole vocabulary; with `process_group` "
                         f"use backend='auto', 'torch' or 'triton'")
    if hidden.device.type == "meta" and chosen != "reference":
        chosen = "torch"
    v_global = vocab_parallel.rank_ordered_vocab(OP, process_group, weight.shape[0], vocab_start, hidden.device)
    checking = check_ids and not torch.compiler.is_compiling()
    if checking:
        check_id_range(OP, ids, v_global, ignore_index,
                       span="the global vocabulary [0, V)" if process_group is not None else "[0, V)")
    lead = ids.shape
    h2, r2 = hidden.reshape(-1, hidden.shape[-1]), hidden_ref.reshape(-1, hidden.shape[-1])
    ids1 = ids.reshape(-1)
    inv_tau = 1.0 / float(temperature)
    if chosen == "reference":
        outs = _reference(h2, r2, weight, ids1, kind=kind, temperature=float(temperature), bias=bias,
                          ignore_index=int(ignore_index))
    elif process_group is not None:
        outs = _contrast(h2, r2, weight, bias, ids1, kind, inv_tau, int(ignore_index), chosen, process_group,
                         vocab_start)
    else:
        outs = torch.ops.srpo_core.linear_token_contrast(h2, r2, weight, bias, ids1, kind, inv_tau,
                                                         int(ignore_index), chosen)
    if checking and hidden.device.type != "meta":
        refuse_nan_rows(OP, "`hidden` or `hidden_ref` @ `weight`ᵀ / temperature overflows (|logit| / τ must stay "
                        "well below 1e38) or `hidden` / `hidden_ref` / `weight` / `bias` hold NaN or inf there", *outs)
    return TokenContrast(*(x.reshape(lead) for x in outs))


__all__ = ["linear_token_contrast"]
