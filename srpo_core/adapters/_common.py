"""Glue shared by the verl, EasyR1 and OpenRLHF adapters: plain torch and numpy, no framework import.

The adapters all do the same three things around a trainer's own code:
1. produce SRPO's inputs: roles of the response tokens, a corrupted copy of the images, an ablated copy of the
   responses (:func:`corrupt_multi_modal_inputs`, :func:`perception_span_hidden`, :func:`realign_compact`);
2. read the trainer's sequence-level advantage back from its ``[B, T]`` token tensor (:func:`sequence_advantages`)
   and its prompt groups from string uids (:func:`group_ids`);
3. refine it into per-token advantages with SRPO or the VPPO preset (:func:`refine_advantages`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from srpo_core._validate import brief, describe
from srpo_core.ablation import DEFAULT_ABLATION_MODE, ablate_span, counterfactual_donors
from srpo_core.adapters import _options
from srpo_core.config import Role, SRPOConfig

ESTIMATORS = ("srpo", "vppo")
KEY_LOGP_CORRUPT = "srpo_logp_corrupt"
KEY_LOGP_ABLATED = "srpo_logp_ablated"
KEY_ROLES = "srpo_roles"
KEY_METRICS = "srpo_metrics"
KEY_ABLATED_VALID = "srpo_ablated_valid"
# generator seeds are derived from the option `seed` and reduced modulo this, so any seed >= 0 is a valid torch seed
SEED_MODULUS = 2**63


@dataclasses.dataclass(frozen=True)
class AdapterOptions:
    """What an adapter needs beyond :class:`SRPOConfig`: the options every adapter shares (``_options.SHARED``; the
    TRL trainer's :class:`SRPOTrainerOptions` has the same names, checked by the same code).

    - ``corruption_mode``, ``corruption_p``: :func:`srpo_core.corruption.corrupt_pixel_values`'s ``mode`` and ``p``
      (``"black"``, 0.5).
    - ``seed``: base seed of the corruption masks (one generator per prompt group, so a group shares its mask).
    - ``ablation_mode``: the reasoning contrast's ablated pass, one of :data:`srpo_core.ablation.ABLATION_MODES`
      (default :data:`srpo_core.ablation.DEFAULT_ABLATION_MODE`, the one constant every adapter reads) or ``"off"``
      (no ablated pass: the reasoning tokens carry no signal and are scored like OTHER tokens).
    - ``counterfactual_source``: ``"group"`` | ``"other"``, :func:`srpo_core.ablation.counterfactual_donors`.
    - ``vppo_beta_min``, ``vppo_top_k``: the VPPO preset's knobs.

    Build it from a trainer's config with :meth:`from_mapping` (flat keys: these names or :class:`SRPOConfig`
    fields), which names the user's spelling of a key in its errors. The old names ``corrupt_mode``, ``corrupt_p``
    and ``ablate`` are read there for one release, with a warning; as attributes they still read, with a warning.
    """

    srpo: SRPOConfig = SRPOConfig()
    corruption_mode: str = "black"
    corruption_p: float = 0.5
    seed: int = 0
    ablation_mode: str = DEFAULT_ABLATION_MODE
    counterfactual_source: str = "group"
    vppo_beta_min: float = 0.9
    vppo_top_k: float = 0.4

    def __post_init__(self) -> None:
        if not isinstance(self.srpo, SRPOConfig):
            raise TypeError(f"AdapterOptions: `srpo` must be an srpo_core.SRPOConfig, got {brief(self.srpo)}")
        _options.check_fields(self, "AdapterOptions")

    @property
    def ablate(self) -> bool:
        """Deprecated: ``ablation_mode != "off"``."""
        _deprecated_attribute("ablate", "ablation_mode != 'off'")
        return self.ablation_mode != _options.ABLATION_OFF

    @property
    def corrupt_p(self) -> float:
        """Deprecated: :attr:`corruption_p`."""
        _deprecated_attribute("corrupt_p", "corruption_p")
        return self.corruption_p

    @property
    def corrupt_mode(self) -> str:
        """Deprecated: :attr:`corruption_mode`."""
        _deprecated_attribute("corrupt_mode", "corruption_mode")
        return self.corruption_mode

    @property
    def ablates(self) -> bool:
        """Whether the ablated pass runs (``ablation_mode != "off"``)."""
        return self.ablation_mode != _options.ABLATION_OFF

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, *, where: str = "srpo adapter options",
                     spell=None) -> AdapterOptions:
        """Options from one flat mapping (a trainer's config section), every value parsed and checked now.

        ``spell(name)`` gives the user's spelling of a key for the messages (default: the key itself), e.g.
        ``lambda k: f"algorithm.srpo.{k}"`` for verl's Hydra keys; ``where`` starts each message.
        """
        if isinstance(mapping, AdapterOptions):
            return mapping
        srpo, shared = _options.read_options(mapping, where=where, spell=spell or str)
        return cls(srpo=srpo, **shared)


def _deprecated_attribute(old: str, new: str) -> None:
    warnings.warn(f"AdapterOptions.{old} is deprecated and will be removed in the next release; use {new}",
                  _options.OptionDeprecationWarning, stacklevel=3)


def require_ablation_mode(adapter: str, options: AdapterOptions, supported: tuple[str, ...], *,
                          spelled: str = "ablation_mode", missing: str = "") -> None:
    """Refuse an ``ablation_mode`` that ``adapter``'s ablated pass does not run (``"off"`` is always accepted)."""
    if options.ablates and options.ablation_mode not in supported:
        raise NotImplementedError(f"srpo {adapter} adapter: `{spelled}={brief(options.ablation_mode)}` is not "
                                  f"implemented here (this adapter runs {supported}{missing}); choose one of those, "
                                  f"or `{spelled}={_options.ABLATION_OFF}`")


def group_ids(uids) -> torch.Tensor:
    """Prompt uids (strings or any hashable, e.g. verl's ``non_tensor_batch["uid"]``) → ``int64 [B]`` group labels."""
    arr = np.asarray(list(uids), dtype=object).astype(str)
    if arr.size == 0:
        return torch.zeros(0, dtype=torch.int64)
    _, inverse = np.unique(arr, return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64)


def sequence_advantages(token_advantages: torch.Tensor, mask: torch.Tensor, *, name: str = "advantages",
                        rtol: float = 1e-4) -> torch.Tensor:
    """``A_i`` from an outcome estimator's ``[B, T]`` output (``A_i`` broadcast over the response, 0 elsewhere).

    Raises when a row is not constant over its valid tokens (a per-token estimator such as GAE): SRPO refines a
    sequence-level advantage and would silently average a per-token one away. Empty rows give 0.
    """
    if token_advantages.dim() != 2 or token_advantages.shape != mask.shape:
        raise ValueError(f"`{name}` must be [B, T] like the response mask {tuple(mask.shape)}, "
                         f"got {describe(token_advantages)}")
    m = mask.bool()
    x = token_advantages.to(torch.float64)
    n = m.sum(1)
    mean = torch.where(m, x, 0.0).sum(1) / n.clamp(min=1)
    hi = torch.where(m, x, -torch.inf).amax(1) if x.shape[1] else mean
    lo = torch.where(m, x, torch.inf).amin(1) if x.shape[1] else mean
    spread = torch.where(n > 0, hi - lo, 0.0)
    bad = spread > rtol * (1.0 + mean.abs())
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"`{name}` varies along response {i} (from {float(lo[i]):.6g} to {float(hi[i]):.6g}): SRPO "
                         f"refines a sequence-level advantage (GRPO, RLOO, REINFORCE++ baselines…), not a per-token "
                         f"one such as GAE")
    return torch.where(n > 0, mean, 0.0).to(token_advantages.dtype if token_advantages.is_floating_point()
                                             else torch.float32)


