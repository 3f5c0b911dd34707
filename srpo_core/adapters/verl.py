"""verl adapter (tested with verl 0.9.1): ``algorithm.adv_estimator=srpo`` (or ``vppo``) without forking verl.

Pieces, from the smallest to the whole run:

- :func:`srpo_token_advantages`: the conversion on plain tensors shaped like verl's batch — GRPO's
  ``advantages [bs, response_length]``, ``response_mask``, ``old_log_probs`` and the three ``srpo_*`` keys — into
  SRPO's per-token advantages. No verl import.
- :func:`compute_advantage`: a drop-in for ``verl.trainer.ppo.ray_trainer.compute_advantage``: for ``srpo``/``vppo``
  it runs verl's own GRPO branch (so ``norm_adv_by_std_in_grpo`` and verl's grouping by ``uid`` apply), then refines.
  Anything else goes to verl untouched.
- :func:`install`: patches that function into ``ray_trainer`` (the legacy ``fit`` looks it up there at each step)
  and into ``ppo.v1.utils`` (the v1 trainer imports it by name; its ``compute_advantage_for_multi_trajectories``
  hands any estimator but ``grpo`` to it), and registers the names in verl's estimator registry
  (``core_algos.register_adv_est``), idempotently.
- ``SRPORayPPOTrainer``: a ``RayPPOTrainer`` whose ``_compute_old_log_prob`` also runs the corrupted-image pass and the
  perception-ablated pass through verl's *own* ``_compute_old_log_prob`` (same workers, temperature, padding-free
  path), adding ``srpo_logp_corrupt``, ``srpo_logp_ablated`` and ``srpo_roles`` to the batch.
- ``srpo_v1_trainer_class(base)``: the same passes for verl 0.9's v1 trainer (``trainer.use_v1=true``, the
  default), whose samples live in the TransferQueue: after verl's ``_compute_old_log_prob`` the corrupted and the
  ablated copies of the batch are written to a partition of their own, scored by the same ``compute_log_prob`` call,
  and the results stored as ``srpo_*`` fields of the samples; ``_compute_advantage`` reads them back and hands them to
  the patched ``compute_advantage`` for the duration of verl's own advantage step.
- ``SRPOTaskRunner``/``SRPOTaskRunnerV1`` and :func:`main`: ``python -m srpo_core.adapters.verl <hydra overrides>`` is
  verl's ``main_ppo`` with the patches applied inside the TaskRunner actor, where the trainer lives: the v1 runner
  (``trainer.use_v1=true``, verl's default) or the legacy ``RayPPOTrainer`` one (``trainer.use_v1=false``).

The Ray workers need nothing from srpo-core: the extra passes are ordinary ``compute_log_prob`` calls on batches
the driver prepared (corrupted ``pixel_values`` in ``multi_modal_inputs``, the perception span removed from the
``attention_mask``). Importing this module imports no verl; ``SRPORayPPOTrainer`` and ``SRPOTaskRunner`` are built on
first access.
"""

from __future__ import annotations

import contextvars
import copy
from typing import Any

import numpy as np
import torch

from srpo_core.adapters._common import (
    ESTIMATORS,
    KEY_ABLATED_VALID,
    KEY_LOGP_ABLATED,
    KEY_LOGP_CORRUPT,
    KEY_METRICS,
    KEY_ROLES,
    AdapterOptions,
    continued_positions,
    corrupt_multi_modal_inputs,
    group_ids,
    perception_span_hidden,
    realign_compact,
    rebuilt_batch,
    rebuilt_responses,
    refine_advantages,
    sequence_advantages,
)
from srpo_core.config import Role

# The verl releases `make test-verl` runs the adapter against (the legacy entry point needs `main_ppo_v0`, which
# 0.7.x and 0.8.0 do not have; 0.9.x has it, deprecated).
TESTED_VERL = ("0.9.1",)

__all__ = [
    "ESTIMATORS",
    "TESTED_VERL",
    "KEY_LOGP_ABLATED",
    "KEY_LOGP_CORRUPT",
    "KEY_ROLES",
    "compute_advantage",
    "install",
    "main",
    "options_from_config",
    "srpo_token_advantages",
    "srpo_v1_trainer_class",
    "task_runner_name",
]


