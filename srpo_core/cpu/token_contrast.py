"""Fast CPU path of ``token_contrast`` (the ``"torch"`` backend, any device): the float64-friendly reference
(``srpo_core/reference/token_contrast.py``) on row chunks upcast to float32 (float64 stays float64), so at most
``TUNING.token_contrast_chunk_elements`` logits are live as a softmax at a time. On the CPU, for inputs of at least
``TUNING.token_contrast_compile_min_elements`` logits, the chunk function is ``torch.compile``d (inductor fuses
the two log-softmaxes, the divergence terms and the gathers into a few passes over the rows); where compiling fails,
or with ``SRPO_NO_COMPILE=1``, the eager chunks compute the same values (see ``srpo_core/common/chunked.py``). Rows
whose fp32 divergence is not finite for a reason other than a genuine ``+inf`` KL are recomputed in float64, as the
kernel's second pass does. No input validation here: ``srpo_core/ops/token_contrast.py`` does it.
"""

from __future__ import annotations

import math

import torch

from srpo_core.common import chunked
from srpo_core.reference import token_contrast as ref
from srpo_core.tuning import TUNING

OP = "token_contrast"
# Rows per chunk: chunk · V ≤ TUNING.token_contrast_chunk_elements; TUNING.token_contrast_compile_min_elements.


def _chunk(x, y, ids, temperature, kind: str, ignore_index: int):
    """The reference on one chunk, in the output dtype; ``temperature`` is a 0-d tensor (no recompile per value)."""
    return ref.token_contrast(x.to(temperature.dtype), y.to(temperature.dtype), ids, kind=kind,
                              temperature=temperature, ignore_index=ignore_index)


_COMPILED = chunked.Compiled(_chunk)


def _out_dtype(logits: torch.Tensor, logits_ref: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (logits.dtype, logits_ref.dtype) else torch.float32


def _torch_path(logits, logits_ref, ids, kind, temperature, ignore_index):
    """The reference, on row chunks upcast to the output dtype (fp32 math for fp32/bf16/fp16 inputs), read in place
    from ``[..., V]`` views; rows whose divergence is not finite are recomputed in float64 (as the kernel does)."""
    V = logits.shape[-1]
    dtype = _out_dtype(logits, logits_ref)
    outs = [torch.empty(ids.shape, dtype=dtype, device=logits.device) for _ in range(3)]  # own their storage
    flat = [o.view(-1) for o in outs]
    ids1 = ids.reshape(-1)
    N = ids1.numel()
    # An id outside [0, V) (only reachable with check_ids=False or under torch.compile) gives NaN, as the kernel.
    bad = (ids1 != ignore_index) & ((ids1 < 0) | (ids1 >= V))
    ids1 = torch.where(bad, torch.zeros_like(ids1), ids1)
    rows = max(1, TUNING.token_contrast_chunk_elements // max(V, 1))
    done = False
    if chunked.compile_wanted(logits.device) and N * V >= TUNING.token_contrast_compile_min_elements:
        t = torch.tensor(temperature, dtype=dtype)
        try:
            for r0, (x, y) in chunked.row_chunks_multi((logits, logits_ref), rows, unit_v=False):
                r1 = r0 + x.shape[0]
                parts = _COMPILED(x, y, ids1[r0:r1], t, kind, ignore_index)
                for out, part in zip(flat, parts, strict=True):
                    out[r0:r1] = part
            done = True
        except Exception as err:  # no C++ compiler, an inductor error: eager chunks, same values
            chunked.compile_failed(OP, err)
    if not done:
        for r0, (x, y) in chunked.row_chunks_multi((logits, logits_ref), rows, unit_v=False):
            r1 = r0 + x.shape[0]
            parts = ref.token_contrast(x.to(dtype), y.to(dtype), ids1[r0:r1], kind=kind, temperature=temperature,
                                       ignore_index=ignore_index)
            for out, part in zip(flat, parts, strict=True):
                out[r0:r1] = part
    if dtype != torch.float64 and N:
        _redo_in_float64(logits, logits_ref, ids1, flat, kind, temperature, ignore_index, dtype)
    for out in flat:
        out.masked_fill_(bad, math.nan)
    return tuple(outs)


def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (flat indices) of ``t: [..., V]`` as a ``[k, V]`` copy, one gather over its storage."""
    x, _, T, sb, st = chunked.collapse_rows(t, unit_v=False)
    V = x.shape[-1]
    storage = x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)
    off = x.storage_offset() + (rows // T) * sb + (rows % T) * st
    return storage[off[:, None] + torch.arange(V, device=x.device) * x.stride(-1)]


def _redo_in_float64(logits, logits_ref, ids1, flat, kind, temperature, ignore_index, dtype):
    """Rows whose fp32 divergence is not finite for a reason other than a genuine ``+inf`` KL (a NaN row, or an fp32
    overflow of a shifted logit such as ``(−3e38 − 3e38)/τ``): recompute them from the float64 reference, as the
    kernel's second pass does. One host sync (a CPU path); the candidates are gathered in row chunks."""
    cand = torch.nonzero((ids1 != ignore_index) & ~torch.isfinite(flat[0])).squeeze(1)
    step = max(1, TUNING.token_contrast_chunk_elements // max(logits.shape[-1], 1))
    for r0 in range(0, cand.numel(), step):
        rows = cand[r0:r0 + step]
        x, y = _rows(logits, rows), _rows(logits_ref, rows)
        if kind == "kl":  # +inf from some x_v > −inf = x'_v is exact in any precision: keep it, read nothing more
            final = (flat[0][rows] == math.inf) & ((x > -math.inf) & (y == -math.inf)).any(-1)
            rows, x, y = rows[~final], x[~final], y[~final]
        if rows.numel():
            parts = ref.token_contrast(x.double(), y.double(), ids1[rows], kind=kind, temperature=temperature,
                                       ignore_index=ignore_index)
            for out, part in zip(flat, parts, strict=True):
                out[rows] = part.to(dtype)
