"""The two closest published methods on srpo-core's ops, so they can be compared with SRPO on equal footing.

- :func:`vppo_advantages`: VPPO (Huang et al., arXiv 2510.09285, code ``huaixuheqing/VPPO-RL``) — a trajectory-level
  advantage scale from the mean visual dependency of each response, and a loss mask keeping the top ``k`` of each
  response's tokens by dependency.
- :func:`papo_perception_kl`: PAPO (Wang et al., arXiv 2507.06448, code ``MikeWangWZHL/PAPO``) — the per-token
  "implicit perception" KL between the policy with the original and with the corrupted image, which PAPO *subtracts*
  from the loss with its coefficient (``kl_prcp_coef``, 0.01 in its GRPO configs), i.e. it is maximised.

Both read the same ``k3`` contrast as SPEC step 1 (``srpo_core.reference.contrast.k3``): ``d = clamp(ℓ̃ − ℓ, ±c)``,
``min(e^d − d − 1, k3_max)``, ``c = 20``, ``k3_max = 10`` as both codebases clamp. Layouts are those of
:func:`srpo_core.role_aware_advantages`: padded ``[B, T]`` with ``mask: bool [B, T]``, or packed ``[N]`` with
``cu_seqlens: int [B+1]``; values outside the mask are never read.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch

from srpo_core import _dispatch
from srpo_core._validate import (
    _WARNED,
    brief,
    check_sequence_advantages,
    check_token_layout,
    describe,
    first_true_index,
    largest_at,
    refuse_meta,
    require_same_device,
    require_same_shape,
    require_tensor,
    warn_positive_logprobs,
)
from srpo_core.layout import pack, segment_ids, segment_sum, unpack
from srpo_core.reference import contrast as contrast_ref

# VPPO leaves the advantage scale at 1 when the batch's dependency range is at most this (absolute, as its code).
VPPO_RANGE_EPS = 1e-6
# ``top_k`` is read as the nearest fraction with a denominator up to this, so that ``ceil(k·n)`` is exact:
# ``ceil(0.7 · 10)`` is 7, not the 8 that the float product 7.000000000000001 would give.
TOP_K_MAX_DENOMINATOR = 10**6


@dataclasses.dataclass
class VPPOAdvantages:
    """Outputs of :func:`vppo_advantages`. Unpacks as ``advantages, loss_mask = vppo_advantages(...)``.

    - ``advantages``: ``α_i · A_i`` on valid tokens, 0 elsewhere (input layout, float32 or float64).
    - ``loss_mask``: bool, the top ``ceil(top_k · n_i)`` valid tokens of each response by dependency.
    - ``alpha``: ``[B]``, the trajectory scale (1 for empty responses and when the batch's range is ≤ 1e-6).
    - ``dependency``: the per-token ``k3`` dependency (input layout, 0 outside the mask).
    - ``stats``: floats for logging (``vppo/alpha_min``, ``vppo/alpha_max``, ``vppo/beta_max``,
      ``vppo/dependency_mean``, ``vppo/mask_fraction``).
    """

    advantages: torch.Tensor
    loss_mask: torch.Tensor
    alpha: torch.Tensor
    dependency: torch.Tensor
    stats: dict[str, float]

    def __iter__(self):
        yield self.advantages
        yield self.loss_mask


def _number(op: str, name: str, value, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{op}: `{name}` must be a finite number, got {describe(value)}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{op}: `{name}` must lie in {bracket}{low}, {high}], got {brief(value)}")
    return float(value)


def _layout(op: str, logp: torch.Tensor, mask, cu_seqlens) -> tuple[bool, torch.Tensor]:
    """``(padded, cu_seqlens int64 [B+1])`` after the same checks as ``role_aware_advantages``."""
    return logp.dim() == 2, check_token_layout(op, logp, mask, cu_seqlens)


def _reject_bad(op: str, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """NaN or +inf at a valid position is an error (a log-prob may be −inf); the index is in the caller's layout."""
    bad = torch.isnan(x) | (x == float("inf"))
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        raise ValueError(f"{op}: `{name}` has {int(bad.sum())} NaN/+inf value(s) at valid positions; first at index "
                         f"{first_true_index(bad)}; log-probs must be finite or -inf there")


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _top_k_counts(lengths: torch.Tensor, top_k: float) -> torch.Tensor:
    """``ceil(top_k · n_i)`` in exact integer arithmetic, ``top_k`` read as a fraction ``p/q``, ``q ≤ 10^6``."""
    frac = Fraction(top_k).limit_denominator(TOP_K_MAX_DENOMINATOR)
    p, q = frac.numerator, frac.denominator
    return (lengths * p + (q - 1)) // q


def top_k_mask(scores: torch.Tensor, cu_seqlens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Packed ``bool [N]``: the ``counts[i]`` largest ``scores`` of each segment, ties broken by position (earlier
    first). One pass, no loop over segments: a stable descending sort by score, then a stable sort by segment, gives
    the order ``(segment, −score, position)``; a token is kept when its rank inside its segment is below the count.
    ``scores`` must hold no NaN.
    """
    n = scores.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    seg = segment_ids(cu_seqlens, n)
    # + 0.0 turns −0.0 into +0.0, so that the two zeros tie (a sort may order them by sign bit).
    by_score = torch.sort(scores + 0.0, descending=True, stable=True).indices
    order = by_score[torch.sort(seg[by_score], stable=True).indices]
    rank = torch.arange(n, device=scores.device) - cu_seqlens[:-1][seg[order]]
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep[order] = rank < counts[seg[order]]
    return keep


def vppo_advantages(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    logp_corrupt: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    beta_min: float = 0.9,
    top_k: float = 0.4,
    clamp: float = 20.0,
    k3_max: float = 10.0,
    backend: str = "auto",
) -> VPPOAdvantages:
    """VPPO's advantage shaping and token filtering, from the clean and corrupted-image log-probs of the sampled tokens.

    1. Token dependency ``δ_t = min(e^d − d − 1, k3_max)``, ``d = clamp(ℓ̃_t − ℓ_t, ±clamp)``.
    2. Trajectory dependency ``S̄_i`` = mean of ``δ`` over response ``i``'s tokens.
    3. Min-max normalisation over the batch's non-empty responses: ``ŝ_i = (S̄_i − min) / (max − min)``; dynamic
       ``β_max = β_min + (1 − β_min) / mean(ŝ)``; ``α_i = β_min + (β_max − β_min) · ŝ_i``, so ``mean(α) = 1``.
       ``α ≡ 1`` when the batch has fewer than two non-empty responses or ``max − min ≤ 1e-6``.
    4. Token advantages ``α_i · A_i``; loss mask: the top ``ceil(top_k · n_i)`` tokens of each response by ``δ``,
       ties broken by position (earlier first). VPPO's own code sorts unstably, which leaves ties undefined.

    Args:
        advantages: ``[B]`` sequence-level advantages ``A_i``, finite.
        logp: ``ℓ_t``, ``[B, T]`` with ``mask`` or ``[N]`` with ``cu_seqlens``; ``logp_corrupt``: ``ℓ̃_t``, same shape.
        beta_min: VPPO's ``β_min`` in ``[0, 1]``; top_k: kept fraction in ``(0, 1]`` (read as a fraction with
            denominator ≤ 10^6, so ``ceil`` is exact).
        clamp, k3_max: the contrast's clamps (VPPO: 20 and 10).
        backend: ``"auto"`` | ``"torch"`` | ``"reference"``: one plain-torch path (the op is a handful of segment
            reductions; it is its own reference, and there is no Triton kernel: ``"triton"`` raises).

    The scale is computed over the batch given (VPPO uses the mini-batch on one device); pass the whole batch.
    Returns :class:`VPPOAdvantages`, which unpacks as ``(advantages, loss_mask)``; every tensor in it is detached
    (advantages are constants of the policy-gradient loss; nothing flows back into ``logp`` or ``logp_corrupt``).
    """
    op = "vppo_advantages"
    _vppo_check_tensors(op, advantages, logp, logp_corrupt, mask, cu_seqlens)
    advantages, logp, logp_corrupt = advantages.detach(), logp.detach(), logp_corrupt.detach()  # constants (D175)
    beta_min = _number(op, "beta_min", beta_min, low=0.0, high=1.0)
    top_k = _number(op, "top_k", top_k, low=0.0, high=1.0, low_open=True)
    clamp = _number(op, "clamp", clamp, low=0.0, high=math.inf, low_open=True)
    k3_max = _number(op, "k3_max", k3_max, low=0.0, high=math.inf, low_open=True)
    padded, cu = _vppo_layout(op, advantages, logp, logp_corrupt, mask, cu_seqlens, backend)
    num_traj = cu.numel() - 1

    dtype = _compute_dtype(advantages, logp, logp_corrupt)
    l, lc = (pack(x, mask) if padded else x for x in (logp, logp_corrupt))
    n = l.numel()
    dep = contrast_ref.k3(l.to(dtype), lc.to(dtype), clamp, k3_max)  # [N]
    seg = segment_ids(cu, n)
    lengths = cu[1:] - cu[:-1]  # [B]
    alpha, beta_max = _vppo_alpha(dep, seg, lengths, num_traj, beta_min, dtype)

    token_adv = (alpha * advantages.to(dtype))[seg]
    keep = top_k_mask(dep, cu, _top_k_counts(lengths, top_k))
    stats = _vppo_stats(op, logp, logp_corrupt, mask, alpha, beta_max, dep, keep, n, num_traj, dtype)
    if padded:
        return VPPOAdvantages(unpack(token_adv, mask), unpack(keep, mask, fill=False), alpha, unpack(dep, mask),
                              stats)
    return VPPOAdvantages(token_adv, keep, alpha, dep, stats)


def _vppo_check_tensors(op: str, advantages, logp, logp_corrupt, mask, cu_seqlens) -> None:
    """Check the kinds, shapes and devices of :func:`vppo_advantages`' tensors."""
    require_tensor(op, "advantages", advantages, kind="float", ndim=1)
    require_tensor(op, "logp", logp, kind="float", ndim=(1, 2))
    require_tensor(op, "logp_corrupt", logp_corrupt, kind="float")
    require_same_shape(op, "logp", logp, logp_corrupt=logp_corrupt)
    require_same_device(op, "logp", logp, advantages=advantages, logp_corrupt=logp_corrupt, mask=mask,
                        cu_seqlens=cu_seqlens)
    refuse_meta(op, advantages=advantages, logp=logp, logp_corrupt=logp_corrupt, mask=mask, cu_seqlens=cu_seqlens)


def _vppo_layout(op: str, advantages, logp, logp_corrupt, mask, cu_seqlens, backend) -> tuple[bool, torch.Tensor]:
    """Check the layout, the values and the backend of :func:`vppo_advantages` → ``(padded, cu_seqlens)``."""
    padded, cu = _layout(op, logp, mask, cu_seqlens)
    check_sequence_advantages(op, advantages, cu.numel() - 1)
    _reject_bad(op, "logp", logp, mask)
    _reject_bad(op, "logp_corrupt", logp_corrupt, mask)
    _dispatch.pick_backend(backend, logp.device, op=op, has_triton=False)  # raises for "triton" and unknown names
    return padded, cu


def _vppo_alpha(dep, seg, lengths, num_traj: int, beta_min: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The trajectory scale ``α [B]`` and ``β_max`` (0-d) from the token dependencies ``δ [N]``."""
    # Trajectory dependency and its min-max normalisation over the non-empty responses (no host sync).
    valid = lengths > 0
    s_bar = segment_sum(dep, seg, num_traj) / lengths.clamp(min=1).to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype, device=dep.device)
    s_min = torch.where(valid, s_bar, inf).amin() if num_traj else inf
    s_max = torch.where(valid, s_bar, -inf).amax() if num_traj else -inf
    spread = s_max - s_min
    shaped = (valid.sum() > 1) & (spread > VPPO_RANGE_EPS)
    norm = torch.where(valid & shaped, ((s_bar - s_min) / torch.where(shaped, spread, 1.0)).clamp(0.0, 1.0), 0.0)
    mu = norm.sum() / valid.sum().clamp(min=1)
    # mean(ŝ) ≥ 1/B > 0 whenever the range is non-zero (the arg-max has ŝ = 1), so no epsilon is needed.
    beta_max = torch.where(shaped, beta_min + (1.0 - beta_min) / torch.where(shaped, mu, 1.0), 1.0)
    alpha = torch.where(valid & shaped, beta_min + (beta_max - beta_min) * norm, 1.0)
    return alpha, beta_max


def _vppo_stats(op: str, logp, logp_corrupt, mask, alpha, beta_max, dep, keep, n: int, num_traj: int,
                dtype) -> dict:
    """The logged floats, in one host transfer with the positive-log-prob warning's largest values."""
    inf = torch.tensor(math.inf, dtype=dtype, device=dep.device)
    total = max(n, 1)
    # Log-probs above 0 (D191): their largest values come to the host with the statistics (no extra sync).
    checked = {name: (x, mask) for name, x in (("logp", logp), ("logp_corrupt", logp_corrupt))
               if (op, name) not in _WARNED}
    largest = [largest_at(x, sel).to(dtype) for x, sel in checked.values()]
    stats_t = torch.stack([
        alpha.amin() if num_traj else inf, alpha.amax() if num_traj else -inf, beta_max.to(dtype),
        dep.sum() / total, keep.sum().to(dtype) / total, *largest,
    ]).tolist()
    if checked:
        warn_positive_logprobs(op, checked, dict(zip(checked, stats_t[5:], strict=True)),
                               "at the response positions")
        stats_t = stats_t[:5]
    return dict(zip(("vppo/alpha_min", "vppo/alpha_max", "vppo/beta_max", "vppo/dependency_mean",
                     "vppo/mask_fraction"), stats_t, strict=True))


def papo_perception_kl(
    logp: torch.Tensor,
    logp_corrupt: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    clamp: float = 20.0,
    k3_max: float = 10.0,
) -> torch.Tensor:
    """PAPO's per-token implicit perception KL, ``min(e^d − d − 1, k3_max)`` with ``d = clamp(ℓ̃ − ℓ, ±clamp)``.

    ``logp`` is the *current* policy's log-prob of the sampled token with the original image (with gradient);
    ``logp_corrupt`` the one with the corrupted image (PAPO computes it once per batch without gradient by default;
    if it carries a gradient, that flows too). Differentiable in both; the clamps cut the gradient where they bind,
    as in PAPO (``torch.clamp``). Returns a per-token tensor in the input's layout, float32 (float64 for float64
    input), 0 outside ``mask``. PAPO's objective is ``loss = policy_loss − kl_prcp_coef · agg(kl)`` with the same
    token aggregation as the policy loss (e.g. ``(kl * mask).sum() / mask.sum()`` for token-mean).
    """
    op = "papo_perception_kl"
    require_tensor(op, "logp", logp, kind="float", ndim=(1, 2))
    require_tensor(op, "logp_corrupt", logp_corrupt, kind="float")
    require_same_shape(op, "logp", logp, logp_corrupt=logp_corrupt)
    require_same_device(op, "logp", logp, logp_corrupt=logp_corrupt, mask=mask, cu_seqlens=cu_seqlens)
    refuse_meta(op, logp=logp, logp_corrupt=logp_corrupt, mask=mask, cu_seqlens=cu_seqlens)
    clamp = _number(op, "clamp", clamp, low=0.0, high=math.inf, low_open=True)
    k3_max = _number(op, "k3_max", k3_max, low=0.0, high=math.inf, low_open=True)
    padded, _ = _layout(op, logp, mask, cu_seqlens)
    _reject_bad(op, "logp", logp.detach(), mask)
    _reject_bad(op, "logp_corrupt", logp_corrupt.detach(), mask)
    dtype = _compute_dtype(logp, logp_corrupt)
    l, lc = logp.to(dtype), logp_corrupt.to(dtype)
    if padded:
        # Replace what lies outside the mask before any arithmetic: garbage there (NaN) must not reach the gradient.
        l = torch.where(mask, l, 0.0)
        lc = torch.where(mask, lc, 0.0)
    kl = contrast_ref.k3(l, lc, clamp, k3_max)
    return torch.where(mask, kl, 0.0) if padded else kl
