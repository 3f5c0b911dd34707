"""Helpers for the chunked torch paths: rows of a ``[..., V]`` tensor as 2-D views, optional ``torch.compile`` of a
chunk function with an eager fallback, and large CPU allocations that ask the kernel for huge pages.

``torch.compile`` (inductor) fuses a chunk function into one or two passes over the logits with no ``[rows, V]``
temporaries; it needs a working C++ compiler. It is used when:

- ``TUNING.compile`` is True (``TUNING.use_compile``, or by default ``SRPO_NO_COMPILE`` not ``"1"``);
- the tensors are on the CPU and the call is large enough to repay a compile (the caller decides the size);
- no earlier compile failed in this process: the first failure (no compiler, an inductor error) warns once and every
  later call runs the eager chunks, which compute the same values.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
import warnings

import torch

from srpo_core.tuning import TUNING

NO_COMPILE_ENV = "SRPO_NO_COMPILE"  # read by srpo_core.tuning (TUNING.compile)
_BROKEN: str | None = None  # why compiling failed in this process, once it has


def compile_wanted(device: torch.device) -> bool:
    """Whether to try the compiled chunk functions for tensors on ``device``."""
    if device.type != "cpu" or _BROKEN is not None:
        return False
    return TUNING.compile


def compile_failed(op: str, err: BaseException) -> None:
    """Record that compiling failed: warn once, use eager chunks from now on."""
    global _BROKEN
    _BROKEN = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"{op}: torch.compile of the CPU chunk functions failed ({_BROKEN.splitlines()[0][:300]}); falling back to "
        f"eager chunks (same results, slower). Set {NO_COMPILE_ENV}=1 to skip the attempt.",
        RuntimeWarning,
        stacklevel=3,
    )


def reset() -> None:
    """Forget an earlier compile failure (tests)."""
    global _BROKEN
    _BROKEN = None


class Compiled:
    """``torch.compile(fn, dynamic=True, fullgraph=True)``, built on first use (dynamic: a new N or V or chunk size
    costs no recompile)."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled = None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        return self._compiled(*args, **kwargs)