def srpo_token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor, old_log_probs: torch.Tensor, *,
                          logp_corrupt: torch.Tensor | None, logp_ablated: torch.Tensor | None = None,
                          roles: torch.Tensor | None = None, ablated_valid: torch.Tensor | None = None,
                          estimator: str = "srpo",
                          options: AdapterOptions = AdapterOptions()  # noqa: B008 - frozen
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """verl tensors in, per-token advantages out (``[bs, response_length]``, 0 outside ``response_mask``).

    ``advantages`` is an outcome estimator's output (GRPO: ``A_i · response_mask``); ``old_log_probs``,
    ``logp_corrupt``, ``logp_ablated`` the three teacher-forced log-probs of the sampled tokens; ``roles`` int per
    token; ``ablated_valid`` (bool, optional) the tokens the ablated pass gave a value (a reasoning token without
    one is scored as OTHER). Returns the new advantages (in ``advantages``' dtype) and float metrics (``srpo/…`` or
    ``vppo/…``).
    """
    mask = response_mask.bool()
    seq = sequence_advantages(advantages, mask)
    out, stats = refine_advantages(estimator, seq, mask, old_log_probs, logp_corrupt=logp_corrupt,
                                   logp_ablated=logp_ablated, roles=roles, ablated_valid=ablated_valid,
                                   options=options)
    return out.to(advantages.dtype), stats


CONFIG_KEY = "algorithm.srpo"


def options_from_config(config) -> AdapterOptions:
    """Options from ``config.algorithm.srpo`` (pass ``config.algorithm``: an OmegaConf node or a mapping; absent →
    defaults), every value parsed and checked, errors naming the Hydra key (``algorithm.srpo.corruption_p``)."""
    node = None
    if config is not None:
        node = config.get("srpo", None) if hasattr(config, "get") else getattr(config, "srpo", None)
    if node is not None and not isinstance(node, dict):
        try:
            from omegaconf import OmegaConf

            node = OmegaConf.to_container(node, resolve=True)
        except ImportError:  # pragma: no cover - verl always brings omegaconf
            node = dict(node)
    return AdapterOptions.from_mapping(node, where="srpo (verl)", spell=lambda k: f"{CONFIG_KEY}.{k}")


def _check_options(config) -> AdapterOptions:
    """Read ``config.algorithm.srpo`` once where the trainer is built, so a bad value fails before any rollout."""
    algorithm = config.get("algorithm", None) if hasattr(config, "get") else getattr(config, "algorithm", None)
    return options_from_config(algorithm)


def _estimator_name(adv_estimator) -> str:
    return str(getattr(adv_estimator, "value", adv_estimator))


