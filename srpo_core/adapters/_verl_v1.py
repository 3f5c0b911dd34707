"""verl 0.9's v1 trainer (``trainer.use_v1=true``): SRPO's contrast passes on samples that live in the
TransferQueue. After verl's ``_compute_old_log_prob`` the corrupted and the ablated copies of the batch are written to
a partition of their own, scored by the same ``compute_log_prob`` call, and the results stored as ``srpo_*`` fields of
the samples; ``_compute_advantage`` reads them back and hands them to :func:`srpo_core.adapters.verl.compute_advantage`
(through :data:`_V1_STEP`) for the duration of verl's own advantage step. Imports verl only inside the functions."""

from __future__ import annotations

import contextvars

import numpy as np
import torch

from srpo_core.adapters._common import (
    ESTIMATORS,
    KEY_ABLATED_VALID,
    KEY_LOGP_ABLATED,
    KEY_LOGP_CORRUPT,
    KEY_ROLES,
    AdapterOptions,
    continued_positions,
    corrupt_multi_modal_inputs,
    group_ids,
    rebuilt_responses,
)
from srpo_core.adapters._verl_options import _check_options, _estimator_name, options_from_config
from srpo_core.config import Role

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


def _v1_ablated_log_probs(self, batch, data, roles, masks, kept, options: AdapterOptions):
    """``(ℓ° rows, valid rows)`` per response, on the response's own tokens, from the ablated copy of the samples in
    ``options.ablation_mode`` (``kept[i]``: response ``i``'s tokens that stay, i.e. not perception)."""
    import transfer_queue as tq

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
    return ablated, valid


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
            ablated, valid = _v1_ablated_log_probs(self, batch, data, roles, masks, kept, options)
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
