"""Tile configurations of the ``linear_token_logprobs`` kernels (``srpo_core.kernels.linear_token_logprobs``): the
pinned ``BLOCK_N`` / ``BLOCK_V`` / ``BLOCK_H`` / warps / stages per (arch, dtype), the candidates ``SRPO_AUTOTUNE=1``
times, and the choice the launchers make between them (:func:`_config`)."""

from __future__ import annotations

import os

import torch
import triton

from srpo_core._dispatch import interpreting

# Pinned configurations per (arch, dtype) (D71). DEFAULT / DEFAULT_FP32 serve the interpreter and unknown GPUs;
# CONFIGS the tensor-core (bf16/fp16) tiles of A100 (sm_8x) and H100/H200 (sm_9x): 128×128 logits tiles (twice the
# old 64×128's arithmetic intensity, ~85 FLOP/byte), BLOCK_H = 32 (sm_80: 3 stages of 16 KB) or 64 (sm_90: 3 stages
# of 32 KB, within its 228 KB of shared memory). fp32 dots are IEEE (no tensor cores, D47) and keep the small tile.
# SRPO_AUTOTUNE=1 times the CANDIDATES once per (arch, dtype, kernel, V, H, power-of-two bucket of N) instead.
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


def _bench(fn) -> float:
    """Median time of ``fn()`` in ms (CUDA only; the tests patch it)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _config(kind: str, hidden: torch.Tensor, V: int, launch, config: dict | None) -> dict:
    """``config`` if given, else the pinned one, else (``SRPO_AUTOTUNE=1``) the fastest candidate for this
    (arch, dtype, kernel, V, H, bucket of N), timed once with ``launch(cfg)`` and cached."""
    if config is not None:
        return {**default_config(hidden.dtype, _arch(hidden)), **config}
    arch = _arch(hidden)
    if os.environ.get("SRPO_AUTOTUNE", "0") != "1" or (arch is None and interpreting()):
        return default_config(hidden.dtype, arch)
    key = (kind, arch, hidden.dtype, V, hidden.shape[1], n_bucket(hidden.shape[0]))
    if key not in _TUNED:
        cands = CANDIDATES["fp32" if hidden.dtype == torch.float32 else "low"]
        _TUNED[key] = dict(min(cands, key=lambda c: _bench(lambda: launch(c))))
    return dict(_TUNED[key])
