"""OpenRLHF adapter (OpenRLHF 0.11, estimator ``group_norm``): no registry, so two methods are patched.

:func:`install` patches ``openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker``:

- ``make_experience``: after OpenRLHF's forwards, one more actor forward per micro-batch with corrupted
  ``mm_train_inputs`` (Qwen-VL ``pixel_values``, one mask per prompt) gives ``srpo_logp_corrupt``; the response roles
  come from the tokenizer. Both are stored as attributes of each ``Experience``.
- ``compute_advantages_and_returns``: after OpenRLHF's ``group_norm`` (``(r − mean) / (std + 1e-9)`` per prompt,
  broadcast over the response), the advantages of the whole batch are refined together with SRPO or the VPPO preset
  (:func:`refine_experiences`). Other estimators are left alone.

Launch: ``python -m srpo_core.adapters.openrlhf --srpo '{"beta_perception": 0.5}' <train_ppo_ray arguments>``
(:func:`launch`). OpenRLHF's ``train_ppo_ray`` builds its argument parser under ``if __name__ == "__main__"`` and
keeps the experience maker in a Ray actor (``PPOTrainer.remote``), so the wrapper starts Ray itself with the patch
as every worker's ``worker_process_setup_hook`` (OpenRLHF's ``train`` then reuses that Ray), and runs the module as
``__main__``. By hand: ``ray.init(runtime_env={"worker_process_setup_hook": "srpo_core.adapters.openrlhf.install",
"env_vars": {"SRPO_OPENRLHF": '{"method": "srpo", "beta_perception": 0.5}'}})`` before OpenRLHF's ``train``.

Limits, stated rather than hidden: the ablated pass (reasoning contrast) is not wired for OpenRLHF — its reasoning
tokens carry no signal and are scored like OTHER tokens (``ablation_mode`` is validated against
:data:`srpo_core.ablation.ABLATION_MODES` like every adapter's, and runs nothing here; D183); and the KL must be a
loss term (``--algo.kl.use_loss``, the GRPO recipe), since a KL folded into the reward makes the advantage vary along
the response, which is refused.
Importing this module imports no OpenRLHF, Ray or DeepSpeed.
"""

from __future__ import annotations

import json
import os

import torch

from srpo_core.adapters._common import (
    KEY_LOGP_CORRUPT,
    KEY_ROLES,
    AdapterOptions,
    corrupt_multi_modal_inputs,
    refine_advantages,
    sequence_advantages,
)

ENV_OPTIONS = "SRPO_OPENRLHF"
ENTRY_MODULE = "openrlhf.cli.train_ppo_ray"
# The environment OpenRLHF's train() gives Ray when it starts it (kept when the wrapper starts Ray instead).
_OPENRLHF_ENV = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
__all__ = ["ENTRY_MODULE", "ENV_OPTIONS", "install", "launch", "refine_experiences"]


def _options_from_env() -> tuple[str, AdapterOptions]:
    raw = json.loads(os.environ.get(ENV_OPTIONS, "{}") or "{}")
    method = raw.pop("method", "srpo")
    return method, AdapterOptions.from_mapping(raw)


def _pad_cat(tensors: list[torch.Tensor], fill) -> torch.Tensor:
    width = max((t.shape[1] for t in tensors), default=0)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors], dim=0)


def refine_experiences(experiences, n_samples_per_prompt: int, method: str = "srpo",
                       options: AdapterOptions = AdapterOptions()) -> dict[str, float]:  # noqa: B008 - frozen
    """Refine the ``advantages [b, A]`` of a list of OpenRLHF ``Experience`` objects in place, as one batch.

    Reads ``advantages``, ``action_mask``, ``action_log_probs`` and the attributes ``srpo_logp_corrupt`` /
    ``srpo_roles`` that the patched ``make_experience`` adds. The experiences' ``A`` (response widths) may differ;
    they are padded to one width for the batch statistics and cut back. Returns float metrics.
    """
    del n_samples_per_prompt  # the advantage already holds the group baseline; kept for the signature's clarity
    if not experiences:
        return {}
    widths = [e.action_mask.shape[1] for e in experiences]
    mask = _pad_cat([e.action_mask.bool() for e in experiences], False)
    adv = _pad_cat([e.advantages.float() for e in experiences], 0.0)
    logp = _pad_cat([e.action_log_probs.float() for e in experiences], 0.0)
    corrupt = _pad_cat([getattr(e, KEY_LOGP_CORRUPT).float() for e in experiences], 0.0)
    roles = _pad_cat([getattr(e, KEY_ROLES).to(torch.int64) for e in experiences], 0) if method == "srpo" else None
    seq = sequence_advantages(adv, mask)
    out, stats = refine_advantages(method, seq, mask, logp, logp_corrupt=corrupt, logp_ablated=None, roles=roles,
                                   options=options)
    start = 0
    for e, w in zip(experiences, widths, strict=True):
        b = e.action_mask.shape[0]
        e.advantages = out[start:start + b, :w].to(e.advantages.dtype)
        e.info.update({k: torch.full((b,), v) for k, v in stats.items()})
        start += b
    return stats


