"""Padded ``[B, T]`` + ``mask`` and packed ``[N]`` + ``cu_seqlens: [B+1]`` layouts, and segment helpers.

Everything inside srpo-core computes on the packed layout; padded inputs are packed by ``x[mask]`` (row-major, so
trajectory ``i``'s valid tokens keep their order) and results are scattered back with zeros elsewhere.
"""

from __future__ import annotations

import torch


def cu_seqlens_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask: bool [B, T]`` → ``cu_seqlens: int64 [B+1]``."""
    lengths = mask.sum(dim=1, dtype=torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def segment_ids(cu_seqlens: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``cu_seqlens: [B+1]`` → ``seg: int64 [N]``, the trajectory index of every packed token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    b = lengths.numel()
    return torch.repeat_interleave(torch.arange(b, device=cu_seqlens.device), lengths, output_size=n)


def pack(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x: [B, T]``, ``mask: bool [B, T]`` → ``[N]`` (the valid entries, row-major)."""
    return x[mask]


def unpack(packed: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``packed: [N]`` → ``[B, T]`` with ``fill`` outside ``mask``."""
    out = torch.full(mask.shape, fill, dtype=packed.dtype, device=packed.device)
    out[mask] = packed
    return out


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of ``values: [N]`` per segment → ``[num_segments]`` (deterministic on CPU)."""
    return values.new_zeros(num_segments).index_add_(0, seg, values)
