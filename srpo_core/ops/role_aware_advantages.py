"""Public ``role_aware_advantages``: SRPO's role-aware token advantages (SPEC steps 1-6), one entry.

The entry checks every argument once (:func:`_check_call`), chooses the path once (:func:`_route`) and runs exactly
one of: ``"torch"``, the CPU path (``srpo_core/cpu/role_aware_advantages.py``, on the caller's layout, with the value
checks fused into its first pass); ``"triton"``, the kernel path (``kernels/role_aware_advantages.py``, on
the packed tokens, fp32); ``"reference"``, the plain reference (``srpo_core/reference/role_aware_advantages.py``, on
the packed tokens). ``"auto"``: Triton for CUDA tensors unless an input is float64, the CPU path otherwise.

The value checks (roles, NaN/+inf log-probs, non-finite precomputed signals, missing inputs) are one function,
``_validate.check_role_values``: run before the packed paths, and after the CPU path's pass 1 when that found a bad
value, so every path raises the same error.

No ``torch.library`` op: the op reads values on the host (checks, statistics, the grid's shape), all-reduces over a
process group and returns a dict of floats, none of which a traced graph can hold.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from srpo_core import _dispatch
from srpo_core._validate import (
    check_role_values,
    check_sequence_advantages,
    check_token_layout,
    describe,
    refuse_meta,
    require_same_device,
    require_same_shape,
    require_tensor,
)
from srpo_core.config import SRPOConfig
from srpo_core.cpu import role_aware_advantages as cpu
from srpo_core.layout import pack, unpack
from srpo_core.ops.role_aware_advantages_stats import LogprobChecks, packed_rows, stats_dict
from srpo_core.reference import role_aware_advantages as reference

OP = "role_aware_advantages"
PER_TOKEN = ("logp_corrupt", "logp_ablated", "perception_signal", "reasoning_signal")


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


class _Call(NamedTuple):
    """A checked call: inputs detached, ``mask`` only for the padded layout, ``cu`` int64 ``[B+1]`` either way."""

    advantages: torch.Tensor
    logp: torch.Tensor
    per_token: dict[str, torch.Tensor | None]
    roles: torch.Tensor
    mask: torch.Tensor | None
    cu: torch.Tensor
    dtype: torch.dtype  # float32, float64 when any float input is float64

    def inputs(self) -> tuple:
        """``(logp, logp_corrupt, logp_ablated, roles, perception_signal, reasoning_signal)``."""
        p = self.per_token
        return (self.logp, p["logp_corrupt"], p["logp_ablated"], self.roles, p["perception_signal"],
                p["reasoning_signal"])


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
        backend: ``"auto"`` (the Triton kernel for CUDA tensors, unless an input is float64; otherwise the CPU
            path), ``"triton"`` (fp32 / bf16 / fp16 inputs), ``"torch"`` (the CPU path: chunked torch on a row grid,
            compiled for large CPU batches), ``"reference"`` (the plain reference).
        perception_signal / reasoning_signal: precomputed ``s_t`` for that role (same shape), e.g. ``kl`` or ``js``
            from ``token_contrast``; they replace the log-prob contrast of that role, and the corresponding
            ``logp_corrupt`` / ``logp_ablated`` may then be ``None``.

    Per-token outputs come in the layout of the input, in float32 (float64 if any input is float64). Every tensor
    output is **detached**: the advantages are constants of the policy-gradient loss (as in every trainer), so no
    gradient flows through them into ``logp`` or the other inputs, even when those require grad.
    """
    per_token = {"logp_corrupt": logp_corrupt, "logp_ablated": logp_ablated, "perception_signal": perception_signal,
                 "reasoning_signal": reasoning_signal}
    call = _check_call(advantages, logp, roles, per_token, mask, cu_seqlens, config)
    which = _route(backend, call, config)
    p = call.per_token
    checks = LogprobChecks(call.logp, p["logp_corrupt"], p["logp_ablated"], call.roles, call.mask,
                           p["perception_signal"], p["reasoning_signal"])
    if which == "torch":
        return _run_cpu(call, config, process_group, checks)
    return _run_packed(which, call, config, process_group, checks)


