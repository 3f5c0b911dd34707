"""Rounding of fp32 kernel values to the dtype of the tensor they are stored in (shared by the kernels).

Compiled, ``b.to(tl.bfloat16)`` rounds to nearest even (Triton's default for float downcasts, ``cvt.rn.bf16.f32``).
The interpreter (Triton 3.6 and 3.9) truncates fp32 → bf16 instead, so a bf16 gradient checked on the CPU was off by
up to one ulp rather than half of one (issue 22). With ``EMULATE_BF16`` (the launchers set it when interpreting
bf16) the rounding is done on the bits, then the (now exact) cast; compiled kernels keep the plain cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from srpo_core._dispatch import interpreting


def emulate_bf16(dtype: torch.dtype) -> bool:
    """The ``EMULATE_BF16`` constexpr of a launch that stores ``dtype`` values: interpreting and bf16."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def round_fp32(b_x, EMULATE_BF16: tl.constexpr):
    # fp32 b_x rounded to nearest even at bf16 precision, still fp32 (exactly representable in bf16). NaN passes
    # through unchanged (adding the rounding bias to a NaN's bits could carry into the sign: −0); ±inf stay ±inf and
    # values past bf16's largest finite round to ±inf, as the compiled cast does.
    if EMULATE_BF16:
        bits = b_x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(b_x != b_x, b_x, bits.to(tl.float32, bitcast=True))
    return b_x


@triton.jit
def round_to(b_x, p_out, EMULATE_BF16: tl.constexpr):
    # fp32 b_x as p_out's element type, rounded to nearest even (one rounding) compiled and interpreted
    return round_fp32(b_x, EMULATE_BF16).to(p_out.dtype.element_ty)
