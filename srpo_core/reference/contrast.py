"""SPEC step 1: per-token contrasts of two log-probs of the sampled token, ``D(ℓ, ℓ')``.

``logratio``: ``clamp(ℓ − ℓ', −c, c)``. ``k3``: ``δ = clamp(ℓ' − ℓ, −c, c)``, ``min(e^δ − δ − 1, k3_max)``.
Both accept ``−inf`` (a token the condition makes impossible): the clamp bounds the difference, and two equal
log-probs, ``−inf`` included, contrast to 0 (``−inf − (−inf)`` would otherwise be NaN).
"""

from __future__ import annotations

import torch

from srpo_core._validate import brief


def clamped_difference(a: torch.Tensor, b: torch.Tensor, clamp: float) -> torch.Tensor:
    """``clamp(a − b, −c, c)``, with ``a == b`` (both ``−inf`` included) giving exactly 0."""
    d = torch.where(a == b, torch.zeros_like(a), a - b)
    return d.clamp(-clamp, clamp)


def logratio(logp: torch.Tensor, logp_other: torch.Tensor, clamp: float = 20.0) -> torch.Tensor:
    return clamped_difference(logp, logp_other, clamp)


def k3(logp: torch.Tensor, logp_other: torch.Tensor, clamp: float = 20.0, k3_max: float = 10.0) -> torch.Tensor:
    delta = clamped_difference(logp_other, logp, clamp)
    # e^δ − δ − 1, written with expm1 so that small δ keeps its digits; ≥ 0 by convexity.
    return (torch.expm1(delta) - delta).clamp(0.0, k3_max)


def contrast(logp: torch.Tensor, logp_other: torch.Tensor, kind: str, clamp: float = 20.0,
             k3_max: float = 10.0) -> torch.Tensor:
    if kind == "logratio":
        return logratio(logp, logp_other, clamp)
    if kind == "k3":
        return k3(logp, logp_other, clamp, k3_max)
    raise ValueError(f"contrast kind {brief(kind)} is not a log-prob contrast (kl and js need the logit rows)")


def at_bound(logp: torch.Tensor, logp_other: torch.Tensor, kind: str, clamp: float = 20.0,
             k3_max: float = 10.0) -> torch.Tensor:
    """``bool``, same shape: the contrast sits at a bound (decision D87): ``|ℓ − ℓ'| ≥ c`` (so a ``−inf`` against a
    finite log-prob), and for ``k3`` also ``e^δ − δ − 1 ≥ k3_max``. Such a signal says "at least this much", not how
    much."""
    if kind == "logratio":
        return logratio(logp, logp_other, clamp).abs() >= clamp
    delta = clamped_difference(logp_other, logp, clamp)
    return (delta.abs() >= clamp) | ((torch.expm1(delta) - delta) >= k3_max)
