"""Triton path of ``linear_policy_loss``: the fused linear log-prob kernels of ``linear_token_logprobs`` driven
for a loss.

``L = Σ_t coef_t·ℓ_t(logp_t, H_t)`` needs, per token, only ``logp_t`` and ``H_t`` (and their upstream gradients
``∂L/∂logp_t``, ``∂L/∂H_t``), so the launcher here

1. runs ``linear_logprobs_fwd`` (fused ``h @ Wᵀ`` tiles + online logsumexp: ``lse``, the sampled logit, ``H``),
2. hands ``logp`` and ``H`` to ``token_fn`` — the caller's loss math (kernels hold no policy), which returns
   ``(∂L/∂logp, ∂L/∂H | None)`` as ``[N]`` fp32 vectors,
3. runs ``linear_logprobs_bwd`` with those as the upstream gradients (``G = ∂L/∂logits`` tile by tile, then
   ``grad_hidden += G @ W_chunk`` and ``grad_weight[chunk] = Gᵀ @ h`` as library GEMMs).

Every launch runs inside ``device_guard(hidden)``. Unlike the CPU path, which keeps a chunk's full logit rows, this
recomputes the logits tiles in step 3 (the fourth GEMM of D56): on a GPU the ``[N, V]`` row chunks a 3-GEMM schedule
needs would be re-read from HBM, and the fused forward never writes them. Int64 offsets, masks and the ``inf·0``
guards are those of ``linear_token_logprobs``' kernels, which this module does not modify.
"""

from __future__ import annotations

from srpo_core._dispatch import device_guard
from srpo_core.kernels.linear_token_logprobs import linear_logprobs_bwd, linear_logprobs_fwd


def policy_loss_fwd_bwd(hidden, weight, bias, ids, token_fn, *, inv_tau: float, want_entropy: bool,
                        needs: tuple[bool, bool, bool]):
    """``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``ids [N]`` (each in ``[0, V)``) →
    ``(logp [N], H [N] | None, grads (gh fp32 | None, gw | None, gb fp32 | None), token_fn's extra output)``.

    ``token_fn(logp, H) -> (d_logp [N], d_H [N] | None, extra)``."""
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    assert ids.shape == hidden.shape[:1]
    with device_guard(hidden):
        lse, tgt, ent = linear_logprobs_fwd(hidden, weight, bias, ids, inv_tau=inv_tau, want_entropy=want_entropy)
        logp = tgt - lse
        d_logp, d_h, extra = token_fn(logp, ent)
        if any(needs):
            grads = linear_logprobs_bwd(hidden, weight, bias, ids, lse, ent, d_logp.float(),
                                        None if d_h is None else d_h.float(), inv_tau=inv_tau, needs=needs)
        else:
            grads = (None, None, None)
    return logp, ent, grads, extra
