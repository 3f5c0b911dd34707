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
- ``SRPOTaskRunner`` and :func:`main`: ``python -m srpo_core.adapters.verl <hydra overrides>`` is verl's
  ``main_ppo`` (legacy ``RayPPOTrainer`` path, ``trainer.use_v1=False``) with the two patches applied inside the
  TaskRunner actor, where the trainer lives. verl 0.9.1 defaults to ``trainer.use_v1=true``, whose trainer computes
  old log-probs through its TransferQueue and fetches a fixed field list for the advantage step, so the contrast
  passes do not reach it yet: the entry point refuses ``use_v1=true`` with that message instead of silently
  switching paths.

The Ray workers need nothing from srpo-core: the extra passes are ordinary ``compute_log_prob`` calls on batches
the driver prepared (corrupted ``pixel_values`` in ``multi_modal_inputs``, the perception span removed from the
``attention_mask``). Importing this module imports no verl; ``SRPORayPPOTrainer`` and ``SRPOTaskRunner`` are built on
first access.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from srpo_core.adapters._common import (
    ESTIMATORS,
    KEY_LOGP_ABLATED,
    KEY_LOGP_CORRUPT,
    KEY_METRICS,
    KEY_ROLES,
    AdapterOptions,
    corrupt_multi_modal_inputs,
    group_ids,
    perception_span_hidden,
    realign_compact,
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
]


def srpo_token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor, old_log_probs: torch.Tensor, *,
                          logp_corrupt: torch.Tensor | None, logp_ablated: torch.Tensor | None = None,
                          roles: torch.Tensor | None = None, estimator: str = "srpo",
                          options: AdapterOptions = AdapterOptions()  # noqa: B008 - frozen
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """verl tensors in, per-token advantages out (``[bs, response_length]``, 0 outside ``response_mask``).

    ``advantages`` is an outcome estimator's output (GRPO: ``A_i · response_mask``); ``old_log_probs``,
    ``logp_corrupt``, ``logp_ablated`` the three teacher-forced log-probs of the sampled tokens; ``roles`` int per
    token. Returns the new advantages (in ``advantages``' dtype) and float metrics (``srpo/…`` or ``vppo/…``).
    """
    mask = response_mask.bool()
    seq = sequence_advantages(advantages, mask)
    out, stats = refine_advantages(estimator, seq, mask, old_log_probs, logp_corrupt=logp_corrupt,
                                   logp_ablated=logp_ablated, roles=roles, options=options)
    return out.to(advantages.dtype), stats


def options_from_config(config) -> AdapterOptions:
    """Options from ``config.algorithm.srpo`` (an OmegaConf node or a mapping; absent → defaults)."""
    node = None
    if config is not None:
        node = config.get("srpo", None) if hasattr(config, "get") else getattr(config, "srpo", None)
    if node is not None and not isinstance(node, dict):
        try:
            from omegaconf import OmegaConf

            node = OmegaConf.to_container(node, resolve=True)
        except ImportError:  # pragma: no cover - verl always brings omegaconf
            node = dict(node)
    return AdapterOptions.from_mapping(node)


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
        estimator=name, options=options_from_config(config))
    batch["advantages"] = advantages
    batch["returns"] = advantages
    data.meta_info[KEY_METRICS] = stats
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


V1_REFUSAL = ("srpo_core.adapters.verl runs SRPO on verl's legacy trainer (RayPPOTrainer): add trainer.use_v1=False. "
              "verl 0.9's default v1 trainer computes old log-probs through its TransferQueue and fetches a fixed "
              "list of fields for the advantage step, so the corrupted-image and ablated passes SRPO needs do not "
              "reach it (adv_estimator=srpo would fail there for lack of srpo_* keys).")


def check_entry_config(config) -> None:
    """Refuse a config the entry point cannot run as asked (today: ``trainer.use_v1=true``) with the fix."""
    trainer = config.get("trainer", {}) if hasattr(config, "get") else {}
    if bool(trainer.get("use_v1", False)):
        raise SystemExit(f"error: {V1_REFUSAL}")


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
        mm, groups, mode=options.corrupt_mode, p=options.corrupt_p, seed=options.seed * 100_003 + step)
    return out


def ablated_batch(data, roles: torch.Tensor):
    """``data`` with each response's perception tokens removed from ``attention_mask`` (positions kept)."""
    out = _shallow_copy(data)
    batch = out.batch
    hidden = perception_span_hidden(batch["attention_mask"], batch["response_mask"], roles)
    batch["attention_mask"] = hidden
    r = batch["response_mask"].shape[1]
    batch["response_mask"] = batch["response_mask"] * hidden[:, -r:].to(batch["response_mask"].dtype)
    return out


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
            if options.ablate and bool(((roles == Role.PERCEPTION) & response_mask).any()):
                kept = response_mask & (roles != Role.PERCEPTION)
                compact = logp_of(ablated_batch(batch, roles))
                old.batch[KEY_LOGP_ABLATED] = realign_compact(compact, kept)
            elif options.ablate:
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
            install()
            main_ppo_v0.RayPPOTrainer = __getattr__("SRPORayPPOTrainer")
            return super().run(config)

    SRPOTaskRunner.__name__ = SRPOTaskRunner.__qualname__ = "SRPOTaskRunner"
    return SRPOTaskRunner, ray.remote(SRPOTaskRunner)


_LAZY: dict[str, Any] = {}


def __getattr__(name: str):
    """``SRPORayPPOTrainer``, ``SRPOTaskRunner`` (plain class) and ``SRPOTaskRunnerRemote`` (the Ray actor class) are
    built on first access, so importing this module never imports verl."""
    if name == "SRPORayPPOTrainer":
        if name not in _LAZY:
            _LAZY[name] = _build_trainer_class()
        return _LAZY[name]
    if name in ("SRPOTaskRunner", "SRPOTaskRunnerRemote"):
        if name not in _LAZY:
            _LAZY["SRPOTaskRunner"], _LAZY["SRPOTaskRunnerRemote"] = _build_task_runner_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """``python -m srpo_core.adapters.verl algorithm.adv_estimator=srpo trainer.use_v1=False ...`` (verl's Hydra
    config ``ppo_trainer``; SRPO options under ``+algorithm.srpo.<key>=...``)."""
    import os

    import hydra
    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")

    @hydra.main(config_path=config_dir, config_name="ppo_trainer", version_base=None)
    def _main(config):
        check_entry_config(config)
        from verl.trainer.main_ppo import run_ppo
        from verl.utils.device import auto_set_device

        auto_set_device(config)
        run_ppo(config, task_runner_class=__getattr__("SRPOTaskRunnerRemote"))

    _main()


if __name__ == "__main__":
    main()
