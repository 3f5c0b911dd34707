"""Public ``token_contrast``: the per-position divergence between two next-token distributions (SPEC's ``kl`` / ``js``
contrasts) and both sampled-token log-probs, from the two logit rows, without materialising a softmax.

Backends: ``"triton"`` is the fused kernel in ``srpo_core.kernels.token_contrast`` (one read of both rows for ``kl``,
two for ``js``); ``"torch"`` is the chunked path of ``srpo_core.cpu.token_contrast`` (the reference on row chunks,
compiled on the CPU for large inputs, float64 redo of non-finite rows). ``"auto"``: Triton for CUDA tensors, torch
otherwise. ``"reference"`` runs ``srpo_core.reference.token_contrast`` on the whole rows (float32, or float64 when an
input is float64): the math, for checking the fast paths.

The op is registered as ``torch.ops.srpo_core.token_contrast`` (a ``torch.library`` custom op with a fake kernel), so
``torch.compile(fullgraph=True)`` traces through it. It is forward-only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from srpo_core import _dispatch
from srpo_core._validate import (
    brief,
    check_flags,
    check_id_range,
    check_number,
    check_shift,
    describe,
    require_same_device,
    require_tensor,
)
from srpo_core.common import chunked
from srpo_core.cpu.token_contrast import _out_dtype, _torch_path
from srpo_core.reference import token_contrast as ref

OP = "token_contrast"
KINDS = ref.KINDS


class TokenContrast(NamedTuple):
    """Outputs of :func:`token_contrast`, each of ``ids``' shape ``[...]``: ``div`` = KL(p ‖ p') or JS(p, p'),
    ``logp`` = ``log p_id``, ``logp_ref`` = ``log p'_id``."""

    div: torch.Tensor
    logp: torch.Tensor
    logp_ref: torch.Tensor


@torch.library.custom_op("srpo_core::token_contrast", mutates_args=())
def _token_contrast_op(logits: torch.Tensor, logits_ref: torch.Tensor, ids: torch.Tensor, kind: str,
                       temperature: float, ignore_index: int, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits, logits_ref: [..., V]``, ``ids: [...]`` → ``(div, logp, logp_ref)`` of ``ids``' shape."""
    if backend == "triton":
        from srpo_core.kernels.token_contrast import token_contrast_fwd

        return token_contrast_fwd(logits, logits_ref, ids, kind=kind, temperature=temperature,
                                  ignore_index=ignore_index)
    return _torch_path(logits, logits_ref, ids, kind, temperature, ignore_index)


@_token_contrast_op.register_fake
def _(logits, logits_ref, ids, kind, temperature, ignore_index, backend):
    dtype = _out_dtype(logits, logits_ref)
    return tuple(logits.new_empty(logits.shape[:-1], dtype=dtype) for _ in range(3))


def _check(logits, logits_ref, ids, kind, temperature, ignore_index, shift, check_ids) -> None:
    require_tensor(OP, "logits", logits, kind="float")
    require_tensor(OP, "logits_ref", logits_ref, kind="float")
    require_tensor(OP, "ids", ids, kind="int")
    if logits.dim() == 0:
        raise ValueError(f"{OP}: `logits` must be [..., V] with at least one dim, got {describe(logits)}")
    if logits_ref.shape != logits.shape:
        raise ValueError(f"{OP}: `logits_ref` must have the shape of `logits` {tuple(logits.shape)} ([..., V]), "
                         f"got {describe(logits_ref)}")
    if ids.shape != logits.shape[:-1]:
        raise ValueError(f"{OP}: `ids` must have shape [...] = {list(logits.shape[:-1])} (the leading shape of "
                         f"`logits` [..., V], one id per row), got {describe(ids)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{OP}: `logits` must have a vocabulary of V >= 1 columns, got {describe(logits)}")
    require_same_device(OP, "logits", logits, logits_ref=logits_ref, ids=ids)
    if kind not in KINDS:
        raise ValueError(f"{OP}: `kind` must be one of {KINDS}, got {brief(kind)}")
    check_number(OP, "temperature", temperature, "positive")
    check_number(OP, "ignore_index", ignore_index, "int")
    check_flags(OP, shift=shift, check_ids=check_ids)
    check_shift(OP, shift, logits)


def _reference(logits, logits_ref, ids, kind, temperature, ignore_index):
    dtype = _out_dtype(logits, logits_ref)
    return ref.token_contrast(logits.to(dtype), logits_ref.to(dtype), ids, kind=kind, temperature=temperature,
                              ignore_index=ignore_index)


def token_contrast(
    logits: torch.Tensor,
    logits_ref: torch.Tensor,
    ids: torch.Tensor,
    *,
    kind: str = "kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    shift: bool = False,
    check_ids: bool = True,
) -> TokenContrast:
    """Per-position divergence of ``p = softmax(logits/τ)`` from ``p' = softmax(logits_ref/τ)`` and both log-probs of
    the sampled token.

    Args:
        logits: ``[..., V]`` float (fp32/bf16/fp16, or float64 on the torch path); any strides: rows are read in place
            when the leading dims collapse to two row strides (``logits[:, :-1]``, a ``[B, T, V]`` model output, a
            ``[V, N]ᵀ`` view), copied once otherwise.
        logits_ref: ``[..., V]``, the shape of ``logits``, same device; its dtype and layout may differ.
        ids: ``[...]`` integer (the leading shape of ``logits``), the sampled tokens; each in ``[0, V)`` or equal to
            ``ignore_index``.
        kind: ``"kl"`` for ``KL(p ‖ p') = Σ_v p_v (log p_v − log p'_v)`` (≥ 0, ``+inf`` when ``p`` has mass where
            ``p'`` has none), or ``"js"`` for Jensen–Shannon ``½KL(p‖m) + ½KL(p'‖m)``, ``m = ½(p + p')``, in
            ``[0, ln 2]``.
        temperature: ``τ > 0``, applied to both rows.
        ignore_index: positions whose id equals it give 0 in all three outputs.
        backend: ``"auto" | "triton" | "torch" | "reference"``.
        shift: score position ``t`` with the id at ``t + 1`` (cut-cross-entropy's convention: pass the model's
            ``[B, T, V]`` logits and the ``[B, T]`` input ids, no ``[:, :-1]`` slicing); the last position of the
            last dim of ``ids`` gives 0, like an ignored one. Needs ``logits.dim() >= 2``.
        check_ids: scan ``ids`` for out-of-range values first (one device-to-host sync per call); ``False`` skips
            it (no sync on the Triton path; graph-capturable), and an out-of-range id gives NaN in its row.

    Returns:
        ``TokenContrast(div, logp, logp_ref)``, each of ``ids``' shape, float32 (float64 if an input is float64).

    Forward only: the contrast passes run under ``no_grad``. Inputs that require grad are read detached, and the
    outputs carry no graph. ``ids`` are range-checked eagerly unless ``check_ids=False``; while ``torch.compile``
    traces, the check is skipped and an out-of-range id gives NaN in its row instead of an error. ``p_v = 0`` terms
    count 0; a row of all ``−inf`` (or with ``+inf``/NaN) gives NaN, as ``torch.log_softmax`` does. Extreme but
    valid inputs (logits of ±3e38, τ = 1e-6) give the float64 reference's value rounded to float32: a row whose
    fp32 result is not finite, other than a genuine ``+inf`` KL (final after one read), is recomputed in float64
    (both backends, D79), so the result is NaN only for a row without a distribution and ``+inf`` only where the KL
    is genuinely infinite (``x_v`` finite, ``x'_v = −inf``) or exceeds the float32 range. Meta tensors: shapes are
    inferred, value checks skipped.
    """
    _check(logits, logits_ref, ids, kind, temperature, ignore_index, shift, check_ids)
    chosen = _dispatch.pick_backend(backend, logits.device, op=OP,
                                    dtypes={"logits": logits.dtype, "logits_ref": logits_ref.dtype})
    temperature, ignore_index = float(temperature), int(ignore_index)
    if shift:  # before the scan, as token_logprobs: the first position's id is never scored
        ids = chunked.shift_ids(ids, ignore_index)
    if check_ids and logits.device.type != "meta" and not torch.compiler.is_compiling():
        check_id_range(OP, ids, logits.shape[-1], ignore_index)
    if chosen == "reference":
        with torch.no_grad():
            return TokenContrast(*_reference(logits, logits_ref, ids, kind, temperature, ignore_index))
    div, logp, logp_ref = torch.ops.srpo_core.token_contrast(
        logits.detach(), logits_ref.detach(), ids, kind, temperature, ignore_index, chosen
    )
    return TokenContrast(div, logp, logp_ref)


__all__ = ["TokenContrast", "token_contrast"]