def compute_advantage(data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
                      norm_adv_by_std_in_grpo: bool = True, config=None, *, _verl_compute_advantage=None):
    """``ray_trainer.compute_advantage`` with ``srpo`` and ``vppo`` (same signature as verl's).

    For those two, verl's GRPO branch computes ``advantages``/``returns`` from ``token_level_rewards`` and ``uid``;
    then the batch's ``old_log_probs``, ``srpo_logp_corrupt`` (and for SRPO ``srpo_logp_ablated``, ``srpo_roles``)
    turn them into per-token advantages. ``returns`` is set equal to them, as verl's GRPO does. Metrics go to
    ``data.meta_info["srpo_metrics"]``.
    """
    original = _verl_compute_advantage or _original_compute_advantage()
    name = _estimator_name(adv_estimator)
    if name not in ESTIMATORS:
        return original(data, adv_estimator, gamma=gamma, lam=lam, num_repeat=num_repeat,
                        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
    v1_step = _V1_STEP.get()
    if v1_step is not None:  # inside the v1 trainer's advantage step: the srpo_* fields it does not fetch
        v1_step.attach(data)
    data = original(data, "grpo", gamma=gamma, lam=lam, num_repeat=num_repeat,
                    norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
    batch = data.batch
    missing = [k for k in ("old_log_probs", KEY_LOGP_CORRUPT) if k not in batch.keys()]
    if name == "srpo" and KEY_ROLES not in batch.keys():
        missing.append(KEY_ROLES)
    if missing:
        raise KeyError(f"adv_estimator={name}: the batch lacks {missing}; run the trainer as "
                       f"srpo_core.adapters.verl.SRPORayPPOTrainer (python -m srpo_core.adapters.verl ...), whose "
                       f"_compute_old_log_prob adds them")
    advantages, stats = srpo_token_advantages(
        batch["advantages"], batch["response_mask"], batch["old_log_probs"],
        logp_corrupt=batch[KEY_LOGP_CORRUPT],
        logp_ablated=batch[KEY_LOGP_ABLATED] if KEY_LOGP_ABLATED in batch.keys() else None,
        roles=batch[KEY_ROLES] if KEY_ROLES in batch.keys() else None,
        ablated_valid=batch[KEY_ABLATED_VALID] if KEY_ABLATED_VALID in batch.keys() else None,
        estimator=name, options=options_from_config(config))
    batch["advantages"] = advantages
    batch["returns"] = advantages
    data.meta_info[KEY_METRICS] = stats
    if v1_step is not None:
        v1_step.stats = stats
    return data


def _original_compute_advantage():
    from verl.trainer.ppo import ray_trainer

    fn = ray_trainer.compute_advantage
    return getattr(fn, "__srpo_original__", fn)


def _unwired(name: str):
    def estimator(*args, **kwargs):
        raise RuntimeError(
            f"adv_estimator={name} needs the whole batch (old_log_probs and the srpo_* keys), which verl's registry "
            f"does not pass: call srpo_core.adapters.verl.install() in the process that runs the trainer (or use "
            f"python -m srpo_core.adapters.verl), which routes it through a wrapped ray_trainer.compute_advantage"
        )

    estimator.__name__ = f"srpo_core_{name}_estimator"
    return estimator


_UNWIRED = {name: _unwired(name) for name in ESTIMATORS}


def install() -> None:
    """Patch ``ray_trainer.compute_advantage`` and register ``srpo``/``vppo`` in verl's registry (idempotent).

    Call it in the process that runs ``RayPPOTrainer.fit`` (the TaskRunner actor); ``SRPOTaskRunner`` does.
    """
    from verl.trainer.ppo import core_algos, ray_trainer

    for name, fn in _UNWIRED.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            core_algos.register_adv_est(name)(fn)
    current = ray_trainer.compute_advantage
    if getattr(current, "__srpo_original__", None) is None:
        ray_trainer.compute_advantage = _wrap(current)
    try:  # verl ≥ 0.9: the v1 trainer's helpers hold their own reference, bound at their import
        from verl.trainer.ppo.v1 import utils as v1_utils
    except ImportError:
        return
    if getattr(v1_utils.compute_advantage, "__srpo_original__", None) is None:
        v1_utils.compute_advantage = ray_trainer.compute_advantage


def _wrap(original):
    def wrapped(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1, norm_adv_by_std_in_grpo=True, config=None):
        return compute_advantage(data, adv_estimator, gamma=gamma, lam=lam, num_repeat=num_repeat,
                                 norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config,
                                 _verl_compute_advantage=original)

    wrapped.__srpo_original__ = original
    wrapped.__doc__ = compute_advantage.__doc__
    return wrapped


# --------------------------------------------------------------------------- the trainer and the task runner
def _shallow_copy(data):
    """A DataProto sharing tensors with ``data`` but with its own key tables, so keys can be replaced safely."""
    out = copy.copy(data)
    out.batch = data.batch.clone(False) if data.batch is not None else None
    out.non_tensor_batch = dict(data.non_tensor_batch)
    out.meta_info = dict(data.meta_info)
    return out


def corrupted_batch(data, options: AdapterOptions, step: int = 0):
    """``data`` with every sample's ``multi_modal_inputs`` ``pixel_values`` corrupted (one mask per ``uid``)."""
    out = _shallow_copy(data)
    mm = data.non_tensor_batch.get("multi_modal_inputs")
    if mm is None:
        raise KeyError("srpo: the batch has no non_tensor_batch['multi_modal_inputs'] to corrupt (text-only data?)")
    groups = group_ids(data.non_tensor_batch["uid"])
    out.non_tensor_batch["multi_modal_inputs"] = corrupt_multi_modal_inputs(
        mm, groups, mode=options.corruption_mode, p=options.corruption_p, seed=options.seed * 100_003 + step)
    return out


def ablated_batch(data, roles: torch.Tensor):
    """``data`` with each response's perception tokens removed from ``attention_mask`` (positions kept: ``mask``)."""
    out = _shallow_copy(data)
    batch = out.batch
    hidden = perception_span_hidden(batch["attention_mask"], batch["response_mask"], roles)
    batch["attention_mask"] = hidden
    r = batch["response_mask"].shape[1]
    batch["response_mask"] = batch["response_mask"] * hidden[:, -r:].to(batch["response_mask"].dtype)
    return out


def ablated_log_probs(data, roles: torch.Tensor, options: AdapterOptions, logp_of):
    """``(ℓ° [B, R], valid bool [B, R])`` from ``logp_of(batch)`` (verl's own old-log-prob pass, padding-free: it
    returns each response's log-probs left-aligned over its real tokens) in ``options.ablation_mode``.

    ``mask``: the span hidden from ``attention_mask``; the padding-free pass drops those positions and keeps the
    others' ``position_ids``, and each kept token, the one right after the span included, is predicted from the last
    visible row before it (D187). ``drop`` / ``counterfactual``: :func:`srpo_core.adapters._common.rebuilt_batch`.
    """
    response_mask = data.batch["response_mask"].bool()
    if options.ablation_mode == "mask":
        kept = response_mask & (roles != Role.PERCEPTION)
        return realign_compact(logp_of(ablated_batch(data, roles)), kept), kept
    rebuilt, ab = rebuilt_batch(data, roles, options)
    values = logp_of(rebuilt)
    return ab.gather(values), ab.valid & response_mask


def _compute_old_log_prob_with_srpo(self, batch, base):
    result = base(self, batch)
    old, extra = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
    name = _estimator_name(self.config.algorithm.adv_estimator)
    if name in ESTIMATORS:
        options = options_from_config(self.config.algorithm)
        step = int(getattr(self, "global_steps", 0) or 0)

        def logp_of(b):
            r = base(self, b)
            return (r[0] if isinstance(r, tuple) else r).batch["old_log_probs"]

        old.batch[KEY_LOGP_CORRUPT] = logp_of(corrupted_batch(batch, options, step))
        if name == "srpo":
            response_mask = batch.batch["response_mask"].bool()
            roles = batch.batch[KEY_ROLES] if KEY_ROLES in batch.batch.keys() else None
            if roles is None:
                from srpo_core.roles import roles_from_token_ids

                roles = roles_from_token_ids(batch.batch["responses"], self.tokenizer, response_mask).roles
            old.batch[KEY_ROLES] = roles
            if options.ablates and bool(((roles == Role.PERCEPTION) & response_mask).any()):
                ablated, valid = ablated_log_probs(batch, roles, options, logp_of)
                old.batch[KEY_LOGP_ABLATED] = ablated.to(old.batch["old_log_probs"].dtype)
                old.batch[KEY_ABLATED_VALID] = valid
            elif options.ablates:
                old.batch[KEY_LOGP_ABLATED] = old.batch["old_log_probs"].clone()
    return (old, *extra) if extra is not None else old


def _update_actor_with_metrics(self, batch, base):
    stats = batch.meta_info.pop(KEY_METRICS, None)
    out = base(self, batch)
    if stats:
        out.meta_info.setdefault("metrics", {}).update(stats)
    return out


def _build_trainer_class():
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    class SRPORayPPOTrainer(RayPPOTrainer):
        """``RayPPOTrainer`` that adds SRPO's contrast passes to the old-log-prob step (see the module docstring)."""

        def __init__(self, config, *args, **kwargs):
            _check_options(config)  # before the workers start
            super().__init__(config, *args, **kwargs)

        def _compute_old_log_prob(self, batch: Any):
            return _compute_old_log_prob_with_srpo(self, batch, RayPPOTrainer._compute_old_log_prob)

        def _update_actor(self, batch: Any):
            return _update_actor_with_metrics(self, batch, RayPPOTrainer._update_actor)

    return SRPORayPPOTrainer


def _build_task_runner_class():
    import ray
    from verl.trainer import main_ppo_v0

    base = main_ppo_v0.TaskRunner
    base = getattr(base, "__ray_actor_class__", base)

    class SRPOTaskRunner(base):
        """verl's TaskRunner, with ``install()`` and ``SRPORayPPOTrainer`` in place inside the actor process."""

        def run(self, config):
            _check_options(config)
            install()
            main_ppo_v0.RayPPOTrainer = __getattr__("SRPORayPPOTrainer")
            return super().run(config)

    SRPOTaskRunner.__name__ = SRPOTaskRunner.__qualname__ = "SRPOTaskRunner"
    return SRPOTaskRunner, ray.remote(SRPOTaskRunner)


# --------------------------------------------------------------------------- verl 0.9's v1 trainer
# The corrupted and ablated copies of a batch are written under keys of their own in this TransferQueue partition
# (the replay buffer samples only "train"), scored, and cleared.
V1_CONTRAST_PARTITION = "srpo_contrast"
# Per-token fields of the no-padding sample layout the v1 agent loop stores: over the whole sequence (last dim) and
# over the response. The ablated copy drops the response's perception tokens from each.
_V1_SEQUENCE_FIELDS = ("input_ids", "attention_mask", "position_ids")
_V1_RESPONSE_FIELDS = ("responses", "response_mask", "loss_mask", "rollout_log_probs")


class _V1AdvantageStep:
    """The ``srpo_*`` fields (padded ``[bs, response_length]``, rows in the batch's key order) that the v1 advantage
    step does not fetch, handed to :func:`compute_advantage` while verl's ``_compute_advantage`` runs."""

    def __init__(self, fields: dict[str, torch.Tensor]):
        self.fields = fields
        self.stats: dict[str, float] = {}

    def attach(self, data) -> None:
        for key, value in self.fields.items():
            if key in data.batch.keys():
                continue
            if value.shape[0] != len(data) or value.shape[1] != data.batch["response_mask"].shape[1]:
                raise ValueError(f"srpo: {key} is {tuple(value.shape)} but the advantage batch's response_mask is "
                                 f"{tuple(data.batch['response_mask'].shape)}")
            data.batch[key] = value


_V1_STEP: contextvars.ContextVar[_V1AdvantageStep | None] = contextvars.ContextVar("srpo_v1_step", default=None)


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def v1_corrupted_fields(data, options: AdapterOptions, step: int = 0):
    """v1 samples (a TransferQueue ``TensorDict``) with each ``multi_modal_inputs``' ``pixel_values`` corrupted, one
    mask per ``uid`` (the legacy path's :func:`corrupted_batch` on the v1 layout)."""
    from tensordict import NonTensorStack
    from verl.utils import tensordict_utils as tu

    if "multi_modal_inputs" not in data.keys():
        raise KeyError("srpo: the samples have no multi_modal_inputs to corrupt (text-only data?)")
    mm = np.empty(len(data), dtype=object)
    mm[:] = list(tu.get(data, "multi_modal_inputs"))
    if not any(isinstance(x, dict) and "pixel_values" in x for x in mm):
        raise ValueError("srpo: no sample in the batch has pixel_values to corrupt (text-only or video-only data: "
                         "the visual contrast would be 0 everywhere)")
    groups = group_ids(tu.get(data, "uid"))
    out = data.clone(False)
    corrupted = corrupt_multi_modal_inputs(mm, groups, mode=options.corruption_mode, p=options.corruption_p,
                                           seed=options.seed * 100_003 + step)
    out["multi_modal_inputs"] = NonTensorStack(*corrupted.tolist())
    return out


def v1_ablated_fields(data, kept: list[torch.Tensor]):
    """v1 samples with each response's perception tokens removed; ``kept[i]`` is bool over response ``i``. The other
    tokens keep their ``position_ids`` (the legacy path's hidden-span semantics, in the no-padding layout)."""
    out = data.clone(False)
    prompt_lens = data["prompts"].offsets().diff().tolist()
    for key in _V1_SEQUENCE_FIELDS + _V1_RESPONSE_FIELDS:
        if key not in data.keys():
            continue
        rows = list(data[key].unbind())
        for i, row in enumerate(rows):
            keep = kept[i]
            if key in _V1_SEQUENCE_FIELDS:
                keep = torch.cat([torch.ones(prompt_lens[i], dtype=torch.bool), keep])
            rows[i] = row[..., keep]
        out[key] = _nested(rows)
    return out


def _padded(rows: list[torch.Tensor], width: int | None = None, fill=0) -> torch.Tensor:
    width = max((r.shape[-1] for r in rows), default=0) if width is None else width
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=fill) for r in rows])


