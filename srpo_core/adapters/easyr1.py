"""EasyR1 adapter (hiyouga/EasyR1, a verl fork whose package is also named ``verl``; written against 0.3.x).

EasyR1 differs from upstream verl in three ways that shape this adapter:

- its ``AdvantageEstimator`` is a closed enum validated at start-up, so the estimator stays ``grpo`` and
  :func:`install` wraps ``verl.trainer.ray_trainer.compute_advantage`` (looked up by ``fit`` at each step): after
  EasyR1's GRPO, the advantages are refined with SRPO (or the VPPO preset) when the batch carries the contrast keys;
- ``fit`` calls ``actor_rollout_ref_wg.compute_log_probs`` directly, so ``SRPORayPPOTrainer.init_workers`` wraps that
  worker group (:class:`SRPOWorkerGroup`) to add the corrupted-image and perception-ablated passes;
- its FSDP worker turns raw images (``non_tensor_batch["multi_modal_data"]``) into ``multi_modal_inputs`` itself and
  caches them **by uid** (``FSDPWorker._process_multi_modal_inputs``: the cache is kept while the batch's uids equal
  the cached ones). A corrupted copy with the original uids would silently reuse the clean pixels, so
  :func:`corrupted_batch` gives it new uids (``<uid>#srpo-corrupt``; the prompt groups are preserved).

The ablated pass runs every mode of ``ablation_mode``. ``mask`` hides the perception span through
``attention_mask`` and relies on EasyR1's padding-free actor (``worker.actor.padding_free=true``, its default), which
drops masked positions and scatters each log-prob back to the position of the token that *predicts* it:
:func:`realign_scattered` moves them to the predicted tokens. ``drop`` and ``counterfactual`` rebuild the responses
(:func:`srpo_core.adapters._common.rebuilt_batch`, donors from the same ``uid`` group).

Importing this module imports no EasyR1 (nor upstream verl); keep it and ``srpo_core.adapters.verl`` apart: the two
``verl`` packages cannot be installed together.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from srpo_core.adapters._common import (
    KEY_ABLATED_VALID,
    KEY_LOGP_ABLATED,
    KEY_LOGP_CORRUPT,
    KEY_METRICS,
    KEY_ROLES,
    SEED_MODULUS,
    AdapterOptions,
    group_ids,
    perception_span_hidden,
    rebuilt_batch,
    refine_advantages,
    sequence_advantages,
)
from srpo_core.config import Role

CORRUPT_UID_SUFFIX = "#srpo-corrupt"

__all__ = ["CORRUPT_UID_SUFFIX", "SRPOWorkerGroup", "compute_advantage", "corrupted_batch", "install",
           "options_from_mapping", "realign_scattered"]

_STATE: dict[str, Any] = {"method": None, "options": AdapterOptions()}
METHODS = ("srpo", "vppo")


def options_from_mapping(options) -> AdapterOptions:
    """``srpo_options`` as given to :class:`SRPORayPPOTrainer` (a mapping of option names, an
    :class:`AdapterOptions`, or None for the defaults), parsed and checked; errors name ``srpo_options["<key>"]``
    (EasyR1's config is a closed dataclass tree, so SRPO's options come as this keyword argument)."""
    if options is None or isinstance(options, AdapterOptions):
        return options or AdapterOptions()
    return AdapterOptions.from_mapping(options, where="srpo (EasyR1)", spell=lambda k: f'srpo_options["{k}"]')


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"srpo (EasyR1): `srpo_method` must be one of {METHODS}, got {method!r}")
    return method


def compute_advantage(data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, *, method: str | None = None,
                      options: AdapterOptions | None = None, _easyr1_compute_advantage=None):
    """EasyR1's ``compute_advantage`` then, for GRPO batches carrying ``srpo_logp_corrupt``, SRPO's refinement.

    ``method`` (``"srpo"`` | ``"vppo"``) and ``options`` default to what :func:`install` was given.
    """
    original = _easyr1_compute_advantage or _original_compute_advantage()
    data = original(data, adv_estimator, gamma=gamma, lam=lam)
    method = method or _STATE["method"]
    name = str(getattr(adv_estimator, "value", adv_estimator))
    batch = data.batch
    if method is None or name != "grpo" or KEY_LOGP_CORRUPT not in batch.keys():
        return data
    options = options or _STATE["options"]
    mask = batch["response_mask"].bool()
    seq = sequence_advantages(batch["advantages"], mask)
    adv, stats = refine_advantages(
        method, seq, mask, batch["old_log_probs"], logp_corrupt=batch[KEY_LOGP_CORRUPT],
        logp_ablated=batch[KEY_LOGP_ABLATED] if KEY_LOGP_ABLATED in batch.keys() else None,
        roles=batch[KEY_ROLES] if KEY_ROLES in batch.keys() else None,
        ablated_valid=batch[KEY_ABLATED_VALID] if KEY_ABLATED_VALID in batch.keys() else None, options=options)
    batch["advantages"] = adv.to(batch["advantages"].dtype)
    batch["returns"] = batch["advantages"]
    data.meta_info[KEY_METRICS] = stats
    return data


def _original_compute_advantage():
    from verl.trainer import ray_trainer

    fn = ray_trainer.compute_advantage
    return getattr(fn, "__srpo_original__", fn)


def install(method: str = "srpo", options: AdapterOptions | Mapping | None = None) -> None:
    """Wrap EasyR1's ``ray_trainer.compute_advantage`` (idempotent) and set the method used for GRPO batches."""
    from verl.trainer import ray_trainer

    options = options_from_mapping(options)
    _STATE["method"] = _check_method(method)
    _STATE["options"] = options
    current = ray_trainer.compute_advantage
    if getattr(current, "__srpo_original__", None) is not None:
        return
    original = current

    def wrapped(data, adv_estimator, gamma=1.0, lam=1.0):
        return compute_advantage(data, adv_estimator, gamma=gamma, lam=lam, _easyr1_compute_advantage=original)

    wrapped.__srpo_original__ = original
    ray_trainer.compute_advantage = wrapped


