"""Input checks with messages that name the argument, what it got and what was expected."""

from __future__ import annotations

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