def v1_rebuilt_fields(data, roles: list[torch.Tensor], masks: list[torch.Tensor], options: AdapterOptions):
    """v1 samples for ``drop`` / ``counterfactual``: each response rebuilt without its perception span (or with the
    span of another response, donors by ``uid``), later tokens moved, the response's ``position_ids`` continued from
    its first token (:func:`srpo_core.adapters._common.continued_positions`). Returns the samples and the
    :class:`srpo_core.ablation.AblatedBatch` over the padded responses (``gather`` brings the log-probs back)."""
    from verl.utils import tensordict_utils as tu

    out = data.clone(False)
    prompt_lens = data["prompts"].offsets().diff().tolist()
    responses = list(data["responses"].unbind())
    lens = [r.shape[-1] for r in responses]
    padded = _padded(responses)
    valid = torch.arange(padded.shape[1])[None, :] < torch.tensor(lens)[:, None]
    span = _padded([m & (r == Role.PERCEPTION) for m, r in zip(masks, roles, strict=True)], padded.shape[1], False)
    ab = rebuilt_responses(padded, valid, span, options.ablation_mode, groups=group_ids(tu.get(data, "uid")),
                           source=options.counterfactual_source)
    new_lens = ab.attention_mask.sum(1).tolist()
    for key in _V1_SEQUENCE_FIELDS + _V1_RESPONSE_FIELDS:
        if key not in data.keys():
            continue
        rows = list(data[key].unbind())
        if key in _V1_RESPONSE_FIELDS:
            moved = ab.ablate(_padded(rows, padded.shape[1]))
            rows = [moved[i, :int(n)] for i, n in enumerate(new_lens)]
        for i, row in enumerate(rows):
            plen, n = prompt_lens[i], int(new_lens[i])
            if key == "position_ids":
                rows[i] = continued_positions(row[None], plen, n)[0]
            elif key == "attention_mask":
                rows[i] = torch.cat([row[..., :plen], torch.ones(n, dtype=row.dtype)])
            elif key == "input_ids":
                rows[i] = torch.cat([row[..., :plen], ab.input_ids[i, :n].to(row.dtype)])
        out[key] = _nested(rows)
    return out, ab


