"""Perception-span ablation for the reasoning contrast ``ℓ°_t = log π(y_t | q, I, y_<t without the perception span)``.

:func:`ablate_span` removes the tokens of ``span_mask`` (the perception span of each response) from a batch and
returns an index map that gathers the ablated pass's per-token values back onto the original positions.

Two modes:

- ``"drop"`` rebuilds each row without the span: the kept tokens keep their order and move left, rows are right
  padded (``attention_mask = 0``) to the longest. Left padding and the prompt are untouched, so a batch laid out as
  ``[left-padded prompt | right-padded completion]`` keeps its prompt width. Positions become those of the shortened
  sequence: let the model compute them (Hugging Face's Qwen2/2.5-VL rebuild M-RoPE ids with ``get_rope_index`` from
  ``input_ids`` and ``attention_mask`` when no ``position_ids`` are given). This is the SPEC's "span removed".
- ``"mask"`` keeps the sequence and zeroes the span's ``attention_mask``: later tokens cannot attend to it, and keep
  their original positions *provided the model is given them*: ``position_ids`` holds the original 1-D positions
  (``cumsum(attention_mask) − 1``). Models that derive positions from the attention mask (Qwen-VL's
  ``get_rope_index``) must get positions computed from the *original* mask, or they shift like ``drop``.

The per-token value of a token is read at the token's own position (TRL's and srpo-core's convention: the log-prob of
the token at ``j`` comes from the logits at ``j − 1``), so realignment is a plain gather: ``index[b, j]`` is the
position of original token ``j`` in the ablated row, ``−1`` for dropped (span) tokens, which get no value.
"""

from __future__ import annotations

import dataclasses

import torch

from srpo_core._validate import (
    describe,
    first_true_index,
    refuse_meta,
    require_same_device,
    require_same_shape,
    require_tensor,
)

OP = "ablate_span"


@dataclasses.dataclass
class AblatedBatch:
    """The ablated batch and its index map.

    - ``input_ids``, ``attention_mask``: ``[B, L']``, ``L'`` the longest row's kept count (padding is kept, since it
      is not in the span); ``L' = L`` in ``mask`` mode.
    - ``index``: ``int64 [B, L]``, position of each original token in the ablated row; ``−1`` inside the span.
    - ``position_ids``: ``int64 [B, L]`` original 1-D positions (``mask`` mode), ``None`` in ``drop`` mode.
    - ``mode``: ``"drop"`` or ``"mask"``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    position_ids: torch.Tensor | None
    mode: str

    def gather(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-token ``values: [B, L', ...]`` of the ablated rows → ``[B, L, ...]`` on the original positions
        (``fill`` at span positions)."""
        require_tensor("AblatedBatch.gather", "values", values)
        if values.shape[:2] != self.input_ids.shape:
            raise ValueError(f"AblatedBatch.gather: `values` must start with the ablated shape "
                             f"{tuple(self.input_ids.shape)}, got {describe(values)}")
        if values.shape[1] == 0:  # every row ablated away entirely: nothing to gather, all fill
            return values.new_full((*self.index.shape, *values.shape[2:]), fill)
        idx = self.index.clamp(min=0).to(values.device)
        idx = idx.view(*idx.shape, *([1] * (values.dim() - 2))).expand(*idx.shape, *values.shape[2:])
        out = torch.gather(values, 1, idx)
        dropped = (self.index < 0).to(values.device).view(*self.index.shape, *([1] * (values.dim() - 2)))
        return out.masked_fill(dropped, fill)

    def ablate(self, x: torch.Tensor, pad_value=0) -> torch.Tensor:
        """Apply the same ablation to another per-position tensor ``x: [B, L, ...]`` (e.g. ``token_type_ids``)."""
        require_tensor("AblatedBatch.ablate", "x", x)
        if x.shape[:2] != self.index.shape:
            raise ValueError(f"AblatedBatch.ablate: `x` must start with the original shape "
                             f"{tuple(self.index.shape)}, got {describe(x)}")
        if self.mode == "mask":
            return x.clone()
        out = x.new_full((x.shape[0], self.input_ids.shape[1], *x.shape[2:]), pad_value)
        b, j = torch.nonzero(self.index >= 0, as_tuple=True)
        out[b, self.index[b, j].to(x.device)] = x[b, j]
        return out


