"""Public API: SRPO's role-aware token advantages, GRPO's sequence advantages, and the log-prob contrasts."""

from __future__ import annotations

import dataclasses
import math

import torch

from srpo_core import _dispatch
from srpo_core._validate import (
    _WARNED,
    brief,
    check_cu_seqlens,
    describe,
    first_true_index,
    largest_at,
    refuse_meta,
    require_same_device,
    require_same_shape,
    require_tensor,
    warn_positive_logprobs,
)
from srpo_core.config import SIGNAL_MAX, Role, SRPOConfig
from srpo_core.cpu.role_weights import role_aware_advantages_fast
from srpo_core.layout import cu_seqlens_from_mask, pack, segment_sum, unpack
from srpo_core.ops.role_weights import role_weights
from srpo_core.reference import contrast as contrast_ref

OP = "role_aware_advantages"


@dataclasses.dataclass
class RoleAwareAdvantages:
    """Outputs of :func:`role_aware_advantages`, per-token tensors in the input's layout (``[B, T]`` or ``[N]``).

    - ``advantages``: ``A_{i,t} = w_t · A_i`` on valid tokens, 0 elsewhere.
    - ``weights``: ``w_t`` (> 0 on valid tokens, 1 on OTHER tokens before renormalisation), 0 outside the mask.
    - ``signals``: the standardised signals ``z_t`` at role tokens, 0 elsewhere.
    - ``baseline``: ``b_i: [B]``, the shared trajectory baseline.
    - ``stats``: floats for logging: per role ``count``, ``clamped`` (signals at a bound of their contrast, e.g. a
      ``−inf`` log-prob driven to ``±clamp``; D87), ``mu``, ``sigma`` (over the whole batch, all ranks; ``mu`` and
      ``sigma`` over the unclamped signals with ``config.role_stats="unclamped"``) and ``w_min``, ``w_mean``,
      ``w_max`` (this rank's tokens); keys like ``"perception/mu"``.
    """

    advantages: torch.Tensor
    weights: torch.Tensor
    signals: torch.Tensor
    baseline: torch.Tensor
    stats: dict[str, float]