def _v1_log_probs(self, batch, fields) -> list[torch.Tensor]:
    """Score samples through the actor's ``compute_log_prob`` (as verl's old-log-prob step does); per-response rows."""
    import transfer_queue as tq
    from transfer_queue import KVBatchMeta
    from verl.workers.utils.padding import response_from_nested

    keys = [f"{k}#srpo" for k in batch.keys]
    tq.kv_batch_put(keys=keys, partition_id=V1_CONTRAST_PARTITION, fields=fields, tags=batch.tags)
    try:
        extra = {**batch.extra_info, "calculate_entropy": False, "compute_loss": False,
                 "temperature": self.config.actor_rollout_ref.rollout.temperature}
        meta = KVBatchMeta(keys=keys, tags=batch.tags, partition_id=V1_CONTRAST_PARTITION, extra_info=extra)
        output = self.actor_rollout_wg.compute_log_prob(meta)
        assert len(output) == len(batch)
        got = tq.kv_batch_get(keys=keys, partition_id=V1_CONTRAST_PARTITION,
                              select_fields=["log_probs", "response_mask"])
        return list(response_from_nested(got["log_probs"], got["response_mask"]).unbind())
    finally:
        tq.kv_clear(keys=keys, partition_id=V1_CONTRAST_PARTITION)