# ------------------------------------------------------------------------------------------------------ row views
def collapse_rows(x: torch.Tensor, *, unit_v: bool = True) -> tuple[torch.Tensor, int, int, int, int]:
    """See ``x: [..., V]`` as ``B × T`` rows, row ``(b, t)`` at element offset ``b·stride_b + t·stride_t``, with unit
    stride over ``V`` (or, with ``unit_v=False``, whatever stride ``x`` has over ``V``), without copying when the
    leading dims collapse to at most two (``logits[:, :-1]`` does); copies otherwise. Returns
    ``(x, B, T, stride_b, stride_t)`` (``x`` possibly a contiguous copy)."""
    V = x.shape[-1]
    if unit_v and x.stride(-1) != 1 and V > 1:
        x = x.contiguous()
    dims = [[n, st] for n, st in zip(x.shape[:-1], x.stride()[:-1], strict=True) if n != 1]
    merged: list[list[int]] = []
    for n, st in dims:
        if merged and merged[-1][1] == st * n:  # the outer dim steps over the whole inner one: merge them
            merged[-1] = [merged[-1][0] * n, st]
        else:
            merged.append([n, st])
    if len(merged) > 2:
        x = x.contiguous()
        merged = [[x.numel() // max(V, 1), V]]
    if not merged:  # a single row (or none)
        return x, 1, math.prod(x.shape[:-1]), 0, V
    if len(merged) == 1:
        return x, 1, merged[0][0], 0, merged[0][1]
    return x, merged[0][0], merged[1][0], merged[0][1], merged[1][1]


def row_chunks(x: torch.Tensor, rows: int):
    """Yield ``(n0, chunk)``: 2-D views ``chunk: [r, V]`` of ``x: [..., V]`` (unit stride over V) covering the
    flattened rows ``n0 .. n0 + r`` in order, ``r ≤ rows``."""
    for n0, (chunk,) in row_chunks_multi((x,), rows):
        yield n0, chunk


def row_chunks_multi(xs, rows: int, *, unit_v: bool = True):
    """Yield ``(n0, chunks)``: for tensors ``xs`` of one shape ``[..., V]`` (any layouts), a tuple of 2-D views
    ``[r, V]``, one per tensor, of the same flattened rows ``n0 .. n0 + r``, ``r ≤ rows`` (a chunk ends where any
    tensor's rows stop being evenly spaced). Unit stride over V unless ``unit_v=False``."""
    views = [collapse_rows(x, unit_v=unit_v) for x in xs]
    V = xs[0].shape[-1]
    N = math.prod(xs[0].shape[:-1])
    n0 = 0
    while n0 < N:
        n1 = min(N, n0 + rows)
        for _, _, T, _, _ in views:
            n1 = min(n1, (n0 // T + 1) * T)
        out = []
        for x, _, T, sb, st in views:
            b, t = divmod(n0, T)
            out.append(x.as_strided((n1 - n0, V), (st, x.stride(-1)), x.storage_offset() + b * sb + t * st))
        yield n0, tuple(out)
        n0 = n1


def rows_in_place(x: torch.Tensor) -> bool:
    """Whether ``x: [..., V]``'s rows can be written in place as :func:`collapse_rows` sees them: unit stride over
    ``V``, leading dims that collapse without a copy, and no two rows sharing memory (no broadcast stride 0)."""
    if x.numel() == 0:
        return True
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return False
    if any(n > 1 and st == 0 for n, st in zip(x.shape, x.stride(), strict=True)):
        return False
    y, B, T, sb, st = collapse_rows(x)
    V = x.shape[-1]
    if y.data_ptr() != x.data_ptr() or (T > 1 and st < V) or (B > 1 and sb < T * st):
        return False
    return True


def shift_ids(ids: torch.Tensor, ignore_index: int, dim: int = -1) -> torch.Tensor:
    """``ids`` moved one position left along ``dim`` (position ``t`` gets ``ids[t + 1]``), the last position
    ``ignore_index``: the ``shift=True`` convention of the log-prob ops (cut-cross-entropy's). A copy of the ids
    only (``[...]``), never of the logits."""
    if ids.shape[dim] == 0:
        return ids
    head = ids.narrow(dim, 1, ids.shape[dim] - 1)
    pad = torch.full_like(ids.narrow(dim, 0, 1), ignore_index)
    return torch.cat([head, pad], dim)


# -------------------------------------------------------------------------------------------------- allocations
_HUGE = 2 << 20  # 2 MiB, the x86-64 transparent huge page
_LIBC = None


def _madvise_hugepage(t: torch.Tensor) -> None:
    """Advise the kernel to back ``t``'s (untouched) memory with transparent huge pages (Linux, ``madvise`` mode)."""
    global _LIBC
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    lo = (start + _HUGE - 1) // _HUGE * _HUGE
    hi = (start + nbytes) // _HUGE * _HUGE
    if hi - lo < _HUGE:
        return
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _LIBC.madvise(lo, hi - lo, mmap.MADV_HUGEPAGE)  # advice only: a failure changes nothing
    except (OSError, AttributeError):
        _LIBC = False  # no libc madvise here; never try again


def empty_large(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for a large output written once (``grad_logits``); poisoned under ``SRPO_POISON=1``.

    On Linux CPUs it asks for transparent huge pages first: a fresh multi-GB buffer otherwise costs one page fault per
    4 KiB on first write, which on a VM can take longer than computing the values (measured here: 1.2 GB, 330-930 ms
    of faults vs 65 ms with the advice).
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.device.type == "cpu" and sys.platform == "linux" and _LIBC is not False and hasattr(mmap, "MADV_HUGEPAGE"):
        _madvise_hugepage(out)
    if TUNING.poison:
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).max)
    return out


__all__ = [
    "Compiled", "collapse_rows", "compile_failed", "compile_wanted", "empty_large", "reset", "row_chunks",
    "row_chunks_multi", "rows_in_place", "shift_ids",
]