def _corrupt_pass(self, samples_list, options: AdapterOptions):
    """One more actor forward per micro-batch with corrupted ``mm_train_inputs`` (OpenRLHF's own dispatch)."""
    import itertools

    import ray

    n = self.args.rollout.n_samples_per_prompt
    mm_list = []
    for s in samples_list:
        groups = torch.as_tensor([i // n for i in (s.index or range(len(s.sequences)))])
        mm_list.append(list(corrupt_multi_modal_inputs(s.mm_train_inputs, groups, mode=options.corrupt_mode,
                                                        p=options.corrupt_p, seed=options.seed)))
    args = self.strategy.args
    duplicate = args.ds.ring_attn_size * args.ds.tensor_parallel_size
    ref = self.actor_model_group.async_run_method_batch(
        method_name="forward", sequences=[s.sequences for s in samples_list],
        action_mask=[s.action_mask for s in samples_list], attention_mask=[s.attention_mask for s in samples_list],
        mm_train_inputs_list=mm_list)
    return list(itertools.chain.from_iterable(ray.get(ref)[::duplicate]))


def install(method: str | None = None, options: AdapterOptions | None = None) -> None:
    """Patch ``RemoteExperienceMaker`` (idempotent). With no arguments (Ray's setup hook), the method and options
    come from the ``SRPO_OPENRLHF`` environment variable (JSON: ``method`` plus option keys)."""
    from openrlhf.trainer.ppo_utils import experience_maker as em

    env_method, env_options = _options_from_env()
    method = method or env_method
    options = options or env_options
    cls = em.RemoteExperienceMaker
    if getattr(cls, "__srpo_installed__", False):
        return
    original_make, original_adv = cls.make_experience, cls.compute_advantages_and_returns

    def make_experience(self, samples_list):
        samples_list = original_make(self, samples_list)
        if self.advantage_estimator != "group_norm" or not any(s.mm_train_inputs for s in samples_list):
            return samples_list  # another estimator, or no image: no corrupted pass (it would not be used)
        for s, lp in zip(samples_list, _corrupt_pass(self, samples_list, options), strict=True):
            setattr(s, KEY_LOGP_CORRUPT, lp)
            if method == "srpo":
                from srpo_core.roles import roles_from_token_ids

                width = s.action_mask.shape[1]
                setattr(s, KEY_ROLES, roles_from_token_ids(s.sequences[:, -width:], self.tokenizer,
                                                           s.action_mask.bool()).roles)
        return samples_list

    def compute_advantages_and_returns(self, experiences):
        experiences = original_adv(self, experiences)
        if self.advantage_estimator == "group_norm" and experiences and hasattr(experiences[0], KEY_LOGP_CORRUPT):
            refine_experiences(experiences, self.args.rollout.n_samples_per_prompt, method, options)
        return experiences

    cls.make_experience = torch.no_grad()(make_experience)
    cls.compute_advantages_and_returns = torch.no_grad()(compute_advantages_and_returns)
    cls.__srpo_installed__ = True


def _split_srpo_argument(argv: list[str]) -> tuple[str, list[str]]:
    """``--srpo JSON`` (or ``--srpo=JSON``) out of ``argv``; the rest is OpenRLHF's."""
    raw, rest, it = os.environ.get(ENV_OPTIONS, "{}") or "{}", [], iter(argv)
    for arg in it:
        if arg == "--srpo":
            raw = next(it, None)
            if raw is None:
                raise SystemExit("error: --srpo takes a JSON object, e.g. --srpo '{\"beta_perception\": 0.5}'")
        elif arg.startswith("--srpo="):
            raw = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return raw, rest


def launch(argv: list[str] | None = None) -> None:
    """``python -m srpo_core.adapters.openrlhf [--srpo JSON] <train_ppo_ray arguments>``: OpenRLHF's
    ``train_ppo_ray`` with SRPO (or ``{"method": "vppo"}``) patched into every Ray worker. Checks first that the
    run is one the adapter refines: ``--algo.advantage.estimator group_norm`` and ``--algo.kl.use_loss``."""
    import runpy
    import sys

    raw, rest = _split_srpo_argument(sys.argv[1:] if argv is None else list(argv))
    try:
        mapping = json.loads(raw)
        if not isinstance(mapping, dict):
            raise ValueError("not a JSON object")
        method = mapping.pop("method", "srpo")
        AdapterOptions.from_mapping(mapping)  # the option names and values, checked before Ray starts
    except ValueError as e:
        raise SystemExit(f"error: --srpo {raw!r}: {e}") from None
    if method not in ("srpo", "vppo"):
        raise SystemExit(f"error: --srpo: `method` must be 'srpo' or 'vppo', got {method!r}")
    estimator = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--algo.advantage.estimator"), None)
    if estimator != "group_norm":
        raise SystemExit("error: SRPO refines OpenRLHF's GRPO advantages: pass --algo.advantage.estimator group_norm "
                         f"(got {estimator!r})")
    if "--algo.kl.use_loss" not in rest:
        raise SystemExit("error: pass --algo.kl.use_loss: a KL folded into the reward makes the advantage vary along "
                         "the response, which SRPO refuses")
    os.environ[ENV_OPTIONS] = json.dumps({"method": method, **mapping})
    import ray

    if not ray.is_initialized():
        env = {k: os.environ.get(k, v) for k, v in _OPENRLHF_ENV.items()}
        ray.init(runtime_env={"worker_process_setup_hook": f"{__name__}.install",
                              "env_vars": {**env, ENV_OPTIONS: os.environ[ENV_OPTIONS]}})
    install()  # this process too (a local-mode actor runs here)
    sys.argv = [ENTRY_MODULE, *rest]
    runpy.run_module(ENTRY_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    launch()
