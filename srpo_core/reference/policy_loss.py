"""Reference clipped policy-gradient token loss from hidden states (plain torch, autograd, float64-friendly).

Materialises the logits ``[N, V]``; this is the math the fused op (``srpo_core.ops.policy_loss``) is tested against.
All tensors here are *flat*: one row per token, ``valid: bool [N]`` marks the tokens that enter the loss and
``coef: [N]`` is each token's aggregation weight (``srpo_core.ops.policy_loss.aggregation_coef`` builds it from the
layout and ``loss_agg_mode``), so that

    u      = (hidden @ weightᵀ + bias) / τ                               # [N, V]
    logp_t = u[t, id_t] − logsumexp(u[t])                                # [N]
    H_t    = logsumexp(u[t]) − Σ_v softmax(u[t])_v · u[t, v]             # [N]
    r_t    = exp(clamp(logp_t − old_logp_t, −20, 20))
    pg_t   = max(−A_t·r_t, −A_t·clamp(r_t, 1 − ε_low, 1 + ε_high))        # PPO-clip (DAPO clip-higher)
    pg_t   = min(pg_t, −A_t·c)   where A_t < 0 and c (clip_ratio_c) is set  # dual-clip
    ℓ_t    = pg_t + β·KL_t − entropy_coeff·H_t
    L      = Σ_t valid_t · coef_t · ℓ_t

with ``KL_t`` one of (``d = ref_logp_t − logp_t``): ``k1 = −d``, ``k2 = d²/2``, ``k3 = e^d − d − 1`` (TRL),
``low_var_kl = clamp(e^{d'} − d' − 1, −10, 10)`` with ``d' = clamp(d, −20, 20)`` (verl's ``low_var_kl``); with
``kl_ratio_correction`` the term is ``r_t·KL_t`` (DeepSeek-V3.2's unbiased estimator, TRL's ``use_bias_correction_kl``).
"""

from __future__ import annotations

import torch

from srpo_core._validate import brief
from srpo_core.config import KL_KINDS


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token ``KL_t`` estimate of ``KL(π ‖ π_ref)`` from the sampled token's log-probs."""
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(d) - d - 1
    if kind == "low_var_kl":
        d = torch.clamp(d, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
    raise ValueError(f"kl_penalty: `kind` must be one of {KL_KINDS}, got {brief(kind)}")


def pg_terms(logp, old_logp, adv, *, epsilon_low: float, epsilon_high: float, clip_ratio_c: float | None):
    """→ ``(pg [N], ratio [N], clipped [N] bool, dual_clipped [N] bool)`` of the PPO-clip (and dual-clip) loss."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual = torch.zeros_like(clipped)
    if clip_ratio_c is not None:
        pg3 = -adv * clip_ratio_c
        dual = (pg > pg3) & (adv < 0)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    return pg, ratio, clipped, dual


def token_loss(logp, old_logp, adv, ref_logp, entropy, *, epsilon_low, epsilon_high, clip_ratio_c, beta, kl_kind,
               entropy_coeff, kl_ratio_correction=False):
    """→ ``(ℓ [N], extras)``: the per-token loss and what the metrics need (ratio, clip flags, KL)."""
    pg, ratio, clipped, dual = pg_terms(logp, old_logp, adv, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                        clip_ratio_c=clip_ratio_c)
    loss = pg
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_kind)
        if kl_ratio_correction:  # DeepSeek-V3.2's unbiased estimator (TRL's use_bias_correction_kl): r_t·KL_t
            kl = kl * ratio
        if beta != 0:
            loss = loss + beta * kl
    if entropy_coeff != 0:
        loss = loss - entropy_coeff * entropy
    return loss, {"ratio": ratio, "clipped": clipped, "dual": dual, "kl": kl}


def linear_policy_loss(hidden, weight, bias, ids, old_logp, adv, ref_logp, coef, valid, *, temperature=1.0,
                       epsilon_low=0.2, epsilon_high=0.2, clip_ratio_c=None, beta=0.0, kl_kind="k3",
                       entropy_coeff=0.0, kl_ratio_correction=False):
    """Flat reference: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``ids/old_logp/adv/coef/valid [N]``,
    ``ref_logp [N] | None`` → ``(loss [], logp [N], entropy [N], metrics dict)``; differentiable in hidden, weight,
    bias through autograd. Values at invalid rows are never read into a result (``torch.where``)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    u = logits.to(acc) / temperature
    lse = torch.logsumexp(u, dim=-1)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
    logp = u.gather(-1, safe_ids[:, None])[:, 0] - lse
    entropy = lse - (torch.softmax(u, -1) * u).sum(-1)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    old = logp.detach() if old_logp is None else torch.where(valid, old_logp.to(acc), zero)  # None: on-policy
    a = torch.where(valid, adv.to(acc), zero)
    ref = None if ref_logp is None else torch.where(valid, ref_logp.to(acc), zero)
    per_token, ex = token_loss(logp, old, a, ref, entropy, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                               clip_ratio_c=clip_ratio_c, beta=beta, kl_kind=kl_kind, entropy_coeff=entropy_coeff,
                               kl_ratio_correction=kl_ratio_correction)
    w = torch.where(valid, coef.to(acc), zero)
    loss = (torch.where(valid, per_token, zero) * w).sum()
    n = valid.sum().clamp(min=1)

    def mean(x):
        return (torch.where(valid, x.detach().to(acc), zero)).sum() / n

    metrics = {"clip_fraction": mean(ex["clipped"]), "dual_clip_fraction": mean(ex["dual"]),
               "ratio_mean": mean(ex["ratio"]), "approx_kl": mean(old - logp), "entropy": mean(entropy)}
    if ex["kl"] is not None:
        metrics["kl"] = mean(ex["kl"])
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero)
    return loss, logp, entropy, metrics