def _v1_refuse_unsupported(self, batch, name):
    """Settings under which the v1 contrast passes would be wrong, refused before any pass runs."""
    later = [k for k in batch.keys if not str(k).endswith("_0")]
    if later:
        raise NotImplementedError(
            f"adv_estimator={name} on the v1 trainer: {len(later)} samples are not their session's first agent-loop "
            f"output (key {later[0]!r}); sessions with several outputs are not supported (verl's GRPO scores only "
            f"the last of them, SRPO's grouping does not)")
    corr = self.config.algorithm.get("rollout_correction", None)
    if corr and corr.get("bypass_mode", False):
        raise NotImplementedError(
            f"adv_estimator={name} on the v1 trainer with algorithm.rollout_correction.bypass_mode=true: the old "
            f"log-probs are then the rollout engine's, and the contrast passes (scored by the actor) would measure "
            f"engine drift as well; turn bypass_mode off")
    separate = any(c.__name__ == "PPOTrainerSeparateAsync" for c in type(self).__mro__)
    if separate and int(getattr(self, "local_trigger_step", 0) or 0) >= 1:
        raise NotImplementedError(
            f"adv_estimator={name} on the separate-async v1 trainer with parameter_sync_step > 1: its old log-probs "
            f"come from restored π_old weights, and the contrast passes would run on the current ones; use "
            f"parameter_sync_step=1")


def _v1_roles(data, tags, tokenizer) -> list[torch.Tensor]:
    """Per-response roles: the samples' own ``srpo_roles``, else found from the response tokens; verl's padding
    rows (``is_padding``, a 1-token response copied from another sample) get OTHER."""
    lens = data["response_mask"].offsets().diff().tolist()
    if KEY_ROLES in data.keys():
        roles = list(data[KEY_ROLES].unbind())
    else:
        from srpo_core.roles import roles_from_token_ids

        padded = data.select("responses", "response_mask").to_padded_tensor()
        found = roles_from_token_ids(padded["responses"], tokenizer, padded["response_mask"].bool()).roles
        roles = [found[i, :n] for i, n in enumerate(lens)]
    for i, (r, n) in enumerate(zip(roles, lens, strict=True)):
        if (tags[i] or {}).get("is_padding", False):
            roles[i] = torch.full((n,), int(Role.OTHER), dtype=r.dtype)
        elif r.shape[-1] != n:
            raise ValueError(f"srpo: sample {i}'s {KEY_ROLES} has {r.shape[-1]} entries for a response of {n} tokens")
    return roles