def refine_advantages(method: str, seq_adv: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor, *,
                      logp_corrupt: torch.Tensor | None, logp_ablated: torch.Tensor | None = None,
                      roles: torch.Tensor | None = None, ablated_valid: torch.Tensor | None = None,
                      options: AdapterOptions = AdapterOptions()) -> tuple[torch.Tensor, dict[str, float]]:  # noqa: B008
    """Per-token advantages ``[B, T]`` (0 outside ``mask``) and float metrics, for ``method`` ``"srpo"`` | ``"vppo"``.

    ``ablated_valid`` (bool ``[B, T]``, optional): the tokens the ablated pass gave a value; a REASONING token
    without one (a ``counterfactual`` row without a donor) is scored as OTHER. The padding-free passes of verl and
    EasyR1 remove the hidden rows, so in ``mask`` mode the token after the span is predicted from the visible row
    before it and keeps its value (D180's rule is for passes that keep the hidden rows, as the TRL trainer's; D187).

    ``vppo``: VPPO's loss mask is folded into the advantages (``α_i · A_i`` on the kept tokens, 0 on the others).
    Under a PPO-clip loss averaged over the response mask this is exactly VPPO's masked loss: a token with zero
    advantage contributes zero loss and zero gradient, and the denominator is the same.
    """
    from srpo_core.ops.role_aware_advantages import role_aware_advantages
    from srpo_core.presets import vppo_advantages

    m = mask.bool()
    if method == "srpo":
        if roles is None:
            raise ValueError("srpo: the batch has no token roles (`srpo_roles`)")
        if logp_ablated is None:
            # Without the ablated pass, reasoning tokens carry no signal: they are scored like OTHER tokens.
            roles = torch.where(roles == Role.REASONING, torch.zeros_like(roles), roles)
        elif ablated_valid is not None:
            no_value = (roles == Role.REASONING) & ~ablated_valid.to(roles.device).bool()
            roles = roles.masked_fill(no_value, int(Role.OTHER))
        res = role_aware_advantages(seq_adv, logp, logp_corrupt, logp_ablated, roles.to(torch.int64), mask=m,
                                    config=options.srpo)
        stats = {f"srpo/{k}": float(v) for k, v in res.stats.items()}
        return res.advantages, stats
    if method == "vppo":
        out = vppo_advantages(seq_adv, logp, logp_corrupt, mask=m, beta_min=options.vppo_beta_min,
                              top_k=options.vppo_top_k)
        return torch.where(out.loss_mask, out.advantages, 0.0), dict(out.stats)
    raise ValueError(f"unknown srpo-core estimator {brief(method)}; expected one of {ESTIMATORS}")


