"""Perception-span ablation for the reasoning contrast ``ℓ°_t = log π(y_t | q, I, y_<t without the perception span)``.

:func:`ablate_span` removes the tokens of ``span_mask`` (the perception span of each response) from a batch and
returns an index map that gathers the ablated pass's per-token values back onto the original positions.

Three modes (:data:`ABLATION_MODES`, the one list every adapter validates against). :data:`DEFAULT_ABLATION_MODE`,
the default of every adapter (TRL, verl, EasyR1, OpenRLHF) and of the study, is ``"counterfactual"``, chosen from the
study's signal table (a toy-scale finding, ``docs/decisions.md`` D181, D189); ``"mask"`` is :func:`ablate_span`'s own
default since it needs no donor.

- ``"mask"`` keeps the sequence and zeroes the span's ``attention_mask``: later tokens cannot attend to it,
  and keep their original positions *provided the model is given them*: ``position_ids`` holds the original 1-D
  positions (``cumsum(attention_mask) − 1``). Models that derive positions from the attention mask (Qwen-VL's
  ``get_rope_index``) must get positions computed from the *original* mask, or they shift like ``drop``.
  The first kept token after a hidden run gets **no** value (``index = −1``): it is predicted from the row of the
  span's last token, a row the ablated pass still computes from that (hidden) token's own input, so its value would
  read the span (decision D180).
- ``"drop"`` rebuilds each row without the span: the kept tokens keep their order and move left, rows are right
  padded (``attention_mask = 0``) to the longest. Left padding and the prompt are untouched, so a batch laid out as
  ``[left-padded prompt | right-padded completion]`` keeps its prompt width. Positions become those of the shortened
  sequence: let the model compute them (Hugging Face's Qwen2/2.5-VL rebuild M-RoPE ids with ``get_rope_index`` from
  ``input_ids`` and ``attention_mask`` when no ``position_ids`` are given). Every later token moves left, and a
  model that reads position to know which section it is in is then off its training distribution (issue 23).
- ``"counterfactual"`` replaces each row's span by the span of another row (``donor``, e.g. another response of the
  same prompt or of another prompt, :func:`counterfactual_donors`): the context stays in distribution, only the
  perceived facts change. Lengths may differ, so the tokens after the span are realigned by their offset from the
  span's end; positions are those of the new sequence (let the model compute them, as in ``drop``). The span of a row
  is the run from its first to its last ``span_mask`` token (a split span is replaced whole; tokens between its pieces
  get no value). A row without a donor (``donor = −1``) is unchanged and all its tokens from the span on get no value.

The per-token value of a token is read at the token's own position (TRL's and srpo-core's convention: the log-prob of
the token at ``j`` comes from the logits at ``j − 1``), so realignment is a plain gather: ``index[b, j]`` is the
position of original token ``j`` in the ablated row, ``−1`` for dropped (span) tokens, which get no value.
"""

from __future__ import annotations

import dataclasses

import torch

from srpo_core._validate import (
    brief,
    describe,
    first_true_index,
    refuse_meta,
    require_same_device,
    require_same_shape,
    require_tensor,
)

OP = "ablate_span"
ABLATION_MODES = ("mask", "drop", "counterfactual")
DEFAULT_ABLATION_MODE = "counterfactual"  # every adapter's and the study's default (docs/decisions.md D181, D189)
DONOR_SOURCES = ("group", "other")


def check_ablation_mode(where: str, mode) -> str:
    """``mode`` if it is one of :data:`ABLATION_MODES`, else a ValueError naming ``where``."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"{where}: the ablation mode must be one of {ABLATION_MODES}, got {brief(mode)}")
    return mode


def follows_hidden(hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``bool [B, T]``: the first token of ``valid`` after each run of ``hidden`` tokens (along dim 1).

    In ``mask`` semantics that token is predicted from a hidden row, so it gets no ablated value (D180). ``valid``
    (default: all) marks the tokens that exist; invalid tokens between a hidden run and the next valid token are
    skipped over.
    """
    hidden = hidden.bool()
    valid = torch.ones_like(hidden) if valid is None else valid.bool()
    if hidden.shape[1] == 0:
        return torch.zeros_like(hidden)
    # for each position, the last earlier position that is hidden or valid (skipping the rest), and whether it is hidden
    pos = torch.arange(hidden.shape[1], device=hidden.device).expand_as(hidden)
    marked = torch.where(hidden | valid, pos, -1)
    prev = torch.cummax(torch.cat([marked.new_full((hidden.shape[0], 1), -1), marked[:, :-1]], dim=1), dim=1).values
    prev_hidden = hidden.gather(1, prev.clamp(min=0)) & (prev >= 0)
    return valid & ~hidden & prev_hidden


