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

Files: this module (the advantage step, ``install``, the trainer and task-runner classes, the entry point),
``_verl_options`` (reading ``algorithm.srpo``), ``_verl_passes`` (the legacy trainer's passes), ``_verl_v1`` (the v1
trainer's passes); the names below are importable from here.

The Ray workers need nothing from srpo-core: the extra passes are ordinary ``compute_log_prob`` calls on batches
the driver prepared (corrupted ``pixel_values`` in ``multi_modal_inputs``, the perception span removed from the
``attention_mask``). Importing this module imports no verl; ``SRPORayPPOTrainer`` and ``SRPOTaskRunner`` are built on
first access.
"""

from __future__ import annotations

from typing import Any

import torch

from srpo_core.adapters._common import (
    ESTIMATORS,
    KEY_ABLATED_VALID,
    KEY_LOGP_ABLATED,
    KEY_LOGP_CORRUPT,
    KEY_METRICS,
    KEY_ROLES,
    AdapterOptions,
    refine_advantages,
    sequence_advantages,
)
from srpo_core.adapters._verl_options import (  # noqa: F401 - CONFIG_KEY importable from here too
    CONFIG_KEY,
    _check_options,
    _estimator_name,
    options_from_config,
)
from srpo_core.adapters._verl_passes import (  # noqa: F401 - the legacy trainer's passes, importable from here too
    _compute_old_log_prob_with_srpo,
    _update_actor_with_metrics,
    ablated_batch,
    ablated_log_probs,
    corrupted_batch,
)
from srpo_core.adapters._verl_v1 import (  # noqa: F401 - the v1 trainer's pieces, importable from here too
    _V1_STEP,
    V1_CONTRAST_PARTITION,
    _v1_refuse_unsupported,
    srpo_v1_trainer_class,
    v1_ablated_fields,
    v1_corrupted_fields,
    v1_rebuilt_fields,
)

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