def _v1_compute_old_log_prob_with_srpo(self, batch, metrics, base):
    name = _estimator_name(self.config.algorithm.adv_estimator)
    if name in ESTIMATORS:
        _v1_refuse_unsupported(self, batch, name)
    batch = base(self, batch, metrics)
    if name not in ESTIMATORS:
        return batch
    import transfer_queue as tq
    from tensordict import TensorDict

    options = options_from_config(self.config.algorithm)
    step = int(getattr(self, "global_steps", 0) or 0)
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)
    out = {KEY_LOGP_CORRUPT: _nested(_v1_log_probs(self, batch, v1_corrupted_fields(data, options, step)))}
    if name == "srpo":
        roles = _v1_roles(data, batch.tags, self.tokenizer)
        out[KEY_ROLES] = _nested(roles)
        masks = [m.bool() for m in data["response_mask"].unbind()]
        # only the perception tokens the policy wrote leave the context; masked tokens (tool output) stay
        kept = [~(m & (r == Role.PERCEPTION)) for m, r in zip(masks, roles, strict=True)]
        if options.ablates and any(bool((m & ~k).any()) for m, k in zip(masks, kept, strict=True)):
            old = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["old_log_probs"])
            olds = list(old["old_log_probs"].unbind())
            if options.ablation_mode == "mask":
                compact, counts, valid = _v1_log_probs(self, batch, v1_ablated_fields(data, kept)), None, kept
            else:
                fields, ab = v1_rebuilt_fields(data, roles, masks, options)
                compact = _v1_log_probs(self, batch, fields)
                counts = ab.attention_mask.sum(1).tolist()
            ablated = []
            for i, c in enumerate(compact):
                want = int(kept[i].sum()) if counts is None else int(counts[i])
                if c.shape[-1] != want:
                    raise RuntimeError(f"srpo: the ablated pass returned {c.shape[-1]} log-probs for response {i}, "
                                       f"whose ablated copy has {want} tokens")
            if counts is None:
                for c, k, o in zip(compact, kept, olds, strict=True):
                    row = torch.zeros_like(o)
                    row[k] = c.to(o.dtype)
                    ablated.append(row)
            else:
                back = ab.gather(_padded([c.to(torch.float32) for c in compact], ab.input_ids.shape[1]))
                lens = [o.shape[-1] for o in olds]
                ablated = [back[i, :n].to(o.dtype) for i, (n, o) in enumerate(zip(lens, olds, strict=True))]
                valid = [ab.valid[i, :n] & masks[i] for i, n in enumerate(lens)]
            out[KEY_LOGP_ABLATED] = _nested(ablated)
            out[KEY_ABLATED_VALID] = _nested([v.to(torch.float32) for v in valid])
        elif options.ablates:
            old = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["old_log_probs"])
            out[KEY_LOGP_ABLATED] = old["old_log_probs"].clone()
            out[KEY_ABLATED_VALID] = _nested([m.to(torch.float32) for m in masks])
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(out, batch_size=len(batch)))
    return batch


def _v1_compute_advantage_with_srpo(self, batch, metrics, base):
    name = _estimator_name(self.config.algorithm.adv_estimator)
    if name not in ESTIMATORS:
        return base(self, batch, metrics)
    import transfer_queue as tq

    _v1_refuse_unsupported(self, batch, name)
    # exactly the fields the old-log-prob step wrote (the TransferQueue is not asked for absent ones)
    wanted = [KEY_LOGP_CORRUPT]
    if name == "srpo":
        wanted.append(KEY_ROLES)
        if options_from_config(self.config.algorithm).ablates:
            wanted += [KEY_LOGP_ABLATED, KEY_ABLATED_VALID]
    fields = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=wanted)
    padded = fields.to_padded_tensor()
    step = _V1AdvantageStep({k: padded[k] for k in wanted if k in padded.keys()})
    token = _V1_STEP.set(step)
    try:
        batch = base(self, batch, metrics)
    finally:
        _V1_STEP.reset(token)
    metrics.update(step.stats)
    return batch