def corrupt_multi_modal_inputs(multi_modal_inputs, groups: torch.Tensor, *, mode: str = "black", p: float = 0.5,
                               seed: int = 0, **corrupt_kwargs) -> np.ndarray:
    """Corrupted copies of per-sample processor outputs (verl's ``non_tensor_batch["multi_modal_inputs"]``).

    Each sample is a dict holding Qwen-VL ``pixel_values: [Σ t·h·w, C·T·P·P]`` and ``image_grid_thw``; a new dict with
    corrupted ``pixel_values`` is returned for it (other entries shared, the input untouched). Samples of one prompt
    group draw from the same generator seed, so they see the same corrupted image. Samples without ``pixel_values``
    (text-only) are passed through.
    """
    from srpo_core.corruption import corrupt_pixel_values

    out = np.empty(len(multi_modal_inputs), dtype=object)
    for i, sample in enumerate(multi_modal_inputs):
        sample = dict(sample or {})
        if "pixel_values" in sample and "image_grid_thw" in sample:
            gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(groups[i])) % SEED_MODULUS)
            sample["pixel_values"] = corrupt_pixel_values(sample["pixel_values"], sample["image_grid_thw"],
                                                          mode=mode, p=p, generator=gen, **corrupt_kwargs)
        out[i] = sample
    return out


def perception_span_hidden(attention_mask: torch.Tensor, response_mask: torch.Tensor,
                           roles: torch.Tensor) -> torch.Tensor:
    """``attention_mask [B, P+R]`` with the response's perception tokens removed (set to 0).

    Trainers that compute log-probs padding-free from explicit position ids (verl, EasyR1, OpenRLHF's packed
    samples) drop every position whose attention mask is 0: the span vanishes from the sequence while the other
    tokens keep their position ids — srpo-core's ``ablate_span(mode="mask")`` semantics.
    """
    r = response_mask.shape[1]
    span = (roles == Role.PERCEPTION) & response_mask.bool()
    hidden = attention_mask.clone()
    hidden[:, -r:] = torch.where(span, torch.zeros_like(hidden[:, -r:]), hidden[:, -r:])
    return hidden


