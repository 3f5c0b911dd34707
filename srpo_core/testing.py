"""Assertions for comparing kernels with their float64 references (used by the test-suite, usable by adopters).

The tolerance follows the flash-attention / cut-cross-entropy rule: an implementation may be off the float64 truth by
at most twice what plain torch in the same dtype is off, plus a per-dtype floor.
"""

from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _first_bad(bad: torch.Tensor) -> str:
    idx = torch.nonzero(bad)
    coords = [tuple(int(v) for v in row) for row in idx[:5]]
    return f"{int(bad.sum())} mismatched element(s), first at {coords}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float | torch.Tensor, rtol: float = 0.0,
                 name: str = "") -> None:
    """``|actual - expected| <= atol + rtol·|expected|`` elementwise (``atol`` may be a per-element tensor), with NaN
    and ±inf required at the same places."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{name}: NaN parity differs: {_first_bad(nan_a != nan_e)}")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        raise AssertionError(f"{name}: inf parity differs: {_first_bad((inf_a != inf_e) | (inf_a & (a != e)))}")
    fin = ~(nan_e | inf_e)
    err = torch.where(fin, (a - e).abs(), torch.zeros_like(a))
    bound = (atol.detach().to(torch.float64).cpu() if isinstance(atol, torch.Tensor) else atol) + rtol * e.abs()
    bad = fin & (err > bound)
    if bool(bad.any()):
        worst = int(torch.argmax(torch.where(bad, err, torch.zeros_like(err))))
        raise AssertionError(
            f"{name}: {_first_bad(bad)}; worst |err| = {float(err.reshape(-1)[worst]):.3e} "
            f"(actual {float(a.reshape(-1)[worst])!r}, expected {float(e.reshape(-1)[worst])!r}, "
            f"bound {float(torch.broadcast_to(bound, e.shape).reshape(-1)[worst]):.3e})"
        )


def assert_close_vs_torch(actual: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor, *, atol: float,
                          name: str = "") -> None:
    """``|actual - ref64| <= 2·|torch_same_dtype - ref64| + atol`` elementwise (NaN/inf parity with ``ref64``)."""
    torch_err = (torch_same_dtype.detach().to(torch.float64).cpu() - ref64.detach().to(torch.float64).cpu()).abs()
    torch_err = torch.nan_to_num(torch_err, nan=0.0, posinf=0.0)
    assert_close(actual, ref64, atol=atol + 2 * torch_err, name=name)