def contrast(logp: torch.Tensor, logp_other: torch.Tensor, kind: str = "k3", *, clamp: float = 20.0,
             k3_max: float = 10.0) -> torch.Tensor:
    """Elementwise SPEC step-1 contrast ``D(ℓ, ℓ')`` of two log-prob tensors of the same shape.

    ``kind="logratio"``: ``clamp(ℓ − ℓ', −c, c)``; ``kind="k3"``: ``min(e^δ − δ − 1, k3_max)`` with
    ``δ = clamp(ℓ' − ℓ, −c, c)``. ``−inf`` is allowed; NaN is an error. ``clamp`` and ``k3_max`` must be finite,
    in ``(0, 1e15]``. Returns float32 (float64 if either input is float64), as ``role_aware_advantages`` computes
    it. ``kl`` and ``js`` need the two logit rows:
    use ``token_contrast``.
    """
    op = "contrast"
    require_tensor(op, "logp", logp, kind="float")
    require_tensor(op, "logp_other", logp_other, kind="float")
    require_same_shape(op, "logp", logp, logp_other=logp_other)
    require_same_device(op, "logp", logp, logp_other=logp_other)
    if kind in ("kl", "js"):
        raise ValueError(
            f"{op}: `kind`={brief(kind)} needs the two full logit rows, not log-probs; use srpo_core.token_contrast"
            " (it returns the divergence and both sampled-token log-probs)"
        )
    if kind not in ("logratio", "k3"):
        raise ValueError(f"{op}: `kind` must be 'logratio' or 'k3', got {brief(kind)}")
    for name, value in (("clamp", clamp), ("k3_max", k3_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= SIGNAL_MAX:
            raise ValueError(f"{op}: `{name}` must be a finite number in (0, {SIGNAL_MAX:g}], got {brief(value)}")
    refuse_meta(op, logp=logp, logp_other=logp_other)
    for name, x in (("logp", logp), ("logp_other", logp_other)):
        _reject_bad_values(op, name, x, torch.ones_like(x, dtype=torch.bool), "")
    # float32 for every float input, float64 when either is float64 (D10; D86: a clamp beyond fp16's range, or
    # e^δ of a clamped δ, is then representable).
    dtype = torch.float64 if torch.float64 in (logp.dtype, logp_other.dtype) else torch.float32
    return contrast_ref.contrast(logp.to(dtype), logp_other.to(dtype), kind, clamp, k3_max)


def _reject_bad_values(op: str, name: str, x: torch.Tensor, where: torch.Tensor, what: str) -> None:
    """NaN or +inf where a value is read is an error (a log-prob may be −inf, never NaN or +inf)."""
    bad = where & (torch.isnan(x) | (x == float("inf")))
    if bool(bad.any()):
        kind = "NaN" if bool(torch.isnan(x[bad]).any()) else "+inf"
        raise ValueError(
            f"{op}: `{name}` has {int(bad.sum())} NaN/+inf value(s){what}; first at index {first_true_index(bad)}"
            f" ({kind}); log-probs must be finite or -inf there"
        )


def role_aware_advantages(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    logp_corrupt: torch.Tensor | None,
    logp_ablated: torch.Tensor | None,
    roles: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    config: SRPOConfig = SRPOConfig(),  # noqa: B008 - frozen dataclass, safe as a default
    process_group=None,
    backend: str = "auto",
    perception_signal: torch.Tensor | None = None,
    reasoning_signal: torch.Tensor | None = None,
) -> RoleAwareAdvantages:
    """SRPO's role-aware token advantages (SPEC steps 1-6).

    Args:
        advantages: ``[B]`` sequence-level advantages ``A_i`` (GRPO, Dr.GRPO, RLOO …), finite.
        logp: ``ℓ_t``, log-prob of the sampled token with the original image: ``[B, T]`` with ``mask``, or ``[N]``
            with ``cu_seqlens``.
        logp_corrupt: ``ℓ̃_t`` with the corrupted image, same shape (read at perception tokens).
        logp_ablated: ``ℓ°_t`` with the perception span removed, same shape (read at reasoning tokens).
        roles: integer, same shape: ``Role.OTHER`` 0, ``PERCEPTION`` 1, ``REASONING`` 2 at valid tokens.
        mask: ``bool [B, T]``, the response tokens (padded layout only).
        cu_seqlens: ``int [B+1]`` offsets (packed layout only).
        config: :class:`SRPOConfig`.
        process_group: when given, the role statistics of step 2 are all-reduced over it, so the weights equal
            those of the whole batch in one process.
        backend: ``"auto"`` (Triton for CUDA tensors once its kernel exists, otherwise the fast torch path of
            ``srpo_core/cpu/role_weights.py``, compiled on CPU), ``"triton"``, ``"torch"`` (the reference path).
        perception_signal / reasoning_signal: precomputed ``s_t`` for that role (same shape), e.g. ``kl`` or ``js``
            from ``token_contrast``; they replace the log-prob contrast of that role, and the corresponding
            ``logp_corrupt`` / ``logp_ablated`` may then be ``None``.

    Per-token outputs come in the layout of the input, in float32 (float64 if any input is float64). Every tensor
    output is **detached**: the advantages are constants of the policy-gradient loss (as in every trainer), so no
    gradient flows through them into ``logp`` or the other inputs, even when those require grad.
    """
    if not isinstance(config, SRPOConfig):
        raise TypeError(f"{OP}: `config` must be an SRPOConfig, got {describe(config)}")
    require_tensor(OP, "advantages", advantages, kind="float", ndim=1)
    require_tensor(OP, "logp", logp, kind="float", ndim=(1, 2))
    require_tensor(OP, "roles", roles, kind="int")
    per_token = {
        "logp_corrupt": logp_corrupt,
        "logp_ablated": logp_ablated,
        "perception_signal": perception_signal,
        "reasoning_signal": reasoning_signal,
    }
    for name, x in per_token.items():
        if x is not None:
            require_tensor(OP, name, x, kind="float")
    require_same_shape(OP, "logp", logp, roles=roles, **per_token)
    require_same_device(OP, "logp", logp, advantages=advantages, roles=roles, mask=mask, cu_seqlens=cu_seqlens,
                        **per_token)
    refuse_meta(OP, advantages=advantages, logp=logp, roles=roles, mask=mask, cu_seqlens=cu_seqlens, **per_token)
    # Advantages are constants of the policy-gradient loss (issue 22, D175): no graph through them, whatever inputs
    # require grad, so no output has a grad_fn and a loss on them sends nothing into logp or the signals.
    advantages, logp = advantages.detach(), logp.detach()
    per_token = {name: None if x is None else x.detach() for name, x in per_token.items()}
    logp_corrupt, logp_ablated = per_token["logp_corrupt"], per_token["logp_ablated"]
    perception_signal, reasoning_signal = per_token["perception_signal"], per_token["reasoning_signal"]

    padded = logp.dim() == 2
    if padded:
        if cu_seqlens is not None:
            raise ValueError(f"{OP}: 2-D (padded) inputs take `mask`, not `cu_seqlens`; got cu_seqlens "
                             f"{describe(cu_seqlens)} (pass 1-D packed inputs to use cu_seqlens)")
        if mask is None:
            raise ValueError(f"{OP}: 2-D (padded) inputs need `mask: bool {list(logp.shape)}` marking response tokens")
        require_tensor(OP, "mask", mask, kind="bool")
        require_same_shape(OP, "logp", logp, mask=mask)
        cu = cu_seqlens_from_mask(mask)
    else:
        if mask is not None:
            raise ValueError(f"{OP}: 1-D (packed) inputs take `cu_seqlens`, not `mask`; got mask {describe(mask)}")
        if cu_seqlens is None:
            raise ValueError(f"{OP}: 1-D (packed) inputs need `cu_seqlens: int [B+1]`")
        check_cu_seqlens(OP, cu_seqlens, logp.numel())
        cu = cu_seqlens.to(torch.int64)
    num_traj = cu.numel() - 1
    if advantages.numel() != num_traj:
        raise ValueError(f"{OP}: `advantages` must have one entry per trajectory (B = {num_traj}), "
                         f"got {describe(advantages)}")
    if not bool(torch.isfinite(advantages).all()):
        bad = ~torch.isfinite(advantages)
        raise ValueError(f"{OP}: `advantages` must be finite, got {int(bad.sum())} non-finite value(s), "
                         f"first at index {first_true_index(bad)[0]}")

    checks = _LogprobChecks(logp, logp_corrupt, logp_ablated, roles, mask if padded else None, perception_signal,
                            reasoning_signal)
    compute_dtype = torch.float64 if any(
        x is not None and x.dtype == torch.float64 for x in (advantages, logp, *per_token.values())
    ) else torch.float32
    if backend == "auto" and _dispatch.pick_backend(
            "auto", logp.device, op=OP, has_triton=_role_weights_triton_exists()) == "torch":
        # The fast path (one canonical row grid, compiled on CPU). It returns None for an invalid value, and the
        # reference path below then raises its detailed error (or for a batch it does not take: no tokens).
        fast = role_aware_advantages_fast(
            advantages.to(compute_dtype), logp, logp_corrupt, logp_ablated, roles, perception_signal,
            reasoning_signal, mask=mask if padded else None, cu=cu, config=config, group=process_group,
            dtype=compute_dtype)
        if fast is not None:
            token_adv, weights, z, baseline, rows = fast
            return RoleAwareAdvantages(token_adv, weights, z, baseline, _stats_dict(rows, checks))

    # The reference path (backend="torch"): everything below works on the packed layout.
    def packed(x):
        return None if x is None else (pack(x, mask) if padded else x)

    r = packed(roles)
    if r.numel() and bool(((r < 0) | (r > 2)).any()):
        bad_vals = torch.unique(r[(r < 0) | (r > 2)])[:5].tolist()
        raise ValueError(f"{OP}: `roles` must hold 0 (OTHER), 1 (PERCEPTION) or 2 (REASONING) at valid tokens, "
                         f"got {bad_vals}")
    signals, clamped = _signals(
        config, r, packed(roles), packed(logp), packed(logp_corrupt), packed(logp_ablated),
        packed(perception_signal), packed(reasoning_signal), roles_unpacked=roles, mask=mask if padded else None,
        dtype=compute_dtype,
    )

    which = _dispatch.pick_backend(backend, logp.device, op=OP, has_triton=_role_weights_triton_exists())
    res = role_weights(which, advantages.to(compute_dtype), signals, r, cu, config, process_group, clamped)

    stats = _stats(res, r, cu, checks)
    if padded:
        return RoleAwareAdvantages(unpack(res.advantages, mask), unpack(res.weights, mask), unpack(res.z, mask),
                                   res.baseline, stats)
    return RoleAwareAdvantages(res.advantages, res.weights, res.z, res.baseline, stats)


def _role_weights_triton_exists() -> bool:
    import importlib.util

    return importlib.util.find_spec("srpo_core.kernels.role_weights") is not None


def _signals(config, r, _roles, logp, logp_corrupt, logp_ablated, perception_signal, reasoning_signal, *,
             roles_unpacked, mask, dtype) -> torch.Tensor:
    """Step 1: ``s_t = D_P(ℓ, ℓ̃)`` at perception tokens, ``D_R(ℓ, ℓ°)`` at reasoning tokens, 0 elsewhere [N];
    and ``clamped: bool [N]``, the log-prob contrasts at a bound (D87; precomputed signals never are)."""
    signals = torch.zeros(r.shape, dtype=dtype, device=r.device)
    clamped = torch.zeros(r.shape, dtype=torch.bool, device=r.device)
    for role, kind, other_name, other, given_name, given in (
        (Role.PERCEPTION, config.perception_contrast, "logp_corrupt", logp_corrupt, "perception_signal",
         perception_signal),
        (Role.REASONING, config.reasoning_contrast, "logp_ablated", logp_ablated, "reasoning_signal",
         reasoning_signal),
    ):
        sel = r == role
        if not bool(sel.any()):
            continue
        label = role.name.lower()
        where = f" at valid {label} positions"
        if given is not None:
            _reject_nan(given_name, given, sel, roles_unpacked, mask, role, where, finite=True)
            signals = torch.where(sel, given.to(dtype), signals)
            continue
        if kind in ("kl", "js"):
            raise ValueError(
                f"{OP}: config.{label}_contrast={brief(kind)} needs the full logit rows: compute it with "
                f"srpo_core.token_contrast(...) and pass it as `{given_name}`"
            )
        if other is None:
            raise ValueError(f"{OP}: `{other_name}` is None but the batch has {int(sel.sum())} {label} token(s); "
                             f"pass it, or a precomputed `{given_name}`")
        _reject_nan("logp", logp, sel, roles_unpacked, mask, role, where)
        _reject_nan(other_name, other, sel, roles_unpacked, mask, role, where)
        s = contrast_ref.contrast(logp.to(dtype), other.to(dtype), kind, config.clamp, config.k3_max)
        signals = torch.where(sel, s, signals)
        clamped |= sel & contrast_ref.at_bound(logp.to(dtype), other.to(dtype), kind, config.clamp, config.k3_max)
    return signals, clamped


def _reject_nan(name, x_packed, sel, roles_unpacked, mask, role, where, finite: bool = False) -> None:
    """Log-probs may be −inf (never NaN or +inf); precomputed signals (``finite=True``) must be finite."""
    bad = sel & (~torch.isfinite(x_packed) if finite else (torch.isnan(x_packed) | (x_packed == float("inf"))))
    if not bool(bad.any()):
        return
    # Report the first bad index in the caller's own layout.
    if mask is not None:
        full = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
        full[mask] = bad
        first = first_true_index(full)
    else:
        first = first_true_index(bad)
    what = "non-finite" if finite else "NaN/+inf"
    raise ValueError(f"{OP}: `{name}` has {int(bad.sum())} {what} value(s){where}; first at index {first}")


class _LogprobChecks:
    """The log-prob inputs at the positions where they are read (``logp`` at perception and reasoning tokens,
    ``logp_corrupt`` at perception, ``logp_ablated`` at reasoning, each unless a precomputed signal replaces it), and
    their largest values there as one device tensor, read with the statistics (no extra host sync; D191)."""

    def __init__(self, logp, logp_corrupt, logp_ablated, roles, mask, perception_signal, reasoning_signal):
        self.checked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.largest: torch.Tensor | None = None
        wanted = {
            "logp": (logp, (perception_signal is None, reasoning_signal is None)),
            "logp_corrupt": (logp_corrupt, (perception_signal is None, False)),
            "logp_ablated": (logp_ablated, (False, reasoning_signal is None)),
        }
        wanted = {k: v for k, v in wanted.items() if v[0] is not None and any(v[1]) and (OP, k) not in _WARNED}
        if not wanted:
            return
        sel = {}
        for role, i in ((Role.PERCEPTION, 0), (Role.REASONING, 1)):
            if any(v[1][i] for v in wanted.values()):
                sel[i] = roles == role if mask is None else mask & (roles == role)
        for name, (x, (p, r)) in wanted.items():
            self.checked[name] = (x, sel[0] | sel[1] if p and r else sel[0] if p else sel[1])
        self.largest = torch.stack([largest_at(x, s) for x, s in self.checked.values()])

    def warn(self, largest: list[float]) -> None:
        warn_positive_logprobs(OP, self.checked, dict(zip(self.checked, largest, strict=True)),
                               "at the role positions where it is read")


def _stats(res, r: torch.Tensor, cu: torch.Tensor, checks: _LogprobChecks | None = None) -> dict[str, float]:
    """Logging statistics, gathered to the host in one transfer."""
    rows = []
    for k, role in enumerate((Role.PERCEPTION, Role.REASONING)):
        sel = r == role
        w = res.weights.to(torch.float64)
        cnt = sel.sum()
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=w.device)
        w_min = torch.where(sel, w, inf).amin() if w.numel() else inf
        w_max = torch.where(sel, w, -inf).amax() if w.numel() else -inf
        w_mean = torch.where(sel, w, 0.0).sum() / cnt.clamp(min=1)
        rows.append(torch.stack([res.role_stats[k, 0], res.role_stats[k, 1], res.role_stats[k, 2],
                                 torch.where(cnt > 0, w_min, torch.nan), w_mean.to(torch.float64),
                                 torch.where(cnt > 0, w_max, torch.nan), res.clamped[k]]))
    return _stats_dict(torch.stack(rows), checks)


STAT_KEYS = ("count", "mu", "sigma", "w_min", "w_mean", "w_max", "clamped")


def _stats_dict(rows: torch.Tensor, checks: _LogprobChecks | None = None) -> dict[str, float]:
    """``rows: float64 [2, 7]``, per role ``(count, mu, sigma, w_min, w_mean, w_max, clamped)`` → the logging
    dict; ``checks``' largest log-probs come to the host in the same transfer (and may warn)."""
    if checks is not None and checks.largest is not None:
        flat = torch.cat([rows.reshape(-1), checks.largest.to(rows.device)]).tolist()
        checks.warn(flat[rows.numel():])
        values = [flat[:7], flat[7:14]]
    else:
        values = rows.tolist()
    keys = STAT_KEYS
    stats = {f"{role}/{k}": v
             for role, vals in zip(("perception", "reasoning"), values, strict=True)
             for k, v in zip(keys, vals, strict=True)}
    for role in ("perception", "reasoning"):
        stats[f"{role}/count"] = int(stats[f"{role}/count"])
        stats[f"{role}/clamped"] = int(stats[f"{role}/clamped"])
        if stats[f"{role}/count"] == 0:
            stats.update({f"{role}/{k}": float("nan") for k in ("mu", "sigma", "w_mean")})
    return stats


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, norm: str = "std",
                    eps: float = 1e-6, scale: str = "group", nan_rewards: str = "raise") -> torch.Tensor:
    """GRPO's sequence-level advantages: ``A_i = (R_i − mean_g R) / (std R + eps)``.

    ``rewards: [B]`` float, ``group_ids: [B]`` integer labels (any values; equal label = same prompt).
    ``std`` is the unbiased one (as verl and TRL compute it), over the group (``scale="group"``, the default) or over
    the whole batch (``scale="batch"``, TRL's ``scale_rewards="batch"``; the mean stays the group's). A group of one,
    or whose rewards are all equal, gives ``A_i = 0``. ``norm="none"`` gives ``R_i − mean_g R`` (Dr.GRPO).
    ``nan_rewards="raise"`` (default): a NaN reward is an error; ``"zero"`` (TRL's handling of a completion no reward
    function could score): a NaN reward gets ``A_i = 0`` and is left out of its group's mean and std (and of the
    batch std). ``±inf`` is always an error. Returns float32 (float64 for float64 rewards), detached (advantages are
    constants of the policy-gradient loss).
    """
    op = "grpo_advantages"
    require_tensor(op, "rewards", rewards, kind="float", ndim=1)
    require_tensor(op, "group_ids", group_ids, kind="int", ndim=1)
    require_same_shape(op, "rewards", rewards, group_ids=group_ids)
    require_same_device(op, "rewards", rewards, group_ids=group_ids)
    refuse_meta(op, rewards=rewards, group_ids=group_ids)
    if norm not in ("std", "none"):
        raise ValueError(f"{op}: `norm` must be 'std' or 'none', got {brief(norm)}")
    if scale not in ("group", "batch"):
        raise ValueError(f"{op}: `scale` must be 'group' or 'batch', got {brief(scale)}")
    if nan_rewards not in ("raise", "zero"):
        raise ValueError(f"{op}: `nan_rewards` must be 'raise' or 'zero', got {brief(nan_rewards)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{op}: `eps` must be a finite positive number, got {brief(eps)}")
    bad = torch.isinf(rewards) if nan_rewards == "zero" else ~torch.isfinite(rewards)
    if bool(bad.any()):
        what = "must not be ±inf" if nan_rewards == "zero" else "must be finite (or pass nan_rewards='zero')"
        raise ValueError(f"{op}: `rewards` {what}, got {int(bad.sum())} such value(s), "
                         f"first at index {first_true_index(bad)[0]} ({float(rewards[bad][0])})")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(torch.float64)  # group statistics in float64, result cast back
    scored = ~torch.isnan(r)
    r = torch.where(scored, r, 0.0)
    _, g = torch.unique(group_ids, return_inverse=True)
    num_groups = int(g.max()) + 1 if g.numel() else 0
    size = segment_sum(scored.to(torch.float64), g, num_groups)
    mean = segment_sum(r, g, num_groups) / size.clamp(min=1.0)
    # A group whose rewards are all equal has no spread: its advantages are exactly 0, not (ulp of the mean) / eps.
    hi = r.new_full((num_groups,), -float("inf")).scatter_reduce(0, g, torch.where(scored, r, -math.inf), "amax")
    lo = r.new_full((num_groups,), float("inf")).scatter_reduce(0, g, torch.where(scored, r, math.inf), "amin")
    informative = ((size > 1) & (hi > lo))[g] & scored
    centred = torch.where(scored, r - mean[g], 0.0)
    if norm == "none":
        return torch.where(informative, centred, 0.0).to(dtype)
    if scale == "group":
        std = torch.sqrt(segment_sum(centred * centred, g, num_groups) / (size - 1).clamp(min=1))[g]
    else:  # the unbiased std of every scored reward in the batch, about the batch mean
        n = scored.sum()
        dev = torch.where(scored, r - r.sum() / n.clamp(min=1), 0.0)
        std = torch.sqrt((dev * dev).sum() / (n - 1).clamp(min=1))
    return torch.where(informative, centred / (std + eps), 0.0).to(dtype)