def realign_compact(values: torch.Tensor, kept: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Move per-token values computed on responses with some tokens removed back to the original positions.

    ``values: [B, R]`` holds, left-aligned, the values of the kept tokens of each response (what a padding-free
    trainer returns when the ablated response is shorter); ``kept: bool [B, R]`` marks the kept tokens at their
    original positions. Returns ``[B, R]``: ``out[b, j] = values[b, rank of j among the kept tokens]`` where kept,
    ``fill`` elsewhere.
    """
    k = kept.bool()
    rank = (torch.cumsum(k.to(torch.int64), dim=1) - 1).clamp(min=0)
    gathered = torch.gather(values, 1, rank.clamp(max=max(values.shape[1] - 1, 0))) if values.shape[1] else values
    return torch.where(k, gathered, torch.full_like(gathered, fill))


def rebuilt_responses(responses: torch.Tensor, valid: torch.Tensor, span: torch.Tensor, mode: str, *,
                      groups: torch.Tensor | None = None, source: str = "group"):
    """The ``drop`` / ``counterfactual`` ablated responses, on response-only tensors ``[B, R]`` (the prompt, with the
    image, is untouched): :func:`srpo_core.ablation.ablate_span` with ``valid`` (the response's real tokens) as its
    attention mask and ``span`` (the perception tokens) removed, or replaced by the span of another response
    (:func:`srpo_core.ablation.counterfactual_donors` over ``groups``, a donor with the same span tokens passed over).
    Returns the :class:`srpo_core.ablation.AblatedBatch`: ``input_ids [B, R']`` the new responses, ``attention_mask``
    their real tokens, ``ablate(x)`` for any other per-response tensor, ``gather(values)`` the values of the new
    responses (aligned to their tokens) back on the original positions, ``valid`` the tokens that got one.
    """
    span = span.bool() & valid.bool()
    donor = None
    if mode == "counterfactual":
        if groups is None:
            raise ValueError("srpo: the counterfactual ablated pass needs the prompt groups of the responses")
        donor = counterfactual_donors(groups.to(responses.device), source, input_ids=responses, span_mask=span)
    return ablate_span(responses, valid.bool(), span, mode=mode, donor=donor)


def continued_positions(position_ids: torch.Tensor, prompt_width: int, width: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """``position_ids [B, P+R]`` (or ``[B, C, P+R]``, M-RoPE) with the response part replaced by ``width`` positions
    continuing from the first response position (each component + 1 per token), as a trainer gives a response after
    its prompt. Refuses ids whose real response tokens (``valid [B, R]``, default all) do not already run that way
    (the new ones would be guesses); padding positions are not read."""
    first = position_ids[..., prompt_width:prompt_width + 1]
    resp = position_ids[..., prompt_width:]
    steps = torch.arange(max(resp.shape[-1], width), device=position_ids.device, dtype=position_ids.dtype)
    same = resp == first + steps[:resp.shape[-1]]
    if valid is not None:
        real = valid.bool().to(position_ids.device)
        same = same | ~(real.unsqueeze(1) if resp.dim() == 3 else real)
    if not bool(same.all()):
        raise NotImplementedError("srpo: the response's position_ids do not run consecutively from its first token "
                                  "(each component + 1 per token), so the drop / counterfactual ablated pass cannot "
                                  "give the rebuilt response its positions; use ablation_mode='mask'")
    return torch.cat([position_ids[..., :prompt_width], first + steps[:width]], dim=-1)


def rebuilt_batch(data, roles: torch.Tensor, options: AdapterOptions):
    """``drop`` / ``counterfactual`` on a verl-style ``DataProto`` (verl, EasyR1: left-padded prompt, right-padded
    response, ``position_ids`` ``[B, L]`` or ``[B, C, L]``): a batch whose responses are rebuilt without their
    perception span (or with another response's, donors from the same ``uid`` group or the next one,
    ``options.counterfactual_source``), the later tokens moved to the new positions and the response's
    ``position_ids`` continued from its first token (each M-RoPE component alike, as verl and EasyR1 give a
    response's text tokens). Returns the batch and the :class:`srpo_core.ablation.AblatedBatch` whose ``gather``
    brings the pass's log-probs back."""
    batch = data.batch
    responses = batch["responses"]
    r = responses.shape[1]
    p = batch["input_ids"].shape[1] - r
    valid = batch["attention_mask"][:, p:].bool()
    span = (roles == Role.PERCEPTION) & batch["response_mask"].bool()
    ab = rebuilt_responses(responses, valid, span, options.ablation_mode,
                           groups=group_ids(data.non_tensor_batch["uid"]), source=options.counterfactual_source)
    width = ab.input_ids.shape[1]
    attn = batch["attention_mask"]
    tensors = {
        "prompts": batch["input_ids"][:, :p], "responses": ab.input_ids,
        "input_ids": torch.cat([batch["input_ids"][:, :p], ab.input_ids], dim=1),
        "attention_mask": torch.cat([attn[:, :p], ab.attention_mask.to(attn.dtype)], dim=1),
        "position_ids": continued_positions(batch["position_ids"], p, width, valid),
        "response_mask": ab.ablate(batch["response_mask"]),
    }
    out = type(data).from_dict(tensors=tensors, non_tensors=dict(data.non_tensor_batch),
                               meta_info=dict(data.meta_info))
    return out, ab
