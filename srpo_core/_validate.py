"""Input checks with messages that name the argument, what it got and what was expected."""

from __future__ import annotations

import math
import reprlib

import torch

# Every input an error message shows goes through `describe` or `brief`: type, shape, dtype and a few values, never
# the whole value (a Python list of 64×512 log-probs once made a 700,000-character TypeError). D190.
MAX_SHOWN = 120
_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = _REPR.maxarray = 4
_REPR.maxdict = 4
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40


def brief(x) -> str:
    """``repr(x)`` when it is short (``1.5``, ``'blur'``), otherwise :func:`describe`'s bounded summary."""
    if isinstance(x, (bool, int, float, complex, type(None))) or (isinstance(x, str) and len(x) <= MAX_SHOWN):
        text = repr(x)
        if len(text) <= MAX_SHOWN:
            return text
    return describe(x)


def describe(x) -> str:
    """A bounded description of any input: type, shape, dtype and a few values (at most ~2·MAX_SHOWN chars)."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    kind = type(x).__name__
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:  # numpy, jax, … arrays: their own repr may be long
        kind = f"{type(x).__module__.split('.')[0]}.{kind}"
        return f"a {kind} of shape {tuple(shape)} and dtype {dtype}: {_few(x)}"
    if isinstance(x, (list, tuple)):
        dims, first = [], x
        while isinstance(first, (list, tuple)) and len(dims) < 8:
            dims.append(len(first))
            if not first:
                break
            first = first[0]
        inner = "" if isinstance(first, (list, tuple)) else f" of {type(first).__name__}"
        nested = "nested " if len(dims) > 1 else ""
        size = "×".join(str(d) for d in dims)
        return f"a {nested}{kind} ({size}{inner}): {_few(x)}"
    return f"{kind} {_few(x)}"


def _few(x) -> str:
    try:
        text = _REPR.repr(x)
    except Exception as e:  # a broken __repr__ must not hide the real error
        text = f"<repr failed: {type(e).__name__}>"
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def require_tensor(op: str, name: str, x, *, kind: str | None = None, ndim: int | tuple[int, ...] | None = None):
    """Check that ``x`` is a tensor of the given kind ("float", "int", "bool", "int_or_bool") and rank."""
    if not isinstance(x, torch.Tensor):
        convertible = isinstance(x, (list, tuple)) or hasattr(x, "__array__")
        hint = "; convert it with torch.as_tensor(...)" if convertible else ""
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {describe(x)}{hint}")
    if kind == "float" and not x.is_floating_point():
        raise TypeError(f"{op}: `{name}` must be a floating-point tensor, got {describe(x)}")
    if kind == "int" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{op}: `{name}` must be an integer tensor, got {describe(x)}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{op}: `{name}` must be a bool tensor, got {describe(x)}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{op}: `{name}` must be {want}, got {describe(x)}")
    return x


def require_same_shape(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(
                f"{op}: `{name}` must have the shape of `{ref_name}` {tuple(ref.shape)}, got {describe(x)}"
            )


def require_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{op}: `{name}` must be on {ref.device} like `{ref_name}`, got {describe(x)}")


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, n: int, name: str = "cu_seqlens") -> None:
    """``cu_seqlens: [B+1]`` integer, ``0 = cu[0] <= cu[1] <= ... <= cu[B] = N``."""
    require_tensor(op, name, cu_seqlens, kind="int", ndim=1)
    if cu_seqlens.numel() == 0:
        raise ValueError(f"{op}: `{name}` must have B+1 >= 1 entries, got an empty tensor")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"{op}: `{name}` must start at 0, got {name}[0] = {first}")
    drops = cu_seqlens[1:] < cu_seqlens[:-1]
    if bool(drops.any()):
        i = int(torch.nonzero(drops)[0, 0]) + 1
        raise ValueError(
            f"{op}: `{name}` must be non-decreasing, got {name}[{i}] = {int(cu_seqlens[i])}"
            f" < {name}[{i - 1}] = {int(cu_seqlens[i - 1])}"
        )
    if last != n:
        raise ValueError(f"{op}: `{name}` must end at N = {n} (the packed length), got {name}[-1] = {last}")


def first_true_index(flags: torch.Tensor) -> tuple[int, ...]:
    """Coordinates of the first True element of ``flags`` (row-major)."""
    flat = int(torch.nonzero(flags.reshape(-1))[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), flags.shape))


def refuse_meta(op: str, **tensors) -> None:
    """Ops that read values (checks, data-dependent shapes, host-side statistics) refuse meta tensors (D88)."""
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor) and x.is_meta:
            raise ValueError(f"{op}: `{name}` is a meta tensor ({describe(x)}); {op} reads values (its checks and "
                             "results depend on them), so it needs real tensors")


class ImplausibleInputWarning(UserWarning):
    """An input that passes the checks but cannot be what its name says (a log-prob above 0). D191."""


_WARNED: set[tuple[str, str]] = set()  # (op, argument) pairs already warned about: each warns once per process


def logprob_tolerance(dtype: torch.dtype) -> float:
    """How far above 0 a log-prob may round: 64 units in the last place at 1.0 of its dtype, at least 1e-4 (fp32/64:
    1e-4; fp16: 0.06; bf16: 0.5: a log_softmax computed in bf16 with logits near 64 rounds by that much)."""
    return max(1e-4, 64 * torch.finfo(dtype).eps)


def largest_at(x: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """0-d float64 on ``x``'s device: the largest value of ``x`` where ``sel`` (``sel=None``: everywhere), −inf if
    none. Device work only (no host sync): the caller reads it with the values it already brings to the host
    (D191)."""
    vals = x.detach()
    if sel is not None:
        vals = torch.where(sel, vals, -torch.inf)
    if vals.numel() == 0:
        return torch.tensor(-torch.inf, dtype=torch.float64, device=x.device)
    return vals.amax().to(torch.float64)


def warn_positive_logprobs(op: str, checked: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                           largest: dict[str, float], where: str) -> None:
    """Warn once per ``(op, argument)`` when a log-prob input exceeds 0 (beyond rounding) where it is read.

    ``checked``: name → (tensor, positions read or None); ``largest``: name → the host value of :func:`largest_at`.
    Counting the positions costs one more host read, done only when there is something to warn about."""
    import warnings

    for name, value in largest.items():
        x, sel = checked[name]
        tol = logprob_tolerance(x.dtype)
        if not value > tol or (op, name) in _WARNED:
            continue
        _WARNED.add((op, name))
        over = x.detach() > tol
        count = int((over & sel).sum() if sel is not None else over.sum())
        warnings.warn(
            f"{op}: `{name}` has {count} value(s) above 0 {where} (largest {value:+.4g}); a log-probability is <= 0 "
            f"(tolerance {tol:.2g} for {x.dtype}), so these are not log-probs of the sampled tokens (logits? "
            f"rewards? a sign flip?). Computing anyway; shown once per argument.",
            ImplausibleInputWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside srpo_core (the user's call)."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


# ------------------------------------------------------------------------------------- checks of the log-prob ops
# token_logprobs, token_contrast, linear_token_logprobs and linear_token_contrast share these: one number check, one
# id-range check, one LM-head check, one NaN-result check. Every message names the op and the argument.
LOW_PRECISION = (torch.bfloat16, torch.float16)
AUTOCAST_DEVICES = ("cpu", "cuda")
OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_number(op: str, name: str, x, want: str, *, allow_none: bool = False, minimum: int | None = None) -> None:
    """``want``: ``"positive"`` (a finite int or float > 0), ``"int"`` (an int, ``>= minimum`` when given) or
    ``"bool"``; ``bool`` counts as neither a number nor an int. TypeError for the wrong type, ValueError for a value
    out of range."""
    if allow_none and x is None:
        return
    if want == "bool":
        if not isinstance(x, bool):
            raise TypeError(f"{op}: `{name}` must be a bool, got {describe(x)}")
        return
    if want == "int":
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{op}: `{name}` must be an int, got {describe(x)}")
        if minimum is not None and x < minimum:
            raise ValueError(f"{op}: `{name}` must be an int >= {minimum}, got {x!r}")
        return
    if want != "positive":
        raise ValueError(f"check_number: `want` must be 'positive', 'int' or 'bool', got {brief(want)}")
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: `{name}` must be a positive finite float{' or None' if allow_none else ''}, "
                        f"got {describe(x)}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{op}: `{name}` must be a positive finite float, got {x!r}")


def check_flags(op: str, **flags) -> None:
    """Each keyword is a bool option of ``op``."""
    for name, x in flags.items():
        check_number(op, name, x, "bool")


def check_out_dtype(op: str, out_dtype) -> None:
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise TypeError(f"{op}: `out_dtype` must be None or one of {OUT_DTYPES}, got {describe(out_dtype)}")


def check_id_range(op: str, ids: torch.Tensor, V: int, ignore_index: int, *, span: str = "[0, V)") -> None:
    """Every id is ``ignore_index`` or in ``[0, V)``; ``span`` names the range in the message (``"[0, V_global)"``).
    One device-to-host sync; the ops skip it with ``check_ids=False``, under torch.compile and on meta tensors."""
    if not ids.numel() or ids.device.type == "meta":
        return
    bad = (ids != ignore_index) & ((ids < 0) | (ids >= V))
    if bool(bad.any()):
        idx = first_true_index(bad) if bad.dim() else ()
        where = f"ids[{', '.join(map(str, idx))}]" if idx else "ids"
        raise ValueError(f"{op}: `ids` must lie in {span} = [0, {V}) or equal ignore_index={ignore_index}, got "
                         f"{where} = {int(ids[idx])} ({int(bad.sum())} such id(s))")


def check_shift(op: str, shift: bool, x: torch.Tensor, x_name: str = "logits") -> None:
    """``shift=True`` scores position t with the id at t + 1: ``x`` needs a position dim before its last one."""
    if shift and x.dim() < 2:
        last = "V" if x_name == "logits" else "H"
        raise ValueError(f"{op}: `shift=True` needs positions: `{x_name}` [..., T, {last}] with at least 2 dims, got "
                         f"{describe(x)}")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer in on ``device`` now, or None when autocast is off there."""
    if device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def linear_compute_dtype(op: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                         ) -> torch.dtype:
    """The dtype an LM-head op runs in: the common dtype, or fp32 for a mix of bf16/fp16 with fp32 (D69); other mixes
    (float64 with anything else, bf16 with fp16) are refused."""
    tensors = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    dtypes = {hidden.dtype} | {x.dtype for _, x in tensors}
    if len(dtypes) == 1:
        return hidden.dtype
    others = dtypes - {torch.float32}
    if torch.float32 in dtypes and len(others) == 1 and others <= set(LOW_PRECISION):
        return torch.float32
    name, x = next((n, t) for n, t in tensors if t.dtype != hidden.dtype)
    raise TypeError(f"{op}: `{name}` must have the dtype of `hidden` ({hidden.dtype}), or one of them be float32 "
                    f"and the others bf16/fp16 (mixed precision, computed in float32), got {describe(x)}")


