"""Backend choice and output allocation shared by every public op.

Kernels hold no policy: a public function validates its inputs, asks :func:`pick_backend` which implementation to
run, and calls it. Launchers allocate their outputs with :func:`empty`, which fills them with NaN (or the dtype's
largest value) when ``SRPO_POISON=1``, so a test notices any element a kernel forgot to write.
"""

from __future__ import annotations

import contextlib
import os

import torch

from srpo_core._validate import brief
from srpo_core.tuning import TUNING

BACKENDS = ("auto", "triton", "torch", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what every Triton kernel reads (fp32 math)


_TRITON_IMPORTABLE: bool | None = None


def triton_importable() -> bool:
    """Whether ``import triton`` works here (asked once; a plain global, so torch.compile traces it quietly)."""
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORTABLE = True
        except Exception:  # ImportError, or a broken install raising anything at import
            _TRITON_IMPORTABLE = False
    return _TRITON_IMPORTABLE


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1`` (how the tests check them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_backend(backend: str, device: torch.device, *, op: str, has_triton: bool = True,
                 dtypes: dict[str, torch.dtype] | None = None) -> str:
    """Resolve ``backend="auto" | "triton" | "torch" | "reference"`` for tensors on ``device``.

    ``reference`` and ``torch`` are taken as asked, on any device and dtype: the op then runs its plain-torch reference
    (``srpo_core/reference/``) or its fast CPU path (``srpo_core/cpu/``). ``auto`` takes the Triton kernel for CUDA
    tensors when one exists for ``op`` and Triton imports, the torch path otherwise. ``triton`` insists: it raises
    unless the kernel can run (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    ``dtypes`` names the inputs the kernel reads (``{"logits": logits.dtype}``): one outside :data:`KERNEL_DTYPES`
    (float64) sends ``auto`` to the torch path and makes ``triton`` raise, naming the argument.
    """
    chosen = _pick(backend, device, op=op, has_triton=has_triton)
    bad = {k: v for k, v in (dtypes or {}).items() if v not in KERNEL_DTYPES}
    if chosen == "triton" and bad:
        if backend == "triton":
            got = " and ".join(f"`{k}` {v}" for k, v in (dtypes or {}).items())
            raise TypeError(f"{op}: backend='triton' takes fp32/bf16/fp16 inputs, got {got}; use backend='torch' "
                            f"for float64")
        chosen = "torch"
    return chosen


def _pick(backend: str, device: torch.device, *, op: str, has_triton: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: `backend` must be one of {BACKENDS}, got {brief(backend)}")
    if backend in ("torch", "reference"):
        return backend
    on_device = device.type == "cuda" or (device.type == "cpu" and interpreting())
    runnable = has_triton and triton_importable() and on_device
    if backend == "auto":
        return "triton" if runnable and device.type == "cuda" else "torch"
    if not has_triton:
        raise NotImplementedError(f"{op}: no Triton kernel exists for this op yet; use backend='auto', 'torch' or "
                                  f"'reference'")
    if not triton_importable():
        raise RuntimeError(f"{op}: backend='triton' needs the `triton` package, which does not import here")
    if not runnable:
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got tensors on {device}"
        )
    return "triton"


def device_guard(x: torch.Tensor):
    """The context every Triton launch runs in: ``torch.cuda.device(x.device)`` for a CUDA tensor, so the kernel runs
    on the tensor's GPU and on that device's current stream, whatever device is current in the caller (with
    ``device_map="auto"`` or one process per GPU without ``set_device`` they differ); a no-op on CPU (interpreter).
    Every launcher in ``srpo_core.kernels`` enters it around its launches (a test checks each one does)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def poisoning() -> bool:
    return TUNING.poison


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; poisoned (NaN / max int) under ``SRPO_POISON=1``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).max)
    return out
