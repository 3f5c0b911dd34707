"""What the CPU path and the Triton launchers of ``linear_token_contrast`` both need: the float64 redo of the rows a
fast walk cannot finish (:func:`slow_rows`: ``−inf`` logits, a logit far above the running log-sum-exp, NaN/inf
inputs), with the conventions of the float64 reference (``0·log 0 = 0``, genuine ``+inf`` KL, NaN for a row without a
distribution), and the combination of per-part statistics (:func:`combine_stats`: vocabulary shards across ranks, or
the kernel's vocabulary splits). The per-element terms are the reference's own (``srpo_core.reference.token_contrast``,
a leaf module of plain torch math).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from srpo_core.reference.token_contrast import js_terms, kl_terms
from srpo_core.tuning import TUNING


def slow_rows(hidden, hidden_ref, weight, bias, ids_local, inv_tau, rows, kind, lse_pass2):
    """Float64 values for ``rows`` from their materialised logits, in row chunks. Without ``lse_pass2``: the local
    ``(lse, lse', t, tgt, tgt')`` (natural units; ``t`` only for ``kl``); with it (``js`` pass 2, the whole
    vocabulary's ``(lse, lse')`` of these rows in natural units): the rows' local ``Σ js terms``."""
    v = weight.shape[0]
    step = max(1, TUNING.linear_contrast_slow_chunk_elements // max(v, 1))
    outs = []
    for r0 in range(0, rows.numel(), step):
        r = rows[r0:r0 + step]
        xs = []
        for h in (hidden, hidden_ref):
            x = F.linear(h[r], weight, bias)  # in the compute dtype, rounded once, as the reference computes it
            xs.append(x.double() * inv_tau)
        x, y = xs
        if lse_pass2 is not None:
            lx, ly = lse_pass2[0][r0:r0 + step].double(), lse_pass2[1][r0:r0 + step].double()
            outs.append(js_terms(x - lx[:, None], y - ly[:, None]).sum(-1))
            continue
        lse_x, lse_y = torch.logsumexp(x, -1), torch.logsumexp(y, -1)
        # a condition without a distribution (all −inf, a +inf or NaN logit): its values are NaN, the divergence too
        bx = ~torch.isfinite(lse_x) | torch.isnan(x).any(-1)
        by = ~torch.isfinite(lse_y) | torch.isnan(y).any(-1)
        logp, logq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        idl = ids_local[r]
        sel = (idl >= 0) & (idl < v)
        idx = idl.clamp(0, v - 1)[:, None]
        tx = torch.where(sel, x.gather(1, idx)[:, 0], torch.zeros_like(lse_x))
        ty = torch.where(sel, y.gather(1, idx)[:, 0], torch.zeros_like(lse_y))
        if kind == "kl":
            t = kl_terms(logp, logq, x > -math.inf, y > -math.inf).sum(-1)
        else:
            t = torch.zeros_like(lse_x)
        nan = torch.full_like(lse_x, math.nan)
        outs.append(torch.stack([torch.where(bad, nan, z) for z, bad in (
            (lse_x, bx), (lse_y, by), (t, bx | by), (tx, bx), (ty, by))]))
    return torch.cat(outs, -1) if outs else None


def combine_stats(lse_x, lse_y, t, tgt_x, tgt_y, owned, allmax, allsum):
    """The whole vocabulary's ``(lse, lse', kl, tgt, tgt')`` from per-part statistics (natural units; parts are
    vocabulary shards or the Triton kernel's vocabulary splits). ``allmax`` / ``allsum`` reduce a tensor over the
    parts (an all-reduce across ranks; ``amax(0)`` / ``sum(0)`` over stacked splits). With ``w_r = e^(lse_r − M)``,
    ``S = Σ_r w_r`` (primed for the reference):
    ``KL = Σ_r (w_r/S) (t_r + (lse_r − M) − (lse'_r − M')) − log S + log S'``; ``t`` None (``js``) gives ``kl`` None.
    ``tgt`` counts only where ``owned`` (the id falls in that part)."""
    m = allmax(torch.stack([lse_x, lse_y]))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wx, wy = torch.exp(lse_x - m[0]), torch.exp(lse_y - m[1])
    zero = torch.zeros_like(wx)
    parts = [wx, wy, torch.where(owned, tgt_x - m[0], zero), torch.where(owned, tgt_y - m[1], zero)]
    if t is not None:
        parts.append(torch.where(wx > 0, wx * (t + (lse_x - m[0]) - (lse_y - m[1])), zero))
    sums = allsum(torch.stack(parts))
    ls_x, ls_y = torch.log(sums[0]), torch.log(sums[1])
    kl = sums[4] / sums[0] - ls_x + ls_y if t is not None else None
    return m[0] + ls_x, m[1] + ls_y, kl, sums[2] + m[0], sums[3] + m[1]


__all__ = ["combine_stats", "slow_rows"]
