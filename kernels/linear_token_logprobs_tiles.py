"""Tile configurations of the ``linear_token_logprobs`` kernels (``srpo_core.kernels.linear_token_logprobs``): the
pinned ``BLOCK_N`` / ``BLOCK_V`` / ``BLOCK_H`` / warps / stages per (arch, dtype), the candidates ``SRPO_AUTOTUNE=1``
times, and the choice the launchers make between them (:func:`_config`)."""

from __future__ import annotations

import os

import torch
import triton

from srpo_core._dispatch import device_guard, interpreting

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
    if os.environ.get("SRPO_AUTOTUNE", "0") != "1" or (arch is None and interpreting()):
        return default_config(hidden.dtype, arch)
    key = tuning_key(kind, hidden, weight, V, flags)
    if key not in _TUNED:
        cands = CANDIDATES["fp32" if hidden.dtype == torch.float32 else "low"]
        _TUNED[key] = dict(min(cands, key=lambda c: _bench(lambda: launch(c), hidden)))
    return dict(_TUNED[key])
