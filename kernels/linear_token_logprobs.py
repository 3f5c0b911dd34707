"""Fused LM-head + log-prob: ``logp = u_id − lse(u)``, ``H = lse − Σ softmax(u)·u`` for ``u = (h @ Wᵀ + b) / τ``,
without materialising ``[N, V]`` (the cut-cross-entropy idea; this is an independent implementation).

Forward, ``linear_logprobs_fwd_kernel``: grid ``(cdiv(N, BLOCK_N), SPLITS)``. A program owns ``BLOCK_N`` tokens and a
contiguous range of vocabulary tiles; for each tile it accumulates ``h[BLOCK_N, :] @ W[BLOCK_V, :]ᵀ`` over ``H`` in
``BLOCK_H`` steps with ``tl.dot`` (fp32 accumulator), then folds the tile into an online logsumexp in base 2
(``u₂ = u·log₂e``: running max ``m``, ``s = Σ 2^(u₂ − m)``, ``t = Σ 2^(u₂ − m)(u₂ − m)`` for the entropy) and picks the
sampled token's logit when it falls in the tile. Each split writes its partial ``(lse₂, target₂, H₂)`` to a
``[SPLITS, N]`` buffer; the launcher combines the splits in a fixed order (deterministic; no atomics).

Backward, ``linear_logprobs_bwd_kernel``: for one vocabulary chunk ``[v_lo, v_lo + V_chunk)``, grid
``(cdiv(N, BLOCK_N), cdiv(V_chunk, BLOCK_V))``: recompute the tile, ``log₂p = u₂ − lse₂``, and write
``G = ∂L/∂x = p·(a + b·log₂p) + c·onehot`` (``a = −(g_lp + g_H·H)/τ``, ``b = −g_H·ln2/τ``, ``c = g_lp/τ``) to a
``[N, V_chunk]`` buffer in the inputs' dtype. The launcher then runs ``grad_hidden += G @ W_chunk``,
``grad_weight[chunk] = Gᵀ @ h`` and ``grad_bias[chunk] = Σ_n G`` as library GEMMs. Peak extra memory is one chunk
(``TUNING.linear_triton_bwd_chunk_elements``), never ``[N, V]``; every gradient element is written by one program or
one GEMM, so the result is deterministic. (A single fused backward with atomics into ``grad_hidden``/``grad_weight``
would save the chunk's round trip through memory, at the price of run-to-run differences; we chose determinism.)

``V``, ``H``, ``N``, the strides, ``1/τ`` and the vocabulary range are runtime arguments: a new vocabulary size or
temperature costs no compile. fp32 inputs use ``input_precision="ieee"`` dots (no TF32), so fp32 means fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from srpo_core import _dispatch
from srpo_core._dispatch import device_guard, empty, interpreting
from srpo_core.kernels._rounding import round_to
from srpo_core.tuning import TUNING

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Sizes (TUNING, srpo_core/tuning.py): the forward splits the vocabulary until about
# TUNING.linear_triton_target_programs (row block, split) programs run (enough to fill ~132 SMs several times over);
# the backward's G buffer holds at most TUNING.linear_triton_bwd_chunk_elements (64 M: 128 MiB in bf16).

# ------------------------------------------------------------------------------------------------------ tile configs
# The pinned BLOCK_N / BLOCK_V / BLOCK_H / warps / stages per (arch, dtype), the candidates TUNING.autotune
# (SRPO_AUTOTUNE=1) times, and the choice the launchers make between them (:func:`_config`).
# Pinned configurations per (arch, dtype) (D71). DEFAULT / DEFAULT_FP32 serve the interpreter and unknown GPUs;
# CONFIGS the tensor-core (bf16/fp16) tiles of A100 (sm_8x) and H100/H200 (sm_9x): 128×128 logits tiles (twice the
# old 64×128's arithmetic intensity, ~85 FLOP/byte), BLOCK_H = 32 (sm_80: 3 stages of 16 KB) or 64 (sm_90: 3 stages
# of 32 KB, within its 228 KB of shared memory). fp32 dots are IEEE (no tensor cores, D47) and keep the small tile.
# SRPO_AUTOTUNE=1 times the CANDIDATES once per tuning_key (GPU, dtype, kernel and its flags, V, H, strides,
# power-of-two bucket of N) instead.
DEFAULT = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3}
DEFAULT_FP32 = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2}
CONFIGS = {
    (8, "low"): {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3},
    (9, "low"): {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
}
CANDIDATES = {
    "low": [
        {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3},
    ],
    "fp32": [
        {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
        {"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
    ],
}
_TUNED: dict[tuple, dict] = {}


def default_config(dtype: torch.dtype, arch: int | None = None) -> dict:
    """The pinned config for ``dtype`` on a GPU of major compute capability ``arch`` (None: interpreter / unknown)."""
    if dtype == torch.float32:
        return dict(DEFAULT_FP32)
    return dict(CONFIGS.get((arch, "low"), DEFAULT))


def n_bucket(n: int) -> int:
    """The autotuning key of the token count: the next power of two (N changes every RL step; a bucket does not)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _arch(x: torch.Tensor) -> int | None:
    return torch.cuda.get_device_capability(x.device)[0] if x.is_cuda else None


