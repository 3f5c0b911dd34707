"""SRPO's extra teacher-forced passes at the positions each signal needs (issue 24), shared by the adapters.

A full pass through a trainer's log-prob function runs the whole prompt and completion through the decoder and the
LM head over every completion token. Each signal needs less:

- ``ℓ̃`` (corrupted image) is read on perception tokens, ``ℓ°`` (ablated span) on reasoning tokens: attention is
  causal, so a pass can stop at the last needed token of its rows (:func:`hidden_states` cuts each row chunk after
  the last position whose hidden state is read, i.e. the row *before* the last needed token; never before the last
  image/video placeholder, so the multimodal inputs stay whole);
- the LM head is needed only at those positions: the decoder (the model's ``base_model``, no head) gives last hidden
  states, and :func:`srpo_core.linear_token_logprobs` takes the log-prob of each needed token from the hidden state
  of the row before it through the model's own head (``get_output_embeddings()``), with the temperature and the
  logit scaling / soft-capping its config declares (read as TRL's fused LM head reads them), never materialising
  ``[N, V]`` logits;
- ``perception_contrast="kl"|"js"`` compares the clean and corrupted hidden states at the perception positions with
  :func:`srpo_core.linear_token_contrast` (:func:`contrast`).

Functions: :func:`lm_head` (what the head computes, or a refusal), :func:`hidden_states`, :func:`token_logprobs`
(``ℓ̃`` or ``ℓ`` at a mask of positions), :func:`ablated_logprobs` (``ℓ°`` for every mode of
:func:`srpo_core.ablation.ablate_span`: ``mask`` with the original positions, M-RoPE included, ``drop`` and
``counterfactual`` with the positions of the rebuilt rows; :func:`ablated_batch_logprobs` on an ablated batch built
elsewhere) and :func:`contrast`. Results equal the full passes up to
floating-point rounding (tests/test_passes.py); what cannot be honoured is refused with a ``ValueError``, never
computed differently.

Batches are ``input_ids, attention_mask: [B, L]`` (any left/right padding), ``model_kwargs``: the model's other
inputs (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` …; the keys of :data:`PER_POSITION_KEYS` are
``[B, L]`` and are cut and ablated with the ids), optional ``position_ids`` ``[B, L]`` or ``[k, B, L]`` (M-RoPE).
``batch_size`` runs the rows in chunks of that many (each chunk cut at its own last needed token), slicing the
multimodal inputs as TRL's ``_get_per_token_logps_and_entropies`` does (``num_images`` / ``num_tiles``).

With several processes, ``on_any_process`` (``flag -> bool``, e.g. a MAX all-reduce over the processes) makes the
decision to skip a chunk without a needed token a joint one: a chunk then runs on every process as soon as one needs
it, so every process runs the same forwards (a model whose forward gathers sharded parameters would otherwise hang;
the processes must hold the same number of rows, as TRL's do).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses

import torch

from srpo_core._validate import (
    brief,
    describe,
    first_true_index,
    require_same_device,
    require_same_shape,
    require_tensor,
)
from srpo_core.ablation import AblatedBatch, ablate_span
from srpo_core.ops.linear_token_contrast import linear_token_contrast
from srpo_core.ops.linear_token_logprobs import linear_token_logprobs
from srpo_core.ops.token_contrast import TokenContrast

AnyProcess = collections.abc.Callable[[bool], bool]

OP = "srpo_core.passes"
# [B, L] model inputs that follow the tokens: cut with input_ids and ablated like them.
PER_POSITION_KEYS = ("token_type_ids", "mm_token_type_ids")
# Config fields naming the placeholder token of an image / video (never cut off).
_MM_TOKEN_FIELDS = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")


# ----------------------------------------------------------------------------------------------------------- the head
@dataclasses.dataclass(frozen=True)
class LMHead:
    """The model's LM head as the ops read it: ``logits = f(hidden @ weightᵀ + bias) / temperature`` with
    ``f(x) = logit_scale·x``, or ``softcap·tanh(logit_scale·x / softcap)`` when ``softcap`` is set."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    temperature: float
    logit_scale: float = 1.0
    softcap: float | None = None


def _unwrap(model):
    """The transformers model under a PEFT wrapper (its LoRA layers stay in the modules)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _config_scaling(model) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` the text config declares, read as TRL 1.16's ``add_fused_lm_head`` reads them."""
    config = model.config
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), softcap


