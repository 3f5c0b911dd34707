"""Input checks with messages that name the argument, what it got and what was expected."""

from __future__ import annotations

import torch


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def require_tensor(op: str, name: str, x, *, kind: str | None = None, ndim: int | tuple[int, ...] | None = None):
    """Check that ``x`` is a tensor of the given kind ("float", "int", "bool", "int_or_bool") and rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {describe(x)}")
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
