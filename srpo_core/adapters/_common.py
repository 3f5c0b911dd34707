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
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from srpo_core._validate import brief, describe
from srpo_core.ablation import check_ablation_mode, follows_hidden
from srpo_core.config import Role, SRPOConfig

ESTIMATORS = ("srpo", "vppo")
KEY_LOGP_CORRUPT = "srpo_logp_corrupt"
KEY_LOGP_ABLATED = "srpo_logp_ablated"
KEY_ROLES = "srpo_roles"
KEY_METRICS = "srpo_metrics"


@dataclasses.dataclass(frozen=True)
class AdapterOptions:
    """What an adapter needs beyond :class:`SRPOConfig`, read from one flat mapping (a trainer's config section).

    - ``corrupt_mode``, ``corrupt_p``: :func:`srpo_core.corrupt_pixel_values`'s ``mode`` and ``p`` (``"black"``, 0.5).
    - ``seed``: base seed of the corruption masks (one generator per prompt group, so a group shares its mask).
    - ``ablate``: run the ablated pass (reasoning contrast); when False the reasoning tokens keep weight 1 before
      renormalisation (their signal is absent, like OTHER tokens).
    - ``ablation_mode``: one of :data:`srpo_core.ablation.ABLATION_MODES`, default ``"mask"``: the padding-free verl
      and EasyR1 passes hide the span (``"mask"``) and refuse the others (:func:`require_ablation_mode`) rather than
      run a different contrast than asked for (the TRL trainer, which runs all three, defaults to
      ``"counterfactual"``).
    - ``vppo_beta_min``, ``vppo_top_k``: the VPPO preset's knobs.
    - every other key is a field of :class:`SRPOConfig`.
    """

    srpo: SRPOConfig = SRPOConfig()
    corrupt_mode: str = "black"
    corrupt_p: float = 0.5
    seed: int = 0
    ablate: bool = True
    ablation_mode: str = "mask"
    vppo_beta_min: float = 0.9
    vppo_top_k: float = 0.4

    def __post_init__(self) -> None:
        check_ablation_mode("srpo adapter options: `ablation_mode`", self.ablation_mode)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> AdapterOptions:
        mapping = dict(mapping or {})
        own = {f.name for f in dataclasses.fields(cls)} - {"srpo"}
        srpo_fields = {f.name for f in dataclasses.fields(SRPOConfig)}
        unknown = set(mapping) - own - srpo_fields
        if unknown:
            raise ValueError(f"srpo adapter options: unknown key(s) {sorted(unknown)}; expected SRPOConfig fields "
                             f"{sorted(srpo_fields)} or adapter options {sorted(own)}")
        srpo = SRPOConfig(**{k: v for k, v in mapping.items() if k in srpo_fields})
        return cls(srpo=srpo, **{k: v for k, v in mapping.items() if k in own})


def require_ablation_mode(adapter: str, options: AdapterOptions, supported: tuple[str, ...]) -> None:
    """Refuse an ``ablation_mode`` that ``adapter``'s ablated pass does not run (when the pass is on)."""
    if options.ablate and options.ablation_mode not in supported:
        raise NotImplementedError(f"srpo {adapter} adapter: `ablation_mode={brief(options.ablation_mode)}` is not "
                                  f"implemented here (this adapter runs {supported}); the TRL adapter runs every "
                                  f"mode, or set ablate=False")


def without_hidden_successors(roles: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``roles`` with each REASONING token that directly follows a hidden perception span set to OTHER.

    In the ``mask`` ablated pass that token is predicted from the span's last row (hidden, D180), so it has no
    ``ℓ°`` and gets no reasoning signal.
    """
    hidden = (roles == Role.PERCEPTION) & mask.bool()
    after = follows_hidden(hidden) & (roles == Role.REASONING)
    return roles.masked_fill(after, int(Role.OTHER))


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
                      roles: torch.Tensor | None = None,
                      options: AdapterOptions = AdapterOptions()) -> tuple[torch.Tensor, dict[str, float]]:  # noqa: B008
    """Per-token advantages ``[B, T]`` (0 outside ``mask``) and float metrics, for ``method`` ``"srpo"`` | ``"vppo"``.

    ``vppo``: VPPO's loss mask is folded into the advantages (``α_i · A_i`` on the kept tokens, 0 on the others).
    Under a PPO-clip loss averaged over the response mask this is exactly VPPO's masked loss: a token with zero
    advantage contributes zero loss and zero gradient, and the denominator is the same.
    """
    from srpo_core.advantages import role_aware_advantages
    from srpo_core.presets import vppo_advantages

    m = mask.bool()
    if method == "srpo":
        if roles is None:
            raise ValueError("srpo: the batch has no token roles (`srpo_roles`)")
        if logp_ablated is None:
            # Without the ablated pass, reasoning tokens carry no signal: they are scored like OTHER tokens.
            roles = torch.where(roles == Role.REASONING, torch.zeros_like(roles), roles)
        elif options.ablation_mode == "mask":
            roles = without_hidden_successors(roles, m)
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
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(groups[i]))
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
