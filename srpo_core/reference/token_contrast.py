"""Reference for ``token_contrast``: the divergence between two next-token distributions, and both sampled-token
log-probs, per position.

With ``p = softmax(x / τ)`` (``x = logits[n]``) and ``p' = softmax(x' / τ)`` (``x' = logits_ref[n]``):

- ``kl``: ``KL(p ‖ p') = Σ_v p_v (log p_v − log p'_v)``, in ``[0, +inf]``;
- ``js``: ``½ KL(p ‖ m) + ½ KL(p' ‖ m)`` with ``m = ½ (p + p')``, in ``[0, ln 2]``;
- ``ℓ = log p_id`` and ``ℓ' = log p'_id`` of the sampled token ``id = ids[n]``.

Conventions (they are the math, written out so no ``0 · inf`` turns into NaN):

- a term with ``p_v = 0`` (``x_v = −inf``) is 0 — ``0 · log 0 = 0``;
- a term with ``p_v > 0`` and ``p'_v = 0`` (``x_v`` finite, ``x'_v = −inf``) makes ``KL = +inf``: ``p`` puts mass
  where ``p'`` has none. ``js`` stays finite (``m_v > 0`` wherever ``p_v > 0``);
- "``p_v > 0``" means ``x_v > −inf``, not "``exp`` did not underflow", so the result does not depend on the dtype;
- a row whose entries are all ``−inf`` (or any ``+inf`` / NaN entry) has no distribution: its outputs are NaN, as
  ``torch.log_softmax`` gives;
- positions with ``ids[n] == ignore_index`` give 0 for all three outputs.

Plain torch, no chunking, readable rather than fast: call it on float64 inputs to get the truth the kernels are
checked against.
"""

from __future__ import annotations

import math

import torch

from srpo_core._validate import brief

KINDS = ("kl", "js")
LN2 = math.log(2.0)


def kl_terms(logp: torch.Tensor, logq: torch.Tensor, finite_p: torch.Tensor, finite_q: torch.Tensor) -> torch.Tensor:
    """``p_v (log p_v − log q_v)`` with ``0 · anything = 0`` and ``p_v > 0 = q_v`` giving ``+inf``. A ``p_v`` that
    underflows to 0 in the working dtype counts 0 too (its log-ratio may have overflowed: ``−inf − (−inf)``)."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    terms = torch.where(finite_p & ~finite_q, torch.full_like(terms, math.inf), terms)
    return torch.where(finite_p, terms, torch.zeros_like(terms))


def js_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``½ p_v log(p_v / m_v) + ½ q_v log(q_v / m_v)``, ``m_v = ½ (p_v + q_v)``, with ``0 · log 0 = 0``."""
    log_m = torch.logaddexp(logp, logq) - LN2
    half_p = torch.where(logp > -math.inf, 0.5 * logp.exp() * (logp - log_m), torch.zeros_like(logp))
    half_q = torch.where(logq > -math.inf, 0.5 * logq.exp() * (logq - log_m), torch.zeros_like(logq))
    return half_p + half_q


def token_contrast(
    logits: torch.Tensor,
    logits_ref: torch.Tensor,
    ids: torch.Tensor,
    *,
    kind: str = "kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits, logits_ref: [..., V]``, ``ids: [...]`` → ``(div, logp, logp_ref)``, each ``[...]``, in the logits'
    dtype.

    No input checks beyond what torch does: this is the math, the public ``srpo_core.token_contrast`` validates.
    """
    if kind not in KINDS:
        raise ValueError(f"token_contrast: `kind` must be one of {KINDS}, got {brief(kind)}")
    # shift by the row max before dividing by τ (log_softmax does not care): logits of ±3e38 with τ = 1e-6 would
    # overflow x/τ to ±inf and leave a row with no distribution. A row with +inf, NaN or only −inf stays NaN.
    x = (logits - logits.amax(-1, keepdim=True)) / temperature
    y = (logits_ref - logits_ref.amax(-1, keepdim=True)) / temperature
    logp = torch.log_softmax(x, dim=-1)  # [N, V]
    logq = torch.log_softmax(y, dim=-1)
    finite_p = logits > -math.inf  # p_v > 0
    finite_q = logits_ref > -math.inf
    if kind == "kl":
        div = kl_terms(logp, logq, finite_p, finite_q).sum(-1)
    else:
        div = js_terms(logp, logq).sum(-1)
    # A row without a distribution (all −inf, or a +inf/NaN entry) has NaN log-probs: keep NaN in the divergence
    # too, instead of whatever the masked terms sum to.
    broken = torch.isnan(logp).any(-1) | torch.isnan(logq).any(-1)
    div = torch.where(broken, torch.full_like(div, math.nan), div)

    keep = ids != ignore_index
    safe_ids = torch.where(keep, ids, torch.zeros_like(ids)).long().unsqueeze(-1)
    lp = logp.gather(-1, safe_ids).squeeze(-1)
    lq = logq.gather(-1, safe_ids).squeeze(-1)
    zero = torch.zeros_like(div)
    return torch.where(keep, div, zero), torch.where(keep, lp, zero), torch.where(keep, lq, zero)