def tuning_key(kind: str, hidden: torch.Tensor, weight: torch.Tensor, V: int, flags: dict) -> tuple:
    """What one timing holds for: the kernel (``kind``), the GPU (model and arch), the dtype, ``V``, ``H``, the
    bucket of ``N``, every constexpr flag that changes the compiled kernel (``flags``: ``WANT_ENTROPY``,
    ``HAS_BIAS``, ``SOFTCAP``, ``HAS_ENTROPY_GRAD``) and the operands' strides (the JIT specialises on unit and
    16-divisible strides; for contiguous operands they follow from ``H``, so they add no retuning)."""
    gpu = torch.cuda.get_device_name(hidden.device) if hidden.is_cuda else hidden.device.type
    return (kind, gpu, _arch(hidden), hidden.dtype, int(V), int(hidden.shape[1]), n_bucket(hidden.shape[0]),
            tuple(sorted((k, bool(v)) for k, v in flags.items())), tuple(hidden.stride()), tuple(weight.stride()))


def _bench(fn, x: torch.Tensor) -> float:
    """Median time of ``fn()`` in ms on ``x``'s GPU (CUDA only; the tests patch it). Inside ``device_guard(x)``:
    ``do_bench``'s events, cache flush buffer and synchronisations go to the current device, which need not be
    ``x``'s (issue 22)."""
    with device_guard(x):
        return triton.testing.do_bench(fn, warmup=5, rep=20)


def _config(kind: str, hidden: torch.Tensor, weight: torch.Tensor, V: int, launch, config: dict | None,
            flags: dict) -> dict:
    """``config`` if given, else the pinned one, else (``SRPO_AUTOTUNE=1``) the fastest candidate for
    :func:`tuning_key`, timed once with ``launch(cfg)`` and cached."""
    if config is not None:
        return {**default_config(hidden.dtype, _arch(hidden)), **config}
    arch = _arch(hidden)
    if not TUNING.autotune or (arch is None and interpreting()):
        return default_config(hidden.dtype, arch)
    key = tuning_key(kind, hidden, weight, V, flags)
    if key not in _TUNED:
        cands = CANDIDATES["fp32" if hidden.dtype == torch.float32 else "low"]
        _TUNED[key] = dict(min(cands, key=lambda c: _bench(lambda: launch(c), hidden)))
    return dict(_TUNED[key])