def check_lm_head(op: str, hidden, weight, ids, bias, shift: bool) -> None:
    """``hidden [..., H]``, ``weight [V, H]``, ``ids`` of ``hidden``'s leading shape, ``bias [V]``: kinds, shapes and
    one device."""
    require_tensor(op, "hidden", hidden, kind="float")
    require_tensor(op, "weight", weight, kind="float", ndim=2)
    require_tensor(op, "ids", ids, kind="int")
    if hidden.dim() < (2 if shift else 1):
        want = "[..., T, H] (a sequence dimension to shift along)" if shift else "[..., H]"
        raise ValueError(f"{op}: `hidden` must be {want}, got {describe(hidden)}")
    h = hidden.shape[-1]
    if weight.shape[1] != h:
        raise ValueError(f"{op}: `weight` must be [V, H] with H = {h} (the inner size of `hidden` [..., H]), "
                         f"got {describe(weight)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: `weight` must have V >= 1 rows (vocabulary entries), got {describe(weight)}")
    if ids.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: `ids` must have shape {list(hidden.shape[:-1])} (the leading dimensions of `hidden` "
                         f"[..., H]; [N] for [N, H]), got {describe(ids)}")
    if bias is not None:
        require_tensor(op, "bias", bias, kind="float", ndim=1)
    require_same_device(op, "hidden", hidden, weight=weight, ids=ids, bias=bias)
    if bias is not None:
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: `bias` must have shape [V] = [{weight.shape[0]}] (one entry per row of "
                             f"`weight`), got {describe(bias)}")