# ----------------------------------------------------------------------------------------------- argument checks
def _check_call(advantages, logp, roles, per_token, mask, cu_seqlens, config) -> _Call:
    """Every check that needs no pass over the per-token values; returns the call with its inputs detached."""
    if not isinstance(config, SRPOConfig):
        raise TypeError(f"{OP}: `config` must be an SRPOConfig, got {describe(config)}")
    require_tensor(OP, "advantages", advantages, kind="float", ndim=1)
    require_tensor(OP, "logp", logp, kind="float", ndim=(1, 2))
    require_tensor(OP, "roles", roles, kind="int")
    for name, x in per_token.items():
        if x is not None:
            require_tensor(OP, name, x, kind="float")
    require_same_shape(OP, "logp", logp, roles=roles, **per_token)
    require_same_device(OP, "logp", logp, advantages=advantages, roles=roles, mask=mask, cu_seqlens=cu_seqlens,
                        **per_token)
    refuse_meta(OP, advantages=advantages, logp=logp, roles=roles, mask=mask, cu_seqlens=cu_seqlens, **per_token)
    cu = check_token_layout(OP, logp, mask, cu_seqlens)
    check_sequence_advantages(OP, advantages, cu.numel() - 1)
    # Advantages are constants of the policy-gradient loss (issue 22, D175): no graph through them, whatever inputs
    # require grad, so no output has a grad_fn and a loss on them sends nothing into logp or the signals.
    per_token = {name: None if x is None else x.detach() for name, x in per_token.items()}
    floats = (advantages, logp, *per_token.values())
    dtype = torch.float64 if any(x is not None and x.dtype == torch.float64 for x in floats) else torch.float32
    return _Call(advantages.detach(), logp.detach(), per_token, roles, mask if logp.dim() == 2 else None, cu, dtype)


def _check_values(call: _Call, config: SRPOConfig) -> None:
    p = call.per_token
    check_role_values(OP, call.roles, call.mask, (config.perception_contrast, config.reasoning_contrast), call.logp,
                      p["logp_corrupt"], p["logp_ablated"], p["perception_signal"], p["reasoning_signal"])


# ------------------------------------------------------------------------------------------------------- routing
def _route(backend: str, call: _Call, config: SRPOConfig) -> str:
    """The one place a call's path is chosen: ``pick_backend`` (float64 inputs make ``"triton"`` raise and send
    ``"auto"`` to the CPU path), then the calls a fast path does not take go to the reference: the Triton path with
    ``role_stats="unclamped"`` (launch 1 has no per-token exclusion), the CPU path with no trajectory, no token or
    very uneven lengths (:func:`cpu.fits_grid`)."""
    dtypes = {"advantages": call.advantages.dtype, "logp": call.logp.dtype}
    dtypes.update({name: x.dtype for name, x in call.per_token.items() if x is not None})
    which = _dispatch.pick_backend(backend, call.logp.device, op=OP, dtypes=dtypes)
    if which == "triton" and config.role_stats == "unclamped":
        return "reference"
    if which == "torch":
        lengths = call.cu[1:] - call.cu[:-1]
        max_len = int(lengths.max()) if lengths.numel() else 0
        if not cpu.fits_grid(lengths.numel(), int(call.cu[-1]), max_len):
            return "reference"
    return which


# --------------------------------------------------------------------------------------------------------- paths
def _run_cpu(call: _Call, config: SRPOConfig, group, checks: LogprobChecks) -> RoleAwareAdvantages:
    lengths = call.cu[1:] - call.cu[:-1]
    try:
        token_adv, weights, z, baseline, rows = cpu.role_aware_advantages_cpu(
            call.advantages.to(call.dtype), *call.inputs(), mask=call.mask, cu=call.cu, max_len=int(lengths.max()),
            config=config, group=group, dtype=call.dtype)
    except cpu.InvalidValues as err:
        _check_values(call, config)  # raises the error the other paths raise for this batch
        raise RuntimeError(f"{OP}: the CPU path found an invalid value the checks did not; please report") from err
    return RoleAwareAdvantages(token_adv, weights, z, baseline, stats_dict(rows, checks))


def _run_packed(which: str, call: _Call, config: SRPOConfig, group, checks: LogprobChecks) -> RoleAwareAdvantages:
    """The reference or the Triton path, on the packed tokens; results unpacked to the caller's layout."""
    _check_values(call, config)
    mask = call.mask
    logp, logp_corrupt, logp_ablated, roles, p_signal, r_signal = (
        x if x is None or mask is None else pack(x, mask) for x in call.inputs())
    if which == "triton":
        from srpo_core.kernels.role_aware_advantages import role_aware_advantages_triton

        res = role_aware_advantages_triton(call.advantages.to(call.dtype), logp, logp_corrupt, logp_ablated, roles,
                                           p_signal, r_signal, call.cu, config, group)
    else:
        res = reference.role_aware_advantages(call.advantages.to(call.dtype), logp, logp_corrupt, logp_ablated,
                                              roles, p_signal, r_signal, call.cu, config, group, dtype=call.dtype)
    stats = stats_dict(packed_rows(res, roles), checks)
    if mask is not None:
        return RoleAwareAdvantages(unpack(res.advantages, mask), unpack(res.weights, mask), unpack(res.z, mask),
                                   res.baseline, stats)
    return RoleAwareAdvantages(res.advantages, res.weights, res.z, res.baseline, stats)