def _load_image(image):
    """EasyR1's accepted image forms (PIL, path, ``{"bytes": …}``, bytes) → PIL."""
    from io import BytesIO

    from PIL import Image

    if isinstance(image, str):
        image = Image.open(image)
    elif isinstance(image, dict):
        image = Image.open(BytesIO(image["bytes"]))
    elif isinstance(image, bytes):
        image = Image.open(BytesIO(image))
    image.load()
    return image


def corrupted_batch(data, options: AdapterOptions = AdapterOptions(), step: int = 0):  # noqa: B008 - frozen
    """A copy of ``data`` whose ``multi_modal_data`` images are corrupted and whose uids are new.

    One mask per prompt group (the responses of a prompt see the same corrupted image), drawn before the processor
    with :func:`srpo_core.corruption.corrupt_images`. The new uids (``uid + "#srpo-corrupt"``) defeat EasyR1's worker
    cache, which would otherwise hand back the clean ``multi_modal_inputs`` of the previous call; the original batch is
    untouched.
    """
    from srpo_core.corruption import corrupt_images

    out = copy.copy(data)
    out.non_tensor_batch = dict(data.non_tensor_batch)
    out.meta_info = dict(data.meta_info)
    uids = data.non_tensor_batch["uid"]
    groups = group_ids(uids)
    mm = data.non_tensor_batch.get("multi_modal_data")
    if mm is None:
        raise KeyError("srpo: the batch has no non_tensor_batch['multi_modal_data'] to corrupt (text-only data?)")
    new_mm = np.empty(len(mm), dtype=object)
    done: dict[int, dict] = {}
    for i, sample in enumerate(mm):
        g = int(groups[i])
        if g not in done:
            sample = dict(sample)
            if "images" in sample:
                gen = torch.Generator().manual_seed((int(options.seed) * 1_000_003 + step * 7919 + g) % SEED_MODULUS)
                images = [_load_image(im) for im in sample["images"]]
                sample["images"] = corrupt_images(images, p=options.corruption_p, mode=options.corruption_mode,
                                                  generator=gen) if images else []
            done[g] = sample
        new_mm[i] = done[g]
    out.non_tensor_batch["multi_modal_data"] = new_mm
    out.non_tensor_batch["uid"] = np.array([f"{u}{CORRUPT_UID_SUFFIX}" for u in uids], dtype=object)
    return out