def refuse_nan_rows(op: str, inputs: str, *results: torch.Tensor) -> None:
    """A NaN result of an LM-head op only comes from logits that are not finite in the compute dtype (an overflow of
    ``hidden @ weightᵀ / τ``, NaN/inf inputs): raise naming the first such row (D150, D211). ``inputs`` names the
    operands in the message."""
    bad = torch.isnan(results[0])
    for r in results[1:]:
        bad = bad | torch.isnan(r)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0, 0])
        raise ValueError(f"{op}: the logits of row {i} are not finite in {results[0].dtype}: {inputs}"
                         f" ({int(bad.sum())} such row(s)); pass check_ids=False to get the NaN instead")


def autocast_inputs(*xs):
    """Like ``F.linear`` under ``torch.autocast`` (D67): the floating tensors among ``xs`` other than float64 cast to
    the autocast dtype of the first one's device (``xs`` unchanged when autocast is off there, or it is no tensor)."""
    if not isinstance(xs[0], torch.Tensor):
        return xs
    cast = autocast_dtype(xs[0].device)
    if cast is None:
        return xs
    return tuple(x.to(cast) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                 else x for x in xs)


# ------------------------------------------------------------------------------- role_aware_advantages: the values
def check_role_values(op: str, roles: torch.Tensor, mask: torch.Tensor | None, contrasts: tuple[str, str],
                      logp: torch.Tensor, logp_corrupt, logp_ablated, perception_signal, reasoning_signal) -> None:
    """The value checks of ``role_aware_advantages`` in the caller's layout (``mask``: the padded layout's, else
    ``None``), in one order whichever path runs: roles outside 0-2 at valid tokens; then per role that has tokens
    (perception, then reasoning): a precomputed signal must be finite there; else its contrast (``contrasts``, the
    config's perception and reasoning kinds) must be a log-prob one and its other log-prob given, and the log-probs
    there may be ``−inf``, never NaN or +inf. Raises ``ValueError`` naming the argument and the first bad index."""
    r = roles if mask is None else roles[mask]
    out_of_range = (r < 0) | (r > 2)
    if r.numel() and bool(out_of_range.any()):
        raise ValueError(f"{op}: `roles` must hold 0 (OTHER), 1 (PERCEPTION) or 2 (REASONING) at valid tokens, "
                         f"got {torch.unique(r[out_of_range])[:5].tolist()}")
    for code, label, kind, other_name, other, given_name, given in (
        (1, "perception", contrasts[0], "logp_corrupt", logp_corrupt, "perception_signal", perception_signal),
        (2, "reasoning", contrasts[1], "logp_ablated", logp_ablated, "reasoning_signal", reasoning_signal),
    ):
        sel = roles == code if mask is None else mask & (roles == code)
        if not bool(sel.any()):
            continue
        where = f" at valid {label} positions"
        if given is not None:
            _reject_at(op, given_name, given, sel & ~torch.isfinite(given), "non-finite", where)
            continue
        if kind in ("kl", "js"):
            raise ValueError(
                f"{op}: config.{label}_contrast={brief(kind)} needs the full logit rows: compute it with "
                f"srpo_core.token_contrast(...) and pass it as `{given_name}`"
            )
        if other is None:
            raise ValueError(f"{op}: `{other_name}` is None but the batch has {int(sel.sum())} {label} token(s); "
                             f"pass it, or a precomputed `{given_name}`")
        for name, x in (("logp", logp), (other_name, other)):
            _reject_at(op, name, x, sel & (torch.isnan(x) | (x == float("inf"))), "NaN/+inf", where)


