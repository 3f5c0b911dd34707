"""Reference for ``linear_token_contrast``: ``token_contrast`` of two conditions' hidden states through one LM head.

    x  = F.linear(hidden, weight, bias)        # [N, V], in the inputs' dtype (as a plain torch model computes it:
    x' = F.linear(hidden_ref, weight, bias)    # one rounding of hidden @ weightᵀ + bias, D48)
    (div, logp, logp_ref) = token_contrast(x, x', ids, kind, τ)   # srpo_core/reference/token_contrast.py

Plain torch, readable as the math, float64-friendly (pass float64 inputs for the ground truth). It materialises both
``[N, V]`` logit sets, which is exactly what the fused versions avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srpo_core.reference.token_contrast import token_contrast


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden, hidden_ref: [N, H]``, ``weight: [V, H]``, ``ids: [N]``, ``bias: [V] | None`` → ``(div, logp,
    logp_ref)``, each ``[N]``, float32 (float64 for float64 inputs)."""
    x = F.linear(hidden, weight, bias)
    y = F.linear(hidden_ref, weight, bias)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return token_contrast(x.to(acc), y.to(acc), ids, kind=kind, temperature=temperature, ignore_index=ignore_index)