def counterfactual_donors(group_ids: torch.Tensor, source: str = "group", *, input_ids: torch.Tensor | None = None,
                          span_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``int64 [B]``: for each row, the row whose span replaces its own in ``counterfactual`` mode (``−1``: none).

    - ``"group"``: the next response of the same prompt (cyclically, in batch order); a group of one has no donor.
    - ``"other"``: the response of the same rank in the next prompt group (cyclically over groups, in order of first
      appearance; rank taken modulo that group's size); a batch of one group has no donor.
    With ``input_ids`` and ``span_mask`` (``[B, L]``), a candidate whose span holds the same tokens as the row's own is
    passed over for the next one, and a row that only such candidates could serve gets ``−1``: an identical span
    would make ``ℓ° = ℓ``, a signal of exactly 0 that says nothing (as responses of one prompt converge, more of
    them perceive the same facts), where ``−1`` leaves the row's reasoning tokens without a signal.
    Deterministic, so a step is reproducible and no random stream is consumed.
    """
    require_tensor("counterfactual_donors", "group_ids", group_ids, kind="int", ndim=1)
    if source not in DONOR_SOURCES:
        raise ValueError(f"counterfactual_donors: `source` must be one of {DONOR_SOURCES}, got {brief(source)}")
    g = group_ids.tolist()
    if (input_ids is None) != (span_mask is None):
        raise ValueError("counterfactual_donors: give `input_ids` and `span_mask` together, or neither")
    if input_ids is not None:
        require_same_shape("counterfactual_donors", "input_ids", input_ids, span_mask=span_mask)
        if input_ids.shape[0] != len(g):
            raise ValueError(f"counterfactual_donors: `input_ids` must have B = {len(g)} rows, got "
                             f"{describe(input_ids)}")
        spans = [tuple(row[m].tolist()) for row, m in zip(input_ids, span_mask.bool(), strict=True)]
    else:
        spans = [None] * len(g)
    members: dict[int, list[int]] = {}
    for i, x in enumerate(g):
        members.setdefault(x, []).append(i)
    order = list(members)

    def first_different(i: int, candidates: list[int]) -> int:
        return next((c for c in candidates if c != i and (spans[i] is None or spans[c] != spans[i])), -1)

    donor = [-1] * len(g)
    for k, x in enumerate(order):
        rows = members[x]
        for r, i in enumerate(rows):
            if source == "group":
                donor[i] = first_different(i, rows[r + 1:] + rows[:r])
            elif len(order) > 1:
                other = members[order[(k + 1) % len(order)]]
                donor[i] = first_different(i, other[r % len(other):] + other[:r % len(other)])
    return torch.tensor(donor, dtype=torch.int64, device=group_ids.device)


@dataclasses.dataclass
class AblatedBatch:
    """The ablated batch and its index map.

    - ``input_ids``, ``attention_mask``: ``[B, L']``, ``L'`` the longest row's kept count (padding is kept, since it
      is not in the span); ``L' = L`` in ``mask`` mode.
    - ``index``: ``int64 [B, L]``, position of each original token in the ablated row; ``−1`` inside the span.
    - ``position_ids``: ``int64 [B, L]`` original 1-D positions (``mask`` mode), ``None`` in ``drop`` mode.
    - ``mode``: one of :data:`ABLATION_MODES`.
    - ``source``: ``counterfactual`` only, ``int64 [B, L', 2]``: (row, column) of the original batch each ablated
      position is copied from (``−1`` for padding); ``None`` otherwise.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    position_ids: torch.Tensor | None
    mode: str
    source: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        """``bool [B, L]``: the original tokens that get a value from the ablated pass."""
        return self.index >= 0

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
        if self.source is not None:
            row, col = self.source[..., 0].to(x.device), self.source[..., 1].to(x.device)
            got = x[row.clamp(min=0), col.clamp(min=0)]
            pad = (col < 0).view(*col.shape, *([1] * (x.dim() - 2)))
            return got.masked_fill(pad, pad_value)
        out = x.new_full((x.shape[0], self.input_ids.shape[1], *x.shape[2:]), pad_value)
        b, j = torch.nonzero(self.index >= 0, as_tuple=True)
        out[b, self.index[b, j].to(x.device)] = x[b, j]
        return out


def ablate_span(input_ids: torch.Tensor, attention_mask: torch.Tensor, span_mask: torch.Tensor, *,
                mode: str = "mask", pad_token_id: int = 0, tags_mask: torch.Tensor | None = None,
                donor: torch.Tensor | None = None) -> AblatedBatch:
    """Hide the ``span_mask`` tokens from attention (``mask``), remove them (``drop``), or replace them by another
    row's span (``counterfactual``).

    Args:
        input_ids: ``int [B, L]``.
        attention_mask: ``[B, L]`` (0/1 integers or bool).
        span_mask: ``bool [B, L]``, the tokens to ablate (e.g. ``roles == Role.PERCEPTION`` placed at the completion
            positions).
        mode: ``"mask"`` | ``"drop"`` | ``"counterfactual"`` (:data:`ABLATION_MODES`).
        pad_token_id: an int, fills the right padding of rebuilt rows (``drop``, ``counterfactual``).
        tags_mask: optional ``bool [B, L]``, the tag tokens around each span (e.g. ``<perception>`` and
            ``</perception>``), ablated too when given. By default the tags stay in the context, so the ablated pass
            still sees an (empty) ``<perception></perception>``; see ``docs/decisions.md`` D116. In
            ``counterfactual`` mode the tags stay whatever ``tags_mask`` says (a replaced span keeps its own tags).
        donor: ``int [B]``, ``counterfactual`` only (required there): the row whose span replaces each row's
            (:func:`counterfactual_donors`), ``−1`` for none.

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
    if mode not in ABLATION_MODES:
        raise ValueError(f"{OP}: `mode` must be one of {ABLATION_MODES}, got {brief(mode)}")
    if (donor is None) != (mode != "counterfactual"):
        raise ValueError(f"{OP}: `donor` is required with mode='counterfactual' and only then, got "
                         f"{describe(donor)} with mode={brief(mode)}")
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
    if mode == "counterfactual":
        require_tensor(OP, "donor", donor, kind="int", ndim=1)
        if donor.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{OP}: `donor` must be [B] with B = {input_ids.shape[0]}, got {describe(donor)}")
        if bool(((donor < -1) | (donor >= input_ids.shape[0])).any()):
            bad = (donor < -1) | (donor >= input_ids.shape[0])
            raise ValueError(f"{OP}: `donor` must hold row indices in [-1, {input_ids.shape[0] - 1}], got "
                             f"{int(donor[bad][0])} at {first_true_index(bad)}")
        return _counterfactual(input_ids, attention_mask, span_mask, donor.to(input_ids.device), pad_token_id)
    keep = ~span_mask
    index = torch.where(keep, torch.cumsum(keep.to(torch.int64), dim=1) - 1, -1)
    if mode == "mask":
        valid = attention_mask.bool()
        position_ids = (torch.cumsum(valid.to(torch.int64), dim=1) - 1).clamp(min=0)
        index = torch.where(keep, torch.arange(input_ids.shape[1], device=input_ids.device), -1)
        index = index.masked_fill(follows_hidden(span_mask, valid), -1)  # read from a hidden row (D180)
        new_mask = (valid & keep).to(attention_mask.dtype)
        return AblatedBatch(input_ids.clone(), new_mask, index, position_ids, mode)
    new_len = int(keep.sum(dim=1).max()) if input_ids.shape[0] else input_ids.shape[1]
    new_ids = input_ids.new_full((input_ids.shape[0], new_len), pad_token_id)
    new_mask = attention_mask.new_zeros((input_ids.shape[0], new_len))
    b, j = torch.nonzero(keep, as_tuple=True)
    new_ids[b, index[b, j]] = input_ids[b, j]
    new_mask[b, index[b, j]] = attention_mask[b, j]
    return AblatedBatch(new_ids, new_mask, index, None, mode)


def _counterfactual(input_ids, attention_mask, span_mask, donor, pad_token_id) -> AblatedBatch:
    """Each row with its span run ``[s, e)`` replaced by its donor's run ``[s', e')``; later tokens keep their offset
    from the span's end. One small loop over rows (B is a batch of responses), tensor ops within a row."""
    B, L = input_ids.shape
    valid = attention_mask.bool()
    has = span_mask.any(dim=1).tolist()
    pos = torch.arange(L, device=input_ids.device)
    first = torch.where(span_mask, pos, L).amin(dim=1).tolist() if L else [0] * B
    last = torch.where(span_mask, pos, -1).amax(dim=1).tolist() if L else [-1] * B
    end_valid = torch.where(valid, pos + 1, 0).amax(dim=1).tolist() if L else [0] * B
    index = torch.full((B, L), -1, dtype=torch.int64, device=input_ids.device)
    rows = []  # per row: the (source row, source column) of each position of the rebuilt row, [n, 2]

    def piece(r, lo, hi):
        cols = torch.arange(lo, hi, dtype=torch.int64, device=input_ids.device)
        return torch.stack([torch.full_like(cols, r), cols], dim=1)

    for b in range(B):
        d = int(donor[b])
        if not has[b]:  # nothing to replace: the row as it is
            src = piece(b, 0, end_valid[b])
            index[b, :end_valid[b]] = pos[:end_valid[b]]
        elif d < 0:  # no donor: the row unchanged, no value from the span on
            src = piece(b, 0, end_valid[b])
            index[b, :first[b]] = pos[:first[b]]
        else:
            s, e = first[b], last[b] + 1
            ds, de = (first[d], last[d] + 1) if has[d] else (0, 0)
            shift = s + (de - ds) - e
            src = torch.cat([piece(b, 0, s), piece(d, ds, de), piece(b, e, end_valid[b])])
            index[b, :s] = pos[:s]
            index[b, e:end_valid[b]] = pos[e:end_valid[b]] + shift
        rows.append(src)
    index = torch.where(span_mask, -1, index)
    new_len = max((len(r) for r in rows), default=L)
    source = torch.full((B, new_len, 2), -1, dtype=torch.int64, device=input_ids.device)
    for b, src in enumerate(rows):
        source[b, :len(src)] = src
    row, col = source[..., 0].clamp(min=0), source[..., 1].clamp(min=0)
    pad = source[..., 1] < 0
    new_ids = input_ids[row, col].masked_fill(pad, pad_token_id)
    new_mask = attention_mask[row, col].masked_fill(pad, 0)
    return AblatedBatch(new_ids, new_mask, index, None, "counterfactual", source)