def _reject_at(op: str, name: str, x: torch.Tensor, bad: torch.Tensor, what: str, where: str) -> None:
    if bool(bad.any()):
        raise ValueError(f"{op}: `{name}` has {int(bad.sum())} {what} value(s){where}; first at index "
                         f"{first_true_index(bad)}")


def check_token_layout(op: str, logp: torch.Tensor, mask, cu_seqlens) -> torch.Tensor:
    """Per-token inputs: padded ``[B, T]`` take ``mask`` (bool, same shape), packed ``[N]`` take ``cu_seqlens``
    (int ``[B+1]``); anything else raises naming the argument. Returns ``cu_seqlens`` int64 ``[B+1]``."""
    from srpo_core.layout import cu_seqlens_from_mask

    if logp.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError(f"{op}: 2-D (padded) inputs take `mask`, not `cu_seqlens`; got cu_seqlens "
                             f"{describe(cu_seqlens)} (pass 1-D packed inputs to use cu_seqlens)")
        if mask is None:
            raise ValueError(f"{op}: 2-D (padded) inputs need `mask: bool {list(logp.shape)}` marking response tokens")
        require_tensor(op, "mask", mask, kind="bool")
        require_same_shape(op, "logp", logp, mask=mask)
        return cu_seqlens_from_mask(mask)
    if mask is not None:
        raise ValueError(f"{op}: 1-D (packed) inputs take `cu_seqlens`, not `mask`; got mask {describe(mask)}")
    if cu_seqlens is None:
        raise ValueError(f"{op}: 1-D (packed) inputs need `cu_seqlens: int [B+1]`")
    check_cu_seqlens(op, cu_seqlens, logp.numel())
    return cu_seqlens.to(torch.int64)


def check_sequence_advantages(op: str, advantages: torch.Tensor, num_traj: int) -> None:
    """``advantages`` holds one finite value per trajectory (``num_traj`` of them)."""
    if advantages.numel() != num_traj:
        raise ValueError(f"{op}: `advantages` must have one entry per trajectory (B = {num_traj}), "
                         f"got {describe(advantages)}")
    if not bool(torch.isfinite(advantages).all()):
        bad = ~torch.isfinite(advantages)
        raise ValueError(f"{op}: `advantages` must be finite, got {int(bad.sum())} non-finite value(s), "
                         f"first at index {first_true_index(bad)[0]}")

