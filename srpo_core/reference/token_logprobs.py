"""Reference for ``token_logprobs``: the log-prob of the sampled token and the entropy of the next-token distribution.

With ``z = logits / τ`` (one row ``[V]`` per position) and ``p = softmax(z)``:

- ``logp = z_id − logsumexp(z)``;
- ``H = logsumexp(z) − Σ_v p_v z_v``  (``= −Σ_v p_v log p_v``).

Conventions (the math, written out so no ``0 · inf`` turns into NaN):

- a logit of ``−inf`` is a token of probability 0: it contributes 0 to ``Σ_v p_v z_v`` (``0 · (−inf) = 0``), and
  its own log-prob is ``−inf``;
- a row whose entries are all ``−inf`` has no distribution: both outputs are NaN, as ``torch.log_softmax`` gives;
- positions with ``ids == ignore_index`` give 0 in both outputs (and, through ``torch.where``, zero gradient).

Plain torch, no chunking, readable rather than fast, differentiable by autograd: call it on float64 inputs to get the
truth the kernels and the torch path are checked against (values and gradients).
"""

from __future__ import annotations

import math

import torch


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``logits: [..., V]``, ``ids: [...]`` → ``logp [...]`` (and ``entropy [...]``) in the logits' dtype.

    No input checks beyond what torch does: this is the math; the public ``srpo_core.token_logprobs`` validates.
    """
    z = logits / temperature  # [..., V]
    lse = torch.logsumexp(z, dim=-1)  # [...]
    keep = ids != ignore_index
    safe_ids = torch.where(keep, ids, torch.zeros_like(ids)).long().unsqueeze(-1)
    logp = z.gather(-1, safe_ids).squeeze(-1) - lse
    zero = torch.zeros_like(logp)
    logp = torch.where(keep, logp, zero)
    if not return_entropy:
        return logp
    p = torch.softmax(z, dim=-1)
    # p_v z_v with p_v = 0 where z_v = −inf: replace z_v by 0 there (not the product, whose gradient would be NaN)
    z_finite = torch.where(z == -math.inf, torch.zeros_like(z), z)
    entropy = lse - (p * z_finite).sum(-1)
    return logp, torch.where(keep, entropy, zero)


__all__ = ["token_logprobs"]
