"""Packed and padded rows of the LM-head ops: a batch of ``N`` rows of which the ignored ones (``id ==
ignore_index``) need no work. Packing keeps the computed rows only (dropping the ignored ones costs a host sync:
``nonzero``); unpacking scatters results back to ``[N]`` with 0 at the ignored rows. Without packing (Triton with
``check_ids=False``: no host sync) every row is computed and the ignored ones are zeroed by a mask instead.
"""

from __future__ import annotations

import torch


class Rows:
    """Which rows of ``ids [N]`` a pass computes. ``index``: the kept rows (``[k]``), or None when every row is
    computed (nothing ignored, or packing not asked)."""

    def __init__(self, ids: torch.Tensor, ignore_index: int, pack: bool):
        self.n = ids.shape[0]
        self.keep = ids != ignore_index
        pack = pack and self.n > 0 and not bool(self.keep.all())
        self.index = torch.nonzero(self.keep)[:, 0] if pack else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, ...]`` → the computed rows."""
        return x[self.index] if self.index is not None else x

    def pack_grad(self, g: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
        """An upstream gradient ``[N]`` → the computed rows' in ``acc``, 0 at ignored rows (None stays None)."""
        if g is None:
            return None
        g = g.to(acc)
        if self.index is not None:
            return g[self.index]
        return torch.where(self.keep, g, torch.zeros((), dtype=acc, device=g.device))

    def unpack(self, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """The computed rows' ``x`` → ``[N, ...]`` in ``acc``, 0 at the ignored rows."""
        if self.index is not None:
            out = torch.zeros((self.n, *x.shape[1:]), dtype=acc, device=x.device)
            return out.index_copy_(0, self.index, x.to(acc))
        keep = self.keep.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, x.to(acc), torch.zeros((), dtype=acc, device=x.device))


def shard_rows(hidden: torch.Tensor, ids: torch.Tensor, ignore_index: int, vocab_start: int, pack: bool):
    """→ ``(rows, hidden of the computed rows, their shard-local ids)``: a local id is ``id − vocab_start`` (outside
    ``[0, V_local)`` when another shard owns it), −1 for an ignored row."""
    rows = Rows(ids, ignore_index, pack)
    ids_k = rows.pack(ids)
    ids_local = torch.where(ids_k == ignore_index, torch.full_like(ids_k, -1), ids_k - vocab_start)
    return rows, rows.pack(hidden), ids_local


__all__ = ["Rows", "shard_rows"]