def ablate_span(input_ids: torch.Tensor, attention_mask: torch.Tensor, span_mask: torch.Tensor, *,
                mode: str = "drop", pad_token_id: int = 0, tags_mask: torch.Tensor | None = None) -> AblatedBatch:
    """Remove the ``span_mask`` tokens from each row (``drop``), or hide them from attention (``mask``).

    Args:
        input_ids: ``int [B, L]``.
        attention_mask: ``[B, L]`` (0/1 integers or bool).
        span_mask: ``bool [B, L]``, the tokens to ablate (e.g. ``roles == Role.PERCEPTION`` placed at the completion
            positions).
        mode: ``"drop"`` | ``"mask"``.
        pad_token_id: an int, fills the right padding of shortened rows (``drop``).
        tags_mask: optional ``bool [B, L]``, the tag tokens around each span (e.g. ``<perception>`` and
            ``</perception>``), ablated too when given. By default the tags stay in the context, so the ablated pass
            still sees an (empty) ``<perception></perception>``; see ``docs/decisions.md`` D116.

    ``span_mask`` (and ``tags_mask``) must be False where ``attention_mask`` is 0 (an error otherwise, in both modes:
    padding belongs to no span, decision D90).

    Returns:
        :class:`AblatedBatch`. ``gather`` maps the ablated pass's per-token values back; the values at the original
        positions of kept tokens are exactly those of the shortened sequences.
    """
    require_tensor(OP, "input_ids", input_ids, kind="int", ndim=2)
    require_tensor(OP, "attention_mask", attention_mask, ndim=2)
    require_tensor(OP, "span_mask", span_mask, kind="bool", ndim=2)
    require_same_shape(OP, "input_ids", input_ids, attention_mask=attention_mask, span_mask=span_mask)
    require_same_device(OP, "input_ids", input_ids, attention_mask=attention_mask, span_mask=span_mask)
    if mode not in ("drop", "mask"):
        raise ValueError(f"{OP}: `mode` must be 'drop' or 'mask', got {mode!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"{OP}: `pad_token_id` must be an int, got {describe(pad_token_id)}")
    info = torch.iinfo(input_ids.dtype)
    if not info.min <= pad_token_id <= info.max:
        raise ValueError(f"{OP}: `pad_token_id` must fit `input_ids`' dtype {input_ids.dtype} "
                         f"[{info.min}, {info.max}], got {pad_token_id}")
    refuse_meta(OP, input_ids=input_ids, attention_mask=attention_mask, span_mask=span_mask)
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        bad = (attention_mask != 0) & (attention_mask != 1)
        raise ValueError(f"{OP}: `attention_mask` must hold 0/1 (or bool), got {int(bad.sum())} other value(s); "
                         f"first at index {first_true_index(bad)}")
    if tags_mask is not None:
        require_tensor(OP, "tags_mask", tags_mask, kind="bool", ndim=2)
        require_same_shape(OP, "input_ids", input_ids, tags_mask=tags_mask)
        require_same_device(OP, "input_ids", input_ids, tags_mask=tags_mask)
        span_mask = span_mask | tags_mask
    outside = span_mask & ~attention_mask.bool()
    if bool(outside.any()):
        # A span token the model never sees (padding) cannot be removed from what it sees (D90).
        raise ValueError(f"{OP}: `span_mask` must be False where `attention_mask` is 0 (padding is not part of any "
                         f"span), got {int(outside.sum())} such position(s); first at index "
                         f"{first_true_index(outside)}")
    keep = ~span_mask
    index = torch.where(keep, torch.cumsum(keep.to(torch.int64), dim=1) - 1, -1)
    if mode == "mask":
        valid = attention_mask.bool()
        position_ids = (torch.cumsum(valid.to(torch.int64), dim=1) - 1).clamp(min=0)
        index = torch.where(keep, torch.arange(input_ids.shape[1], device=input_ids.device), -1)
        new_mask = (valid & keep).to(attention_mask.dtype)
        return AblatedBatch(input_ids.clone(), new_mask, index, position_ids, mode)
    new_len = int(keep.sum(dim=1).max()) if input_ids.shape[0] else input_ids.shape[1]
    new_ids = input_ids.new_full((input_ids.shape[0], new_len), pad_token_id)
    new_mask = attention_mask.new_zeros((input_ids.shape[0], new_len))
    b, j = torch.nonzero(keep, as_tuple=True)
    new_ids[b, index[b, j]] = input_ids[b, j]
    new_mask[b, index[b, j]] = attention_mask[b, j]
    return AblatedBatch(new_ids, new_mask, index, None, mode)