_V1_CLASSES: dict[type, type] = {}


def srpo_v1_trainer_class(base: type) -> type:
    """A subclass of a v1 ``PPOTrainer`` (sync, colocate/separate async) with SRPO's passes (cached per base)."""
    if base not in _V1_CLASSES:
        def _compute_old_log_prob(self, batch, metrics):
            return _v1_compute_old_log_prob_with_srpo(self, batch, metrics, base._compute_old_log_prob)

        def _compute_advantage(self, batch, metrics):
            return _v1_compute_advantage_with_srpo(self, batch, metrics, base._compute_advantage)

        def __init__(self, config, *args, **kwargs):
            _check_options(config)  # before the workers start
            base.__init__(self, config, *args, **kwargs)

        _V1_CLASSES[base] = type(f"SRPO{base.__name__}", (base,), {
            "__doc__": f"``{base.__name__}`` with SRPO's contrast passes (see srpo_core.adapters.verl).",
            "__init__": __init__, "_compute_old_log_prob": _compute_old_log_prob,
            "_compute_advantage": _compute_advantage})
    return _V1_CLASSES[base]


def _build_v1_task_runner_class():
    import ray
    from verl.trainer import main_ppo

    base = main_ppo.TaskRunnerV1
    base = getattr(base, "__ray_actor_class__", base)

    class SRPOTaskRunnerV1(base):
        """verl's v1 TaskRunner, with ``install()`` and the SRPO subclass of the configured v1 trainer."""

        def run(self, config):
            _check_options(config)
            install()
            from verl.trainer.ppo import v1

            verl_get = getattr(v1.get_trainer_cls, "__srpo_original__", v1.get_trainer_cls)

            def get_trainer_cls(name):
                return srpo_v1_trainer_class(verl_get(name))

            get_trainer_cls.__srpo_original__ = verl_get
            v1.get_trainer_cls = get_trainer_cls
            return super().run(config)

    SRPOTaskRunnerV1.__name__ = SRPOTaskRunnerV1.__qualname__ = "SRPOTaskRunnerV1"
    return SRPOTaskRunnerV1, ray.remote(SRPOTaskRunnerV1)


_LAZY: dict[str, Any] = {}


def __getattr__(name: str):
    """``SRPORayPPOTrainer``, ``SRPOTaskRunner``/``SRPOTaskRunnerV1`` (plain classes) and ``SRPOTaskRunnerRemote``/
    ``SRPOTaskRunnerV1Remote`` (the Ray actor classes) are built on first access, so importing this module never
    imports verl."""
    if name == "SRPORayPPOTrainer":
        if name not in _LAZY:
            _LAZY[name] = _build_trainer_class()
        return _LAZY[name]
    if name in ("SRPOTaskRunner", "SRPOTaskRunnerRemote"):
        if name not in _LAZY:
            _LAZY["SRPOTaskRunner"], _LAZY["SRPOTaskRunnerRemote"] = _build_task_runner_class()
        return _LAZY[name]
    if name in ("SRPOTaskRunnerV1", "SRPOTaskRunnerV1Remote"):
        if name not in _LAZY:
            _LAZY["SRPOTaskRunnerV1"], _LAZY["SRPOTaskRunnerV1Remote"] = _build_v1_task_runner_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_runner_name(config) -> str:
    """The task runner the entry point starts for ``config``: ``SRPOTaskRunnerV1Remote`` unless
    ``trainer.use_v1=false`` (verl 0.9's default is true)."""
    trainer = config.get("trainer", {}) if hasattr(config, "get") else {}
    return "SRPOTaskRunnerV1Remote" if bool(trainer.get("use_v1", True)) else "SRPOTaskRunnerRemote"


def main() -> None:
    """``python -m srpo_core.adapters.verl algorithm.adv_estimator=srpo ...`` (verl's Hydra config ``ppo_trainer``;
    SRPO options under ``+algorithm.srpo.<key>=...``; ``trainer.use_v1=false`` for the legacy trainer)."""
    import os

    import hydra
    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")

    @hydra.main(config_path=config_dir, config_name="ppo_trainer", version_base=None)
    def _main(config):
        from verl.trainer.main_ppo import run_ppo
        from verl.utils.device import auto_set_device

        _check_options(config)  # here, before Ray starts
        auto_set_device(config)
        run_ppo(config, task_runner_class=__getattr__(task_runner_name(config)))

    _main()


if __name__ == "__main__":
    main()
