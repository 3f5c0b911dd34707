"""The legacy verl trainer's (``RayPPOTrainer``'s) extra passes: the corrupted-image batch, the perception-ablated
batch, and ``_compute_old_log_prob`` running both through verl's own old-log-prob step (see
:mod:`srpo_core.adapters.verl`, which builds ``SRPORayPPOTrainer`` on them). Imports no verl."""

from __future__ import annotations

import copy

import torch

from srpo_core.adapters._common import (
    ESTIMATORS,
    KEY_ABLATED_VALID,
    KEY_LOGP_ABLATED,
    KEY_LOGP_CORRUPT,
    KEY_METRICS,
    KEY_ROLES,
    AdapterOptions,
    corrupt_multi_modal_inputs,
    group_ids,
    perception_span_hidden,
    realign_compact,
    rebuilt_batch,
)
from srpo_core.adapters._verl_options import _estimator_name, options_from_config
from srpo_core.config import Role


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
