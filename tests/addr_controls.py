"""Four tiny kernels with known address math, the controls of tests/test_gpu_static.py's int64 audit: it must flag
the first two and pass the last two (compiled, never run)."""

import triton
import triton.language as tl


@triton.jit
def i32_product_kernel(p_x, p_out, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    tl.store(p_out + row, tl.sum(tl.load(p_x + cols * stride + row), axis=0))  # i32: wraps at 2³¹


@triton.jit
def widened_late_kernel(p_x, p_out, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    off = (cols * stride).to(tl.int64) + row  # the product wrapped before the cast
    tl.store(p_out + row.to(tl.int64), tl.sum(tl.load(p_x + off), axis=0))


@triton.jit
def int64_kernel(p_x, p_out, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    tl.store(p_out + row, tl.sum(tl.load(p_x + cols * stride + row), axis=0))


@triton.jit
def constant_offset_kernel(p_x, p_out):
    tl.store(p_out + 1, tl.load(p_x + 3))  # literal offsets: cannot overflow, exempt
