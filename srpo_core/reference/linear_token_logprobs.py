"""Reference for ``linear_token_logprobs``: log-prob (and entropy) of each sampled token straight from hidden states.

Plain torch, readable as the math, float64-friendly (pass float64 inputs for the ground truth). It materialises the
whole ``[N, V]`` logits, which is exactly what the fused versions avoid:

    x = hidden @ weightᵀ (+ bias)            # [N, V], in the inputs' dtype (as a plain torch model computes it)
    f = logit_scale · x                      # upcast: fp32 for bf16/fp16/fp32 inputs, float64 stays float64
    f = softcap · tanh(f / softcap)          # only with a softcap (Gemma)
    u = f / τ
    lse = logsumexp_v(u)                     # [N]
    logp = u[id] − lse                       # [N]; 0 where id == ignore_index
    H = lse − Σ_v softmax(u)_v · u_v          # [N]; 0 where id == ignore_index
    (lse is returned too with return_lse; 0 where id == ignore_index)

Vocab-parallel: with a weight shard ``[V_local, H]`` starting at global vocab id ``vocab_start``, the result of the
whole vocabulary is what the shards must reproduce together; this reference only ever sees the whole vocabulary.
"""

from __future__ import annotations

import torch


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_lse: bool = False,
):
    """``hidden: [N, H]``, ``weight: [V, H]``, ``ids: [N]``, ``bias: [V] | None`` → ``logp [N]`` (then ``entropy [N]``
    when ``return_entropy``, ``lse [N]`` when ``return_lse``), float32 (float64 for float64 inputs).
    Differentiable by plain autograd."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    f = logits.to(acc) * logit_scale
    if softcap is not None:
        f = softcap * torch.tanh(f / softcap)
    u = f / temperature
    keep = ids != ignore_index
    safe = torch.where(keep, ids, torch.zeros_like(ids)).long()
    logsm = torch.log_softmax(u, dim=-1)
    logp = torch.where(keep, logsm.gather(-1, safe[:, None])[:, 0], torch.zeros((), dtype=acc))
    outs = [logp]
    if return_entropy:
        p = logsm.exp()
        # 0 · log 0 = 0 for −inf logits; masking log p first keeps the gradient finite there too
        entropy = -(p * torch.where(p > 0, logsm, torch.zeros((), dtype=acc))).sum(-1)
        outs.append(torch.where(keep, entropy, torch.zeros((), dtype=acc)))
    if return_lse:
        outs.append(torch.where(keep, torch.logsumexp(u, dim=-1), torch.zeros((), dtype=acc)))
    return outs[0] if len(outs) == 1 else tuple(outs)