def lm_head(model, temperature: float = 1.0) -> LMHead:
    """The head of ``model`` (``get_output_embeddings()``) and the transform its config declares; a ``ValueError``
    for a head the ops cannot read exactly: none, not a plain ``nn.Linear`` (e.g. a LoRA-wrapped head), a sharded
    weight (DTensor, DeepSpeed ZeRO-3 partition), or a logit scale ``≤ 0``."""
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = type(inner).__name__
    if head is None:
        raise ValueError(f"{OP}: {name} has no output embeddings (get_output_embeddings() is None), so the pass "
                         "runner cannot compute log-probs from its hidden states")
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"{OP}: {name}'s LM head is a {type(head).__name__}, not a plain torch.nn.Linear; the pass "
                         "runner reads `weight` and `bias` directly and would skip what that module adds")
    weight, bias = head.weight, head.bias
    for what, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if type(t).__name__ == "DTensor" or hasattr(t, "ds_status") or t.dim() == 0 or t.numel() == 0:
            raise ValueError(f"{OP}: {name}'s LM head {what} is sharded or partitioned ({type(t).__name__}, shape "
                             f"{tuple(t.shape)}); the pass runner needs the whole [V, H] head on one device: gather "
                             "it or run the full passes")
    scale, softcap = _config_scaling(inner)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{OP}: {name}'s config declares a logit scale of {brief(scale)}; the pass runner "
                         "supports a positive one only")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or
                                not softcap > 0):
        raise ValueError(f"{OP}: {name}'s config declares final_logit_softcapping={brief(softcap)}; expected a "
                         "positive number or None")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{OP}: `temperature` must be a positive number, got {brief(temperature)}")
    return LMHead(weight, bias, float(temperature), float(scale), None if softcap is None else float(softcap))


def head_logprobs(head: LMHead, hidden: torch.Tensor, ids: torch.Tensor, *, fp32: bool = False) -> torch.Tensor:
    """``float32 [K]``: log-prob of ``ids [K]`` from ``hidden [K, H]`` through ``head`` (``fp32``: the head runs in
    float32 outside autocast, TRL's ``cast_lm_head_to_fp32``)."""
    weight, bias = head.weight, head.bias
    hidden = hidden.to(weight.device)
    ids = ids.to(weight.device)
    if fp32:
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_token_logprobs(hidden.float(), weight.float(), ids,
                                         bias=None if bias is None else bias.float(), temperature=head.temperature,
                                         logit_scale=head.logit_scale, softcap=head.softcap)
    return linear_token_logprobs(hidden, weight, ids, bias=bias, temperature=head.temperature,
                                 logit_scale=head.logit_scale, softcap=head.softcap)


# ------------------------------------------------------------------------------------------------------ the decoder
def _backbone(model):
    inner = _unwrap(model)
    base = getattr(inner, "base_model", None)
    if base is None or base is inner:
        raise ValueError(f"{OP}: {type(inner).__name__} has no decoder under its LM head (`base_model` is the model "
                         "itself), so the pass runner cannot read last hidden states without the head")
    return base


def _mm_token_ids(model) -> list[int]:
    config = _unwrap(model).config
    ids = [getattr(config, f, None) for f in _MM_TOKEN_FIELDS]
    return sorted({int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool)})


def _check_batch(input_ids, attention_mask, needed, position_ids):
    require_tensor(OP, "input_ids", input_ids, kind="int", ndim=2)
    require_tensor(OP, "attention_mask", attention_mask, ndim=2)
    require_tensor(OP, "needed", needed, kind="bool", ndim=2)
    require_same_shape(OP, "input_ids", input_ids, attention_mask=attention_mask, needed=needed)
    require_same_device(OP, "input_ids", input_ids, attention_mask=attention_mask, needed=needed)
    if input_ids.shape[1] and bool(needed[:, 0].any()):
        raise ValueError(f"{OP}: `needed` must be False in column 0 (the first token has no row before it to be "
                         f"predicted from), got True at row {int(torch.nonzero(needed[:, 0])[0, 0])}")
    pad = needed & ~attention_mask.bool()
    if bool(pad.any()):
        raise ValueError(f"{OP}: `needed` must be False where `attention_mask` is 0 (padding has no log-prob), got "
                         f"{int(pad.sum())} such position(s); first at index {first_true_index(pad)}")
    if position_ids is not None:
        require_tensor(OP, "position_ids", position_ids, kind="int", ndim=(2, 3))
        if tuple(position_ids.shape[-2:]) != tuple(input_ids.shape):
            raise ValueError(f"{OP}: `position_ids` must be [B, L] or [k, B, L] with [B, L] = "
                             f"{list(input_ids.shape)}, got {describe(position_ids)}")