@triton.jit
def _dot_t(b_x, b_y, b_acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # b_acc + b_x @ b_yᵀ, fp32 accumulation
    if UPCAST:
        b_x = b_x.to(tl.float32)
        b_y = b_y.to(tl.float32)
    if IEEE or UPCAST:
        return tl.dot(b_x, tl.trans(b_y), b_acc, input_precision="ieee")
    return tl.dot(b_x, tl.trans(b_y), b_acc)


@triton.jit
def _round_like(b_x, p_like, EMULATE_BF16: tl.constexpr):
    # fp32 b_x rounded (to nearest even) to the element type of p_like and back; a no-op for fp32. The interpreter
    # truncates fp32 → bf16 casts (Triton 3.6, 3.9), so there (EMULATE_BF16) the rounding is done on the bits.
    return round_to(b_x, p_like, EMULATE_BF16).to(tl.float32)


@triton.jit
def _h_step(p_h, p_w, o_n, m_n, o_v, m_v, h0, H, stride_hn, stride_hh, stride_wv, stride_wh, b_acc,
            IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_H: tl.constexpr):
    # b_acc + h[o_n, h0:h0+BLOCK_H] @ w[o_v, h0:h0+BLOCK_H]ᵀ
    o_h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
    m_h = o_h < H
    b_h = tl.load(p_h + o_n[:, None] * stride_hn + o_h[None, :] * stride_hh,
                  mask=m_n[:, None] & m_h[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
    b_w = tl.load(p_w + o_v[:, None] * stride_wv + o_h[None, :] * stride_wh,
                  mask=m_v[:, None] & m_h[None, :], other=0.0)  # [BLOCK_V, BLOCK_H]
    return _dot_t(b_h, b_w, b_acc, IEEE, UPCAST)


@triton.jit
def _logits_tile(p_h, p_w, p_b, o_n, m_n, o_v, m_v, H, stride_hn, stride_hh, stride_wv, stride_wh,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, INTERPRET: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # x = h[o_n] @ w[o_v]ᵀ + b[o_v], fp32 accumulation, rounded to the inputs' dtype (D48), [BLOCK_N, BLOCK_V]
    b_acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if INTERPRET:  # Triton 3.6's interpreter rejects range() with a tensor bound (D178)
        h0 = 0
        while h0 < H:
            b_acc = _h_step(p_h, p_w, o_n, m_n, o_v, m_v, h0, H, stride_hn, stride_hh, stride_wv, stride_wh, b_acc,
                            IEEE, UPCAST, BLOCK_H)
            h0 += BLOCK_H
    else:  # compiled: an scf.for, which the software pipeliner stages (num_stages); it leaves while loops alone
        for h0 in range(0, H, BLOCK_H):
            b_acc = _h_step(p_h, p_w, o_n, m_n, o_v, m_v, h0, H, stride_hn, stride_hh, stride_wv, stride_wh, b_acc,
                            IEEE, UPCAST, BLOCK_H)
    if HAS_BIAS:
        b_acc += tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return _round_like(b_acc, p_h, UPCAST)


@triton.jit
def _fwd_tile(p_h, p_w, p_b, b_ids, o_n, m_n, i_v, V, H, stride_hn, stride_hh, stride_wv, stride_wh, scale, cap_pre,
              cap, b_m, b_s, b_t, b_tgt, HAS_BIAS: tl.constexpr, WANT_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # one vocabulary tile i_v folded into the running (max, Σ 2^·, Σ 2^··, target) of the rows o_n
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
    m_v = o_v < V
    b_acc = _logits_tile(p_h, p_w, p_b, o_n, m_n, o_v, m_v, H, stride_hn, stride_hh, stride_wv, stride_wh,
                         HAS_BIAS, IEEE, UPCAST, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_H)
    if SOFTCAP:
        b_acc = cap * _tanh(b_acc * cap_pre)
    b_u = tl.where(m_v[None, :], b_acc * scale, -float("inf"))  # [BLOCK_N, BLOCK_V], base 2
    b_tgt += tl.sum(tl.where(o_v[None, :] == b_ids[:, None], b_u, 0.0), 1)
    # every exp2 takes a shifted argument ≤ 0 and no lane computes inf·0 or inf − inf (masked lanes included):
    # a row whose tile is all −inf shifts by 0, and the rescale of an empty running sum is skipped
    b_m_new = tl.maximum(b_m, tl.max(b_u, 1))
    b_shift = tl.where(b_m_new == -float("inf"), 0.0, b_m_new)
    b_d = tl.where(b_s > 0, b_m - b_shift, 0.0)  # b_s > 0 ⇒ b_m finite
    b_alpha = tl.where(b_s > 0, tl.exp2(b_d), 0.0)
    b_x = b_u - b_shift[:, None]  # ≤ 0, −inf where p = 0
    b_p = tl.exp2(b_x)
    if WANT_ENTROPY:
        b_t = b_alpha * (b_t + b_d * b_s)
        b_t += tl.sum(b_p * tl.where(b_p > 0, b_x, 0.0), 1)
    b_s = b_s * b_alpha + tl.sum(b_p, 1)
    return b_m_new, b_s, b_t, b_tgt


@triton.jit
def _tanh(b_y):
    # tanh from one exp2 of a non-positive argument: no overflow for any |y|, exact sign, ±1 in the limit
    b_e = tl.exp2(tl.abs(b_y) * -2.8853900817779268)  # exp(−2|y|) = 2^(−2·log₂e·|y|)
    b_t = (1.0 - b_e) / (1.0 + b_e)
    return tl.where(b_y < 0, -b_t, b_t)


@triton.heuristics({"HAS_BIAS": lambda a: a["p_b"] is not None})
@triton.jit
def linear_logprobs_fwd_kernel(
    p_h,  # hidden [N, H]
    p_w,  # weight [V, H]
    p_b,  # bias [V] or None
    p_ids,  # [N] int, local vocabulary ids (outside [0, V) when the token is not in this shard / ignored)
    p_lse,  # [SPLITS, N] fp32, base 2
    p_tgt,  # [SPLITS, N] fp32, base 2 (0 when the target is not in the split)
    p_ent,  # [SPLITS, N] fp32, base 2 (entropy in bits of the split's own softmax)
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    scale,  # log₂e / τ (times logit_scale without a softcap)
    cap_pre,  # SOFTCAP: logit_scale / softcap
    cap,  # SOFTCAP: softcap
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots (no TF32)
    UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong (Triton 3.9), so dot in fp32 there
    INTERPRET: tl.constexpr,  # interpreter: while loops (Triton 3.6 rejects range() with a tensor bound)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # lse₂ = log₂ Σ_v 2^(u₂[v]), u₂ = (h·w_v + b_v)·log₂e/τ; target₂ = u₂[id]; H₂ = lse₂ − Σ_v p_v u₂[v]
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    m_n = o_n < N
    b_ids = tl.load(p_ids + o_n, mask=m_n, other=-1).to(tl.int64)
    b_m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    b_s = tl.zeros((BLOCK_N,), tl.float32)
    b_t = tl.zeros((BLOCK_N,), tl.float32)
    b_tgt = tl.zeros((BLOCK_N,), tl.float32)
    n_tiles = tl.cdiv(V, BLOCK_V)
    t_lo = i_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    if INTERPRET:  # Triton 3.6's interpreter rejects range() with a tensor bound (D178)
        i_v = t_lo
        while i_v < t_hi:
            b_m, b_s, b_t, b_tgt = _fwd_tile(p_h, p_w, p_b, b_ids, o_n, m_n, i_v, V, H, stride_hn, stride_hh,
                                             stride_wv, stride_wh, scale, cap_pre, cap, b_m, b_s, b_t, b_tgt,
                                             HAS_BIAS, WANT_ENTROPY, SOFTCAP, IEEE, UPCAST, INTERPRET, BLOCK_N,
                                             BLOCK_V, BLOCK_H)
            i_v += 1
    else:  # compiled: the same code as before the interpreter needed a while loop (nested scf.for)
        for i_v in range(t_lo, t_hi):
            b_m, b_s, b_t, b_tgt = _fwd_tile(p_h, p_w, p_b, b_ids, o_n, m_n, i_v, V, H, stride_hn, stride_hh,
                                             stride_wv, stride_wh, scale, cap_pre, cap, b_m, b_s, b_t, b_tgt,
                                             HAS_BIAS, WANT_ENTROPY, SOFTCAP, IEEE, UPCAST, INTERPRET, BLOCK_N,
                                             BLOCK_V, BLOCK_H)
    b_ls = tl.log2(b_s)
    o_out = i_s * N + o_n
    tl.store(p_lse + o_out, b_m + b_ls, mask=m_n)
    tl.store(p_tgt + o_out, b_tgt, mask=m_n)
    if WANT_ENTROPY:
        tl.store(p_ent + o_out, b_ls - b_t / b_s, mask=m_n)


@triton.heuristics({"HAS_BIAS": lambda a: a["p_b"] is not None})
@triton.jit
def linear_logprobs_bwd_kernel(
    p_h,  # hidden [N, H]
    p_w,  # weight [V, H]
    p_b,  # bias [V] or None
    p_ids,  # [N] local ids
    p_lse,  # [N] fp32, base 2, of the whole vocabulary
    p_a,  # [N] fp32: −(g_lp + g_H·H)/τ
    p_c,  # [N] fp32: g_lp/τ (one-hot coefficient)
    p_bc,  # [N] fp32: −g_H·ln2/τ (only read when HAS_ENTROPY_GRAD)
    p_g,  # [N, V_chunk] out: ∂L/∂logits for the chunk, inputs' dtype
    N,
    V,
    H,
    v_lo,
    V_chunk,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_gn,
    scale,  # log₂e / τ (times logit_scale without a softcap)
    cap_pre,  # SOFTCAP: logit_scale / softcap
    cap,  # SOFTCAP: softcap
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # G[n, v] = p·(a_n + b_n·log₂p) + c_n·[v = id_n],  log₂p = u₂ − lse₂
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < N
    o_c = i_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)  # column in the chunk
    o_v = v_lo + o_c  # row of W
    m_v = (o_c < V_chunk) & (o_v < V)
    b_acc = _logits_tile(p_h, p_w, p_b, o_n, m_n, o_v, m_v, H, stride_hn, stride_hh, stride_wv, stride_wh,
                         HAS_BIAS, IEEE, UPCAST, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_H)  # as the forward's (D48)
    if SOFTCAP:
        b_tc = _tanh(b_acc * cap_pre)
        b_acc = cap * b_tc
    b_lse = tl.load(p_lse + o_n, mask=m_n, other=0.0)
    # log₂ p, [BLOCK_N, BLOCK_V]. Never exp2 of an unshifted value: masked lanes are −inf (p = 0), and log₂ p is
    # clamped at 0 (p ≤ 1 holds for the true lse up to rounding), so a row whose saved lse is not its logsumexp (an
    # ignored row keeps lse = 0 with zero upstream coefficients) gives p ≤ 1, G = 0, not exp2(u) = inf times 0 = NaN.
    b_lp = tl.where(m_n[:, None] & m_v[None, :], tl.minimum(b_acc * scale - b_lse[:, None], 0.0), -float("inf"))
    b_p = tl.exp2(b_lp)
    b_a = tl.load(p_a + o_n, mask=m_n, other=0.0)
    if HAS_ENTROPY_GRAD:
        b_b = tl.load(p_bc + o_n, mask=m_n, other=0.0)
        b_g = b_p * (b_a[:, None] + b_b[:, None] * tl.where(b_p > 0, b_lp, 0.0))
    else:
        b_g = b_p * b_a[:, None]  # p = 0 on masked lanes, p ≤ 1 elsewhere: never inf·0
    b_ids = tl.load(p_ids + o_n, mask=m_n, other=-1).to(tl.int64)
    b_c = tl.load(p_c + o_n, mask=m_n, other=0.0)
    b_g += tl.where(o_v[None, :] == b_ids[:, None], b_c[:, None], 0.0)
    if SOFTCAP:  # ∂u/∂x = logit_scale·(1 − t²)/τ; logit_scale/τ is in the coefficients
        b_g = b_g * (1.0 - b_tc * b_tc)
    tl.store(p_g + o_n[:, None] * stride_gn + o_c[None, :], round_to(b_g, p_g, UPCAST),  # one rounding
             mask=m_n[:, None] & m_v[None, :])


def _transform(inv_tau, logit_scale, softcap):
    """``(scale, cap_pre, cap)`` of the kernels: ``u₂ = x·scale`` or ``u₂ = cap·tanh(x·cap_pre)·scale``."""
    if softcap:
        return float(inv_tau) * LOG2E, float(logit_scale) / float(softcap), float(softcap)
    return float(inv_tau) * float(logit_scale) * LOG2E, 1.0, 1.0


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` accumulated in ``acc``'s dtype (fp32), in place, with no low-precision temporary: for fp32
    operands one ``addmm_``; for bf16/fp16 operands on CUDA the GEMM writes its fp32 accumulator out (``out_dtype``,
    no rounding to bf16) and is added; on CPU (no such kernel) an fp32 GEMM of the exactly upcast operands."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if acc.is_cuda:
        return acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _upcast(hidden: torch.Tensor) -> bool:
    return interpreting() and hidden.dtype == torch.bfloat16


def linear_logprobs_fwd(hidden, weight, bias, ids_local, *, inv_tau: float, want_entropy: bool, config=None,
                        splits: int | None = None, logit_scale: float = 1.0, softcap: float | None = None):
    """``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``ids_local [N]`` → ``(lse, target, H)`` fp32 ``[N]``
    in natural units (``H`` None unless ``want_entropy``); ``target`` is 0 where the id is outside ``[0, V)``.

    Logits ``u = x·inv_tau·logit_scale``, or with ``softcap`` ``softcap·tanh(logit_scale·x/softcap)·inv_tau``."""
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    assert ids_local.shape == hidden.shape[:1] and hidden.dtype == weight.dtype
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with unit stride
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    scale, cap_pre, cap = _transform(inv_tau, logit_scale, softcap)

    def launch(cfg):
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
        programs = triton.cdiv(TUNING.linear_triton_target_programs, n_blocks)
        n_splits = splits if splits is not None else max(1, min(n_tiles, programs))
        tiles_per_split = triton.cdiv(n_tiles, n_splits)
        n_splits = triton.cdiv(n_tiles, tiles_per_split)
        lse = empty((n_splits, N), dtype=torch.float32, device=dev)
        tgt = empty((n_splits, N), dtype=torch.float32, device=dev)
        ent = empty((n_splits, N), dtype=torch.float32, device=dev) if want_entropy else lse
        with _dispatch.device_guard(hidden):  # the tensors' GPU and its current stream, whatever device is current
            linear_logprobs_fwd_kernel[(n_blocks, n_splits)](
                hidden, weight, bias, ids_local, lse, tgt, ent,
                N, V, H, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                scale, cap_pre, cap, tiles_per_split,
                WANT_ENTROPY=want_entropy, SOFTCAP=bool(softcap), IEEE=hidden.dtype == torch.float32,
                UPCAST=_upcast(hidden), INTERPRET=interpreting(),
                BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        return lse, tgt, ent

    flags = {"WANT_ENTROPY": want_entropy, "HAS_BIAS": bias is not None, "SOFTCAP": bool(softcap)}
    lse, tgt, ent = launch(_config("fwd", hidden, weight, V, launch, config, flags))
    # combine the splits in a fixed order (base 2): lse = M + log₂ Σ 2^(lse_s − M); H = Σ w_s (H_s + lse − lse_s)
    m = lse.max(0).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp2(lse - m_safe)
    s = w.sum(0)
    lse_tot = m_safe + torch.log2(s)
    out_ent = None
    if want_entropy:
        wn = w / s
        out_ent = torch.where(wn > 0, wn * (ent + lse_tot - lse), torch.zeros_like(wn)).sum(0) * LN2
    return lse_tot * LN2, tgt.sum(0) * LN2, out_ent


def linear_logprobs_bwd(hidden, weight, bias, ids_local, lse, ent, g_lp, g_h, *, inv_tau: float, needs,
                        config=None, chunk: int | None = None, g_lse=None, logit_scale: float = 1.0,
                        softcap: float | None = None):
    """Gradients ``(grad_hidden (fp32), grad_weight (weight dtype), grad_bias (fp32))`` for upstream ``g_lp``/``g_h``/
    ``g_lse`` (``[N]`` fp32 or None) given the whole vocabulary's ``lse`` and ``H`` (natural units). A row with zero
    upstream gradients contributes exactly 0 whatever its ``lse`` (the kernel clamps ``log p`` at 0, D65)."""
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with unit stride
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_h, need_w, need_b = needs
    zeros = torch.zeros(N, dtype=torch.float32, device=dev)
    scale, cap_pre, cap = _transform(inv_tau, logit_scale, softcap)
    gsc = inv_tau * logit_scale  # ∂u/∂x = logit_scale/τ (× (1 − t²) in the kernel with a softcap)
    glp = g_lp.float() if g_lp is not None else zeros
    a = ((g_lse.float() if g_lse is not None else 0.0) - glp
         - (g_h.float() * ent.float() if g_h is not None else 0.0)) * gsc
    c = glp * gsc
    bc = -g_h.float() * gsc * LN2 if g_h is not None else zeros
    lse2 = (lse.float() * LOG2E).contiguous()

    def chunk_of(cfg):
        bv = cfg["BLOCK_V"]
        c_ = chunk if chunk is not None else max(bv, (TUNING.linear_triton_bwd_chunk_elements // max(N, 1)) // bv * bv)
        return min(c_, V)

    def launch(cfg, v_lo=0, gv=None):
        if gv is None:  # autotuning: the first chunk into a scratch buffer
            gv = empty((N, chunk_of(cfg)), dtype=hidden.dtype, device=dev)
        vc = gv.shape[1]
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(vc, cfg["BLOCK_V"]))
        with _dispatch.device_guard(hidden):
            linear_logprobs_bwd_kernel[grid](
                hidden, weight, bias, ids_local, lse2, a, c, bc, gv,
                N, V, H, v_lo, vc, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                gv.stride(0), scale, cap_pre, cap,
                HAS_ENTROPY_GRAD=g_h is not None, SOFTCAP=bool(softcap), IEEE=hidden.dtype == torch.float32,
                UPCAST=_upcast(hidden), INTERPRET=interpreting(),
                BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )

    flags = {"HAS_ENTROPY_GRAD": g_h is not None, "HAS_BIAS": bias is not None, "SOFTCAP": bool(softcap)}
    cfg = _config("bwd", hidden, weight, V, launch, config, flags)
    step = chunk_of(cfg)
    gh = torch.zeros(N, H, dtype=torch.float32, device=dev) if need_h else None
    gw = empty(tuple(weight.shape), dtype=weight.dtype, device=dev) if need_w else None
    gb = empty((V,), dtype=torch.float32, device=dev) if need_b else None
    g = empty((N, step), dtype=hidden.dtype, device=dev)
    for v_lo in range(0, V, step):
        vc = min(step, V - v_lo)
        gv = g[:, :vc]
        launch(cfg, v_lo, gv)
        w = weight[v_lo:v_lo + vc]
        if need_h:
            addmm_fp32(gh, gv, w)
        if need_w:
            torch.mm(gv.T, hidden, out=gw[v_lo:v_lo + vc])
        if need_b:
            gb[v_lo:v_lo + vc] = gv.sum(0, dtype=torch.float32)
    return gh, gw, gb


def _report_entries() -> list[dict]:
    """What ``benchmarks/gpu_report.py`` compiles: the pinned configs, unit inner strides, sizes multiple of 16."""
    entries = []
    for dtype, tname, arch in ((torch.bfloat16, "bf16", None), (torch.bfloat16, "bf16,sm8x", 8),
                               (torch.bfloat16, "bf16,sm9x", 9), (torch.float32, "fp32", None)):
        cfg = default_config(dtype, arch)
        tname, label = tname.split(",")[0], tname.split(",")[-1]  # "sm8x" / "sm9x": the bf16 configs of that arch
        common = {"p_h": f"*{tname}", "p_w": f"*{tname}", "p_b": "constexpr", "p_ids": "*i64"}
        consts = {"p_b": None, "HAS_BIAS": False, "SOFTCAP": False, "IEEE": dtype == torch.float32, "UPCAST": False,
                  "INTERPRET": False,
                  "stride_hh": 1, "stride_wh": 1,
                  "BLOCK_N": cfg["BLOCK_N"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"]}
        entries.append({
            "name": f"linear_logprobs_fwd[{label}]",
            "fn": linear_logprobs_fwd_kernel.fn,  # the JITFunction under the heuristics
            "signature": {**common, "p_lse": "*fp32", "p_tgt": "*fp32", "p_ent": "*fp32", "N": "i32", "V": "i32:16",
                          "H": "i32:16", "stride_hn": "i32:16", "stride_hh": "constexpr", "stride_wv": "i32:16",
                          "stride_wh": "constexpr", "scale": "fp32", "cap_pre": "fp32", "cap": "fp32",
                          "tiles_per_split": "i32", "HAS_BIAS": "constexpr", "WANT_ENTROPY": "constexpr",
                          "SOFTCAP": "constexpr", "IEEE": "constexpr",
                          "UPCAST": "constexpr", "INTERPRET": "constexpr",
                          "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr"},
            "constexprs": {**consts, "WANT_ENTROPY": True},
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "bytes": "V·H·s·cdiv(N, BLOCK_N) (weight per row block) + N·H·s·cdiv(V, BLOCK_V·tiles_per_split); "
                     "2·N·V·H FLOPs",
        })
        entries.append({
            "name": f"linear_logprobs_bwd[{label}]",
            "fn": linear_logprobs_bwd_kernel.fn,
            "signature": {**common, "p_lse": "*fp32", "p_a": "*fp32", "p_c": "*fp32", "p_bc": "*fp32",
                          "p_g": f"*{tname}", "N": "i32", "V": "i32:16", "H": "i32:16", "v_lo": "i32:16",
                          "V_chunk": "i32:16", "stride_hn": "i32:16", "stride_hh": "constexpr",
                          "stride_wv": "i32:16", "stride_wh": "constexpr", "stride_gn": "i32:16", "scale": "fp32",
                          "cap_pre": "fp32", "cap": "fp32", "HAS_BIAS": "constexpr", "HAS_ENTROPY_GRAD": "constexpr",
                          "SOFTCAP": "constexpr", "IEEE": "constexpr",
                          "UPCAST": "constexpr", "INTERPRET": "constexpr",
                          "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr"},
            "constexprs": {**consts, "HAS_ENTROPY_GRAD": True},
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "bytes": "recompute as forward + N·V_chunk·s written per chunk; 2·N·V·H FLOPs (+ 4·N·V·H in the two "
                     "library GEMMs)",
        })
    return entries


GPU_REPORT = _report_entries()

__all__ = ["GPU_REPORT", "default_config", "linear_logprobs_bwd", "linear_logprobs_bwd_kernel", "linear_logprobs_fwd",
           "linear_logprobs_fwd_kernel"]