def realign_scattered(values: torch.Tensor, kept: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Log-probs of a padding-free pass with holes, as EasyR1 (and verl's legacy worker) return them, moved back.

    Such a pass stores the log-prob of kept token ``j`` at the slot after the previous kept position (the slice
    ``[:, -R-1:-1]`` reads position ``j − 1`` for token ``j``, and the token before a hole predicts the token after it).
    ``values: [B, R]`` response-aligned output, ``kept: bool [B, R]``. Returns ``[B, R]`` with each kept token's value
    at its own position, ``fill`` elsewhere. The prompt is never ablated, so the first response token's slot is 0.
    """
    k = kept.bool()
    r = k.shape[1]
    pos = torch.arange(r, device=k.device).expand_as(k)
    last_kept = torch.cummax(torch.where(k, pos, -1), dim=1).values  # last kept index ≤ j
    prev = torch.cat([torch.full_like(last_kept[:, :1], -1), last_kept[:, :-1]], dim=1)  # last kept index < j
    slot = (prev + 1).clamp(max=max(r - 1, 0))
    gathered = torch.gather(values, 1, slot) if r else values
    return torch.where(k, gathered, torch.full_like(gathered, fill))


class SRPOWorkerGroup:
    """Wraps EasyR1's actor worker group: ``compute_log_probs`` also runs the two contrast passes.

    Every other attribute is the wrapped group's. ``tokenizer`` labels the roles of the responses (skipped when the
    batch already has ``srpo_roles``).
    """

    def __init__(self, worker_group, tokenizer, method: str = "srpo",
                 options: AdapterOptions | Mapping | None = None):
        self._wg = worker_group
        self._tokenizer = tokenizer
        self._method = _check_method(method)
        self._options = options_from_mapping(options)
        self._step = 0

    def __getattr__(self, name):
        return getattr(self._wg, name)

    def compute_log_probs(self, data):
        out = self._wg.compute_log_probs(data)
        self._step += 1
        c = self._wg.compute_log_probs(corrupted_batch(data, self._options, self._step))
        out.batch[KEY_LOGP_CORRUPT] = c.batch["old_log_probs"]
        if self._method != "srpo":
            return out
        response_mask = data.batch["response_mask"].bool()
        if KEY_ROLES in data.batch.keys():
            roles = data.batch[KEY_ROLES]
        else:
            from srpo_core.roles import roles_from_token_ids

            roles = roles_from_token_ids(data.batch["responses"], self._tokenizer, response_mask).roles
        out.batch[KEY_ROLES] = roles
        if self._options.ablates:
            if bool(((roles == Role.PERCEPTION) & response_mask).any()):
                ablated, valid = self._ablated_log_probs(data, roles, response_mask)
                out.batch[KEY_LOGP_ABLATED] = ablated.to(out.batch["old_log_probs"].dtype)
                out.batch[KEY_ABLATED_VALID] = valid
            else:
                out.batch[KEY_LOGP_ABLATED] = out.batch["old_log_probs"].clone()
        return out

    def _ablated_log_probs(self, data, roles, response_mask):
        """``(ℓ°, valid)`` in the options' mode. ``mask``: the span hidden from ``attention_mask``; the padding-free
        actor drops it, and every kept token (the one after the span included) is predicted from the last visible
        row before it (D187). ``drop`` / ``counterfactual``: rebuilt responses (:func:`rebuilt_batch`), whose
        log-probs come back aligned to the new tokens; the batch keeps its uids, so the worker processes the clean
        images again (its cache holds the corrupted pass's ``#srpo-corrupt`` uids)."""
        if self._options.ablation_mode == "mask":
            ab = copy.copy(data)
            ab.batch = data.batch.clone(False)
            ab.batch["attention_mask"] = perception_span_hidden(data.batch["attention_mask"], response_mask, roles)
            raw = self._wg.compute_log_probs(ab).batch["old_log_probs"]
            kept = response_mask & (roles != Role.PERCEPTION)
            return realign_scattered(raw, kept), kept
        rebuilt, ab = rebuilt_batch(data, roles, self._options)
        values = self._wg.compute_log_probs(rebuilt).batch["old_log_probs"]
        return ab.gather(values), ab.valid & response_mask


def _build_trainer_class():
    from verl.trainer.ray_trainer import RayPPOTrainer

    class SRPORayPPOTrainer(RayPPOTrainer):
        """EasyR1's ``RayPPOTrainer`` with :class:`SRPOWorkerGroup` around the actor and :func:`install` applied.

        ``srpo_method`` (``"srpo"`` | ``"vppo"``) and ``srpo_options`` (a mapping of option names, e.g.
        ``{"beta_perception": 0.5, "ablation_mode": "mask"}``, or an :class:`AdapterOptions`) are keyword arguments,
        checked before EasyR1's constructor runs; the rest are EasyR1's.
        """

        def __init__(self, *args, srpo_method: str = "srpo", srpo_options: AdapterOptions | Mapping | None = None,
                     **kwargs):
            self.srpo_method = _check_method(srpo_method)
            self.srpo_options = options_from_mapping(srpo_options)  # checked before EasyR1 builds anything
            super().__init__(*args, **kwargs)
            install(srpo_method, self.srpo_options)

        def init_workers(self) -> None:
            super().init_workers()
            self.actor_rollout_ref_wg = SRPOWorkerGroup(self.actor_rollout_ref_wg, self.tokenizer, self.srpo_method,
                                                        self.srpo_options)

    return SRPORayPPOTrainer


_LAZY: dict[str, Any] = {}


def __getattr__(name: str):
    """``SRPORayPPOTrainer`` is built on first access (it needs EasyR1's ``verl`` package)."""
    if name == "SRPORayPPOTrainer":
        if name not in _LAZY:
            _LAZY[name] = _build_trainer_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