def _row_slicer(model_kwargs: dict, batch: int, num_images, num_tiles):
    """``slice(start, end) -> kwargs`` of rows ``[start, end)``, as TRL's ``_get_per_token_logps_and_entropies``
    slices its chunks (Qwen-VL ``pixel_values`` rows by ``image_grid_thw``, per-image or per-tile tensors, per-row
    tensors)."""
    kw = dict(model_kwargs)
    pv, grid = kw.pop("pixel_values", None), kw.pop("image_grid_thw", None)
    pos_ids, shapes = kw.pop("image_position_ids", None), kw.pop("spatial_shapes", None)
    pam, sizes = kw.pop("pixel_attention_mask", None), kw.pop("image_sizes", None)
    if pv is not None and num_images is None and num_tiles is None:
        num_images = [1] * batch if grid is None or grid.shape[0] == batch else None
        if num_images is None:
            raise ValueError(f"{OP}: `num_images` is needed to split `pixel_values` over row chunks "
                             f"(image_grid_thw has {grid.shape[0]} images for {batch} rows); pass it, or "
                             "batch_size=None")
    cum_img = torch.tensor([0] + list(num_images)).cumsum(0).tolist() if num_images is not None else None
    cum_tiles = torch.tensor([0] + list(num_tiles)).cumsum(0).tolist() if num_tiles is not None else None
    cum_rows = None
    if grid is not None and pv is not None:
        per_sample = [int(s.sum()) for s in torch.split(grid.prod(dim=-1), list(num_images))]
        cum_rows = torch.tensor([0] + per_sample).cumsum(0).tolist()

    def slice_rows(start: int, end: int) -> dict:
        out = {k: (v[start:end] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v)
               for k, v in kw.items()}
        if pv is not None:
            if cum_rows is not None:
                out["pixel_values"] = pv[cum_rows[start]:cum_rows[end]]
                out["image_grid_thw"] = grid[cum_img[start]:cum_img[end]]
            elif pos_ids is not None:
                out["pixel_values"] = pv[cum_img[start]:cum_img[end]]
                out["image_position_ids"] = pos_ids[cum_img[start]:cum_img[end]]
            elif shapes is not None:
                t0, t1 = cum_tiles[start], cum_tiles[end]
                out["pixel_values"], out["spatial_shapes"] = pv[t0:t1], shapes[t0:t1]
                out["pixel_attention_mask"] = pam[t0:t1]
            elif cum_tiles is not None:
                out["pixel_values"] = pv[cum_tiles[start]:cum_tiles[end]]
            elif cum_img is not None and pv.shape[0] == cum_img[-1]:
                out["pixel_values"] = pv[cum_img[start]:cum_img[end]]
            else:
                out["pixel_values"] = pv[start:end]
        if pam is not None and shapes is None:
            out["pixel_attention_mask"] = pam[start:end]
        if sizes is not None:
            out["image_sizes"] = sizes[cum_img[start]:cum_img[end]] if cum_img is not None else sizes[start:end]
        return out

    return slice_rows


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, needed: torch.Tensor, *,
                  model_kwargs: dict | None = None, position_ids: torch.Tensor | None = None,
                  batch_size: int | None = None, num_images=None, num_tiles=None,
                  on_any_process: AnyProcess | None = None) -> torch.Tensor:
    """``[K, H]``: the decoder's last hidden state of the row before each needed token (``K = needed.sum()``, in
    ``needed.nonzero()`` order), from a forward cut after that row (causal attention makes the cut exact).

    Rows run in chunks of ``batch_size`` (all at once when None); a chunk without a needed token is not run, unless
    ``on_any_process(False)`` says another process runs it (then it runs cut after its last image placeholder, at
    least one position, and gives no row). The cut never falls before a chunk's last image/video placeholder (the
    config's ``image_token_id`` / ``video_token_id``, nonzero :data:`PER_POSITION_KEYS`), so every image's features
    still have their tokens.
    """
    _check_batch(input_ids, attention_mask, needed, position_ids)
    model_kwargs = dict(model_kwargs or {})
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or
                                   batch_size < 1):
        raise ValueError(f"{OP}: `batch_size` must be a positive int or None, got {brief(batch_size)}")
    backbone = _backbone(model)
    B, L = input_ids.shape
    step = max(1, B if batch_size is None else min(batch_size, B))
    per_pos = {k: model_kwargs.pop(k) for k in PER_POSITION_KEYS if model_kwargs.get(k) is not None}
    for k, v in per_pos.items():
        if tuple(v.shape[:2]) != (B, L):
            raise ValueError(f"{OP}: `{k}` must be [B, L] = {[B, L]} like `input_ids`, got {describe(v)}")
    slicer = _row_slicer(model_kwargs, B, num_images, num_tiles) if step < B else (lambda s, e: dict(model_kwargs))
    mm = torch.zeros_like(needed)
    for t in _mm_token_ids(model):
        mm |= input_ids == t
    for v in per_pos.values():
        mm |= v != 0
    cols = torch.arange(L, device=input_ids.device)
    outs = []
    for start in range(0, B, step):
        end = min(start + step, B)
        need = needed[start:end]
        any_needed = bool(need.any())
        if not (any_needed if on_any_process is None else on_any_process(any_needed)):
            continue
        last_needed = int(torch.where(need, cols, -1).max())  # its row, last_needed − 1, is the last one read
        last_mm = int(torch.where(mm[start:end], cols, -1).max())
        cut = max(last_needed, last_mm + 1, 1)  # ≥ 1: a chunk run only for another process's sake
        kwargs = slicer(start, end)
        kwargs.update({k: v[start:end, :cut] for k, v in per_pos.items()})
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[..., start:end, :cut]
        out = backbone(input_ids=input_ids[start:end, :cut], attention_mask=attention_mask[start:end, :cut],
                       use_cache=False, **kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise ValueError(f"{OP}: {type(backbone).__name__}'s forward returned no `last_hidden_state`")
        b, j = torch.nonzero(need[:, :cut + 1], as_tuple=True)
        outs.append(hidden[b, j - 1])
    if not outs:  # nothing needed: no forward at all
        head = _unwrap(model).get_output_embeddings()
        width = head.weight.shape[1] if isinstance(head, torch.nn.Linear) else 0
        return torch.zeros(0, width, device=input_ids.device)
    return torch.cat(outs)


def _scatter(values: torch.Tensor, needed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    out = torch.full(needed.shape, fill, dtype=values.dtype, device=values.device)
    out[needed.to(values.device)] = values
    return out


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, needed: torch.Tensor, *,
                   temperature: float = 1.0, model_kwargs: dict | None = None,
                   position_ids: torch.Tensor | None = None, batch_size: int | None = None, num_images=None,
                   num_tiles=None, head_fp32: bool = False, on_any_process: AnyProcess | None = None) -> torch.Tensor:
    """``float32 [B, L]``: ``log π(input_ids[b, j] | row j − 1)`` at each ``needed`` position, 0 elsewhere; the
    forward cut after the last needed token (:func:`hidden_states`), the head applied only there
    (:func:`head_logprobs`). ``ℓ̃``: pass the corrupted ``pixel_values`` in ``model_kwargs``."""
    head = lm_head(model, temperature)
    h = hidden_states(model, input_ids, attention_mask, needed, model_kwargs=model_kwargs, position_ids=position_ids,
                      batch_size=batch_size, num_images=num_images, num_tiles=num_tiles,
                      on_any_process=on_any_process)
    if h.shape[0] == 0:
        return torch.zeros(needed.shape, dtype=torch.float32, device=input_ids.device)
    logp = head_logprobs(head, h, input_ids[needed], fp32=head_fp32)
    return _scatter(logp.float(), needed.to(logp.device))


def original_position_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          model_kwargs: dict | None = None) -> torch.Tensor:
    """The positions a batch's tokens have in the full pass, for ``mask`` ablation (which hides the span but keeps
    them): M-RoPE ids from the model's ``get_rope_index`` when it has one and the batch has images (``[3, B, L]``),
    else ``cumsum(attention_mask) − 1`` (``[B, L]``)."""
    kw = model_kwargs or {}
    rope = next((m.get_rope_index for m in _unwrap(model).modules() if hasattr(m, "get_rope_index")), None)
    if rope is not None and kw.get("image_grid_thw") is not None:
        pos, _ = rope(input_ids, mm_token_type_ids=kw.get("mm_token_type_ids"), image_grid_thw=kw["image_grid_thw"],
                      attention_mask=attention_mask)
        return pos
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def ablated_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, span: torch.Tensor,
                     needed: torch.Tensor, *, mode: str, donor: torch.Tensor | None = None, pad_token_id: int = 0,
                     tags_mask: torch.Tensor | None = None, temperature: float = 1.0,
                     model_kwargs: dict | None = None, batch_size: int | None = None, num_images=None,
                     num_tiles=None, head_fp32: bool = False,
                     on_any_process: AnyProcess | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ℓ° float32 [B, L], has_value bool [B, L])``: the log-prob of each ``needed`` token with ``span`` ablated
    (:func:`srpo_core.ablation.ablate_span`, ``mode`` ``mask`` / ``drop`` / ``counterfactual`` with ``donor``),
    on the original positions; the ablated rows are run up to their last needed token. ``has_value`` is the ablated
    batch's ``valid`` (False on the span, on the token after a masked span, D180, and from the span on in a row
    without donor); ``ℓ°`` is 0 where ``needed & has_value`` is False. ``mask`` keeps the original positions (M-RoPE
    from :func:`original_position_ids`); ``drop`` and ``counterfactual`` let the model compute those of the rebuilt
    rows, as the full pass does. An ablated batch built otherwise (e.g. counterfactual donors chosen over several
    processes' rows): :func:`ablated_batch_logprobs`."""
    model_kwargs = dict(model_kwargs or {})
    ab: AblatedBatch = ablate_span(input_ids, attention_mask, span, mode=mode, pad_token_id=pad_token_id,
                                   tags_mask=tags_mask, donor=donor)
    require_tensor(OP, "needed", needed, kind="bool", ndim=2)
    require_same_shape(OP, "input_ids", input_ids, needed=needed)
    for k in PER_POSITION_KEYS:
        if model_kwargs.get(k) is not None:
            model_kwargs[k] = ab.ablate(model_kwargs[k])
    position_ids = None
    if ab.mode == "mask":
        position_ids = original_position_ids(model, input_ids, attention_mask, model_kwargs)
    return ablated_batch_logprobs(model, ab, needed, temperature=temperature, model_kwargs=model_kwargs,
                                  position_ids=position_ids, batch_size=batch_size, num_images=num_images,
                                  num_tiles=num_tiles, head_fp32=head_fp32, on_any_process=on_any_process)


def ablated_batch_logprobs(model, ab: AblatedBatch, needed: torch.Tensor, *, temperature: float = 1.0,
                           model_kwargs: dict | None = None, position_ids: torch.Tensor | None = None,
                           batch_size: int | None = None, num_images=None, num_tiles=None, head_fp32: bool = False,
                           on_any_process: AnyProcess | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ablated_logprobs` on an ablated batch ``ab`` already built (``needed: bool [B, L]`` on the original
    positions, ``ab.index``'s shape); ``model_kwargs``' :data:`PER_POSITION_KEYS` must already be ablated
    (``[B, L']`` like ``ab.input_ids``), ``position_ids`` are those of the ablated rows (None: the model's own)."""
    if not isinstance(ab, AblatedBatch):
        raise ValueError(f"{OP}: `ab` must be an srpo_core.ablation.AblatedBatch, got {describe(ab)}")
    require_tensor(OP, "needed", needed, kind="bool", ndim=2)
    if tuple(needed.shape) != tuple(ab.index.shape):
        raise ValueError(f"{OP}: `needed` must be [B, L] = {list(ab.index.shape)} like the ablated batch's index, "
                         f"got {describe(needed)}")
    take = needed.to(ab.index.device) & ab.valid
    needed_ab = torch.zeros(ab.input_ids.shape, dtype=torch.bool, device=ab.index.device)
    b, j = torch.nonzero(take, as_tuple=True)
    needed_ab[b, ab.index[b, j]] = True
    values = token_logprobs(model, ab.input_ids, ab.attention_mask, needed_ab, temperature=temperature,
                            model_kwargs=model_kwargs, position_ids=position_ids, batch_size=batch_size,
                            num_images=num_images, num_tiles=num_tiles, head_fp32=head_fp32,
                            on_any_process=on_any_process)
    full = ab.gather(values)
    return full.masked_fill(~take.to(full.device), 0.0), ab.valid


def contrast(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, needed: torch.Tensor,
             corrupted_kwargs: dict, *, kind: str = "kl", temperature: float = 1.0,
             model_kwargs: dict | None = None, position_ids: torch.Tensor | None = None,
             batch_size: int | None = None, num_images=None, num_tiles=None, head_fp32: bool = False,
             clean_hidden: torch.Tensor | None = None, on_any_process: AnyProcess | None = None) -> TokenContrast:
    """``TokenContrast(div, logp, logp_ref)``, each ``float32 [B, L]`` (0 outside ``needed``): per needed token the
    ``kind`` (``"kl"`` ``KL(p ‖ p̃)`` or ``"js"``) between the clean next-token distribution ``p`` and the one with
    ``corrupted_kwargs`` replacing model inputs (``{"pixel_values": corrupted}``), and both sampled-token log-probs
    (``ℓ``, ``ℓ̃``), from the two passes' hidden states through :func:`srpo_core.linear_token_contrast`. Both passes
    are cut after the last needed token; ``clean_hidden`` (``[K, H]`` at ``needed``, e.g. a subset of a clean
    :func:`hidden_states` the caller already ran) skips the clean pass. A config logit scale folds into the
    temperature; a soft-capped head is refused (``linear_token_contrast`` has no soft-cap)."""
    head = lm_head(model, temperature)
    if head.softcap is not None:
        raise ValueError(f"{OP}: a '{kind}' contrast from hidden states cannot apply the model's "
                         f"final_logit_softcapping={head.softcap} (linear_token_contrast has no soft-cap); use a "
                         "log-prob contrast ('k3', 'logratio') for this model")
    if not isinstance(corrupted_kwargs, dict) or not corrupted_kwargs:
        raise ValueError(f"{OP}: `corrupted_kwargs` must be a non-empty dict of the model inputs that differ in the "
                         f"corrupted pass (e.g. pixel_values), got {describe(corrupted_kwargs)}")
    model_kwargs = dict(model_kwargs or {})
    common = dict(position_ids=position_ids, batch_size=batch_size, num_images=num_images, num_tiles=num_tiles,
                  on_any_process=on_any_process)
    if clean_hidden is None:
        clean_hidden = hidden_states(model, input_ids, attention_mask, needed, model_kwargs=model_kwargs, **common)
    elif clean_hidden.dim() != 2 or clean_hidden.shape[0] != int(needed.sum()):
        raise ValueError(f"{OP}: `clean_hidden` must be [K, H] with K = needed.sum() = {int(needed.sum())}, got "
                         f"{describe(clean_hidden)}")
    corrupt = hidden_states(model, input_ids, attention_mask, needed, model_kwargs={**model_kwargs,
                                                                                    **corrupted_kwargs}, **common)
    zeros = torch.zeros(needed.shape, dtype=torch.float32, device=input_ids.device)
    if corrupt.shape[0] == 0:
        return TokenContrast(zeros, zeros.clone(), zeros.clone())
    weight, bias = head.weight, head.bias
    h, h_ref = clean_hidden.to(weight.device), corrupt.to(weight.device)
    ctx = torch.autocast(h.device.type, enabled=False) if head_fp32 else contextlib.nullcontext()
    with ctx:
        if head_fp32:
            h, h_ref, weight = h.float(), h_ref.float(), weight.float()
            bias = None if bias is None else bias.float()
        res = linear_token_contrast(h, h_ref, weight, input_ids[needed].to(weight.device), kind=kind,
                                    temperature=head.temperature / head.logit_scale, bias=bias)
    mask = needed.to(weight.device)
    return TokenContrast(*(_scatter(x.float(), mask) for x in res))


__all__ = ["LMHead", "PER_POSITION_KEYS", "ablated_batch_logprobs", "ablated_logprobs", "contrast", "head_logprobs",
           "hidden_states", "lm_head", "original_position_ids", "token_logprobs"]
