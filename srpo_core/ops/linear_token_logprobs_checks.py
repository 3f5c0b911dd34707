"""Input checks and input preparation of ``linear_token_logprobs``: shapes, devices, dtypes (autocast D67, mixed
precision D69), options, and the NaN check of its output (D150); errors name the op, the argument, what it got and
what was expected."""

from __future__ import annotations

import math

import torch

from srpo_core._validate import describe, require_tensor

OP = "linear_token_logprobs"
LOW_PRECISION = (torch.bfloat16, torch.float16)
AUTOCAST_DEVICES = ("cpu", "cuda")
OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer in on ``device`` now, or None when autocast is off there."""
    if device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, op: str = OP
                  ) -> torch.dtype:
    """The dtype the op runs in: the common dtype, or fp32 for a mix of bf16/fp16 with fp32 (D69); other mixes
    (float64 with anything else, bf16 with fp16) are refused."""
    tensors = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    dtypes = {hidden.dtype} | {x.dtype for _, x in tensors}
    if len(dtypes) == 1:
        return hidden.dtype
    if torch.float32 in dtypes and len(dtypes - {torch.float32}) == 1 and (dtypes - {torch.float32}) <= set(
            LOW_PRECISION):
        return torch.float32
    name, x = next((n, t) for n, t in tensors if t.dtype != hidden.dtype)
    raise TypeError(f"{op}: `{name}` must have the dtype of `hidden` ({hidden.dtype}), or one of them be float32 "
                    f"and the others bf16/fp16 (mixed precision, computed in float32), got {describe(x)}")


def check_tensors(hidden, weight, ids, bias, shift, *, op=OP):
    """Shapes, dtypes kinds and devices; ``op`` names the calling op in the errors (``linear_token_contrast`` shares
    these checks)."""
    OP = op  # noqa: N806  (the messages below name the calling op)
    require_tensor(OP, "hidden", hidden, kind="float")
    require_tensor(OP, "weight", weight, kind="float", ndim=2)
    require_tensor(OP, "ids", ids, kind="int")
    if hidden.dim() < (2 if shift else 1):
        want = "[..., T, H] (a sequence dimension to shift along)" if shift else "[..., H]"
        raise ValueError(f"{OP}: `hidden` must be {want}, got {describe(hidden)}")
    h = hidden.shape[-1]
    if weight.shape[1] != h:
        raise ValueError(f"{OP}: `weight` must be [V, H] with H = {h} (the inner size of `hidden` [..., H]), "
                         f"got {describe(weight)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{OP}: `weight` must have V >= 1 rows (vocabulary entries), got {describe(weight)}")
    if ids.shape != hidden.shape[:-1]:
        lead = list(hidden.shape[:-1])
        raise ValueError(f"{OP}: `ids` must have shape {lead} (the leading dimensions of `hidden` [..., H]; "
                         f"[N] for [N, H]), got {describe(ids)}")
    for name, x in (("weight", weight), ("ids", ids)) + ((("bias", bias),) if bias is not None else ()):
        if x.device != hidden.device:
            raise ValueError(f"{OP}: `{name}` must be on {hidden.device} like `hidden`, got {describe(x)}")
    if bias is not None:
        require_tensor(OP, "bias", bias, kind="float", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{OP}: `bias` must have shape [V] = [{weight.shape[0]}] (one entry per row of "
                             f"`weight`), got {describe(bias)}")


def _positive_finite(name, x, *, allow_none=False, op=OP):
    OP = op  # noqa: N806
    if allow_none and x is None:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{OP}: `{name}` must be a positive finite float{' or None' if allow_none else ''}, "
                        f"got {describe(x)}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{OP}: `{name}` must be a positive finite float, got {x!r}")


def check_options(*, temperature, ignore_index, vocab_start, flags, out_dtype, logit_scale, softcap, op=OP):
    OP = op  # noqa: N806
    _positive_finite("temperature", temperature, op=op)
    _positive_finite("logit_scale", logit_scale, op=op)
    _positive_finite("softcap", softcap, allow_none=True, op=op)
    for name, x in (("ignore_index", ignore_index), ("vocab_start", vocab_start)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{OP}: `{name}` must be an int, got {describe(x)}")
    for name, x in flags.items():
        if not isinstance(x, bool):
            raise TypeError(f"{OP}: `{name}` must be a bool, got {describe(x)}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise TypeError(f"{OP}: `out_dtype` must be None or one of {OUT_DTYPES}, got {describe(out_dtype)}")


def check_id_values(ids, ignore_index, v_global, sharded, *, op=OP):
    """The eager range check (a host sync; skipped with ``check_ids=False``, under torch.compile and on meta)."""
    OP = op  # noqa: N806
    if not ids.numel() or ids.device.type == "meta":
        return
    flat = ids.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= v_global))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        where = "the global vocabulary " if sharded else ""
        at = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), ids.shape)) if ids.dim() != 1 else (i,)
        at_s = ", ".join(str(j) for j in at)
        raise ValueError(f"{OP}: `ids` must lie in {where}[0, V) = [0, {v_global}) or equal ignore_index="
                         f"{ignore_index}, got ids[{at_s}] = {int(flat[i])} ({int(bad.sum())} such id(s))")


def _refuse_nan(logp: torch.Tensor) -> None:
    """A NaN log-prob only comes from logits that are not finite in the compute dtype (``hidden @ weightᵀ``, times
    ``logit_scale``, over ``τ``, beyond float32's range, or NaN/inf inputs): raise instead of returning it (D150)."""
    bad = torch.isnan(logp)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{OP}: the logits of row {i} are not finite in {logp.dtype}: `hidden` @ `weight`ᵀ "
                         f"(× logit_scale) / temperature overflows (|logit| / τ must stay well below 1e38) or "
                         f"`hidden` / `weight` / `bias` hold NaN or inf there ({int(bad.sum())} such row(s)); "
                         f"pass check_ids=False to get the NaN instead")
