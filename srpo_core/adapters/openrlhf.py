"""OpenRLHF adapter (OpenRLHF 0.11, estimator ``group_norm``): no registry, so two methods are patched.

:func:`install` patches ``openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker``:

- ``make_experience``: after OpenRLHF's forwards, one more actor forward per micro-batch with corrupted
  ``mm_train_inputs`` (Qwen-VL ``pixel_values``, one mask per prompt) gives ``srpo_logp_corrupt``; the response roles
  come from the tokenizer. Both are stored as attributes of each ``Experience``.
- ``compute_advantages_and_returns``: after OpenRLHF's ``group_norm`` (``(r − mean) / (std + 1e-9)`` per prompt,
  broadcast over the response), the advantages of the whole batch are refined together with SRPO or the VPPO preset
  (:func:`refine_experiences`). Other estimators are left alone.

- the ablated pass (reasoning contrast, ``ablation_mode`` ``counterfactual`` or ``drop``): one more actor forward
  per micro-batch on the sequences rebuilt with each response's perception span replaced by another response's of
  the same prompt (or removed), through OpenRLHF's own dispatch; ``ℓ°`` is gathered back onto the original tokens.

Launch: ``python -m srpo_core.adapters.openrlhf --srpo.beta_perception 0.5 <train_ppo_ray arguments>`` (or ``--srpo
'{"beta_perception": 0.5}'``; :func:`launch`). OpenRLHF's ``train_ppo_ray`` builds its argument parser under ``if
__name__ == "__main__"`` and keeps the experience maker in a Ray actor (``PPOTrainer.remote``), so the wrapper
starts Ray itself with the patch as every worker's ``worker_process_setup_hook`` (OpenRLHF's ``train`` then reuses
that Ray), and runs the module as ``__main__``. By hand: ``ray.init(runtime_env={"worker_process_setup_hook":
"srpo_core.adapters.openrlhf.install", "env_vars": {"SRPO_OPENRLHF": '{"method": "srpo", "beta_perception":
0.5}'}})`` before OpenRLHF's ``train``.

Limits, stated rather than hidden: ``ablation_mode="mask"`` is refused (OpenRLHF's ``Actor.forward`` computes the
positions itself, from the attention mask or, for a VLM, inside the model, so a hidden span cannot keep the original
positions of the later tokens; D188); and the KL must be a loss term (``--algo.kl.use_loss``, the GRPO recipe), since
a KL folded into the reward makes the advantage vary along the response, which is refused.
Importing this module imports no OpenRLHF, Ray or DeepSpeed.
"""

from __future__ import annotations

import json
import os

import torch

from srpo_core.adapters._common import (
    KEY_ABLATED_VALID,
    KEY_LOGP_ABLATED,
    KEY_LOGP_CORRUPT,
    KEY_ROLES,
    AdapterOptions,
    corrupt_multi_modal_inputs,
    refine_advantages,
    require_ablation_mode,
    sequence_advantages,
)
from srpo_core.config import Role

ENV_OPTIONS = "SRPO_OPENRLHF"
ENTRY_MODULE = "openrlhf.cli.train_ppo_ray"
# The environment OpenRLHF's train() gives Ray when it starts it (kept when the wrapper starts Ray instead).
_OPENRLHF_ENV = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
__all__ = ["ENTRY_MODULE", "ENV_OPTIONS", "install", "launch", "refine_experiences"]


METHODS = ("srpo", "vppo")
# what OpenRLHF's forward can run: it computes the positions itself, so a span hidden with positions kept cannot be
ABLATION_MODES_RUN = ("counterfactual", "drop")
_WHERE = "srpo (OpenRLHF)"


def read_options(mapping, spell) -> tuple[str, AdapterOptions]:
    """``(method, options)`` from one flat mapping (``method`` plus option names), every value checked; ``spell(k)``
    is the user's spelling of key ``k`` (``--srpo.corruption_p``), named in every error."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{_WHERE}: the options must be a JSON object of option names, got {type(mapping).__name__}")
    mapping = dict(mapping)
    method = mapping.pop("method", "srpo")
    if method not in METHODS:
        raise ValueError(f"{_WHERE}: `{spell('method')}` must be one of {METHODS}, got {method!r}")
    options = AdapterOptions.from_mapping(mapping, where=_WHERE, spell=spell)
    if method == "srpo":
        require_ablation_mode("OpenRLHF", options, ABLATION_MODES_RUN, spelled=spell("ablation_mode"),
                              missing=": 'mask' needs the original positions after a hidden span, and OpenRLHF's "
                                      "Actor.forward computes positions itself")
    return method, options


def _options_from_env() -> tuple[str, AdapterOptions]:
    raw = os.environ.get(ENV_OPTIONS, "{}") or "{}"
    try:
        mapping = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{_WHERE}: ${ENV_OPTIONS} must hold a JSON object, got {raw[:80]!r} ({e})") from None
    return read_options(mapping, lambda k: f'"{k}" in ${ENV_OPTIONS}')


def _pad_cat(tensors: list[torch.Tensor], fill) -> torch.Tensor:
    width = max((t.shape[1] for t in tensors), default=0)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors], dim=0)


def refine_experiences(experiences, n_samples_per_prompt: int, method: str = "srpo",
                       options: AdapterOptions = AdapterOptions()) -> dict[str, float]:  # noqa: B008 - frozen
    """Refine the ``advantages [b, A]`` of a list of OpenRLHF ``Experience`` objects in place, as one batch.

    Reads ``advantages``, ``action_mask``, ``action_log_probs`` and the attributes ``srpo_logp_corrupt`` /
    ``srpo_roles`` / ``srpo_logp_ablated`` / ``srpo_ablated_valid`` that the patched ``make_experience`` adds
    (without the ablated ones, the reasoning tokens are scored like OTHER tokens). The experiences' ``A`` (response
    widths) may differ; they are padded to one width for the batch statistics and cut back. Returns float metrics.
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
    ablated = valid = None
    if method == "srpo" and all(getattr(e, KEY_LOGP_ABLATED, None) is not None for e in experiences):
        ablated = _pad_cat([getattr(e, KEY_LOGP_ABLATED).float() for e in experiences], 0.0)
        valid = _pad_cat([getattr(e, KEY_ABLATED_VALID).bool() for e in experiences], False)
    seq = sequence_advantages(adv, mask)
    out, stats = refine_advantages(method, seq, mask, logp, logp_corrupt=corrupt, logp_ablated=ablated, roles=roles,
                                   ablated_valid=valid, options=options)
    start = 0
    for e, w in zip(experiences, widths, strict=True):
        b = e.action_mask.shape[0]
        e.advantages = out[start:start + b, :w].to(e.advantages.dtype)
        e.info.update({k: torch.full((b,), v) for k, v in stats.items()})
        start += b
    return stats


def _corrupt_pass(self, samples_list, options: AdapterOptions):
    """One more actor forward per micro-batch with corrupted ``mm_train_inputs`` (OpenRLHF's own dispatch)."""


    n = self.args.rollout.n_samples_per_prompt
    # a new draw each rollout step, as verl and EasyR1 do (Experience.index may restart every step): call k of this
    # experience maker uses seed·100003 + k, so the first one is the plain seed
    step = getattr(self, "_srpo_corrupt_calls", 0)
    self._srpo_corrupt_calls = step + 1
    mm_list = [list(corrupt_multi_modal_inputs(s.mm_train_inputs, groups // n, mode=options.corruption_mode,
                                               p=options.corruption_p, seed=options.seed * 100_003 + step))
               for s, groups in zip(samples_list, _sample_indices(samples_list), strict=True)]
    return _forward(self, [s.sequences for s in samples_list], [s.attention_mask for s in samples_list],
                    [s.action_mask for s in samples_list], mm_list)


def _sample_indices(samples_list) -> list[torch.Tensor]:
    """Each micro-batch's sample indices (``Experience.index``; counted on in batch order where it is absent)."""
    out, start = [], 0
    for s in samples_list:
        b = len(s.sequences)
        out.append(torch.as_tensor(list(s.index) if s.index is not None else range(start, start + b)))
        start += b
    return out


def _forward(self, sequences, attention_masks, action_masks, mm_list) -> list[torch.Tensor]:
    """The actor's ``forward`` on each micro-batch, through OpenRLHF's own dispatch; action log-probs per batch."""
    import itertools

    import ray

    args = self.strategy.args
    duplicate = args.ds.ring_attn_size * args.ds.tensor_parallel_size
    ref = self.actor_model_group.async_run_method_batch(
        method_name="forward", sequences=sequences, action_mask=action_masks, attention_mask=attention_masks,
        mm_train_inputs_list=mm_list)
    return list(itertools.chain.from_iterable(ray.get(ref)[::duplicate]))


def ablated_inputs(samples_list, roles_list: list[torch.Tensor], n_samples_per_prompt: int, options: AdapterOptions,
                   pad_token_id: int = 0):
    """The ablated pass's inputs for OpenRLHF samples (``sequences [b, L]`` right-padded, ``action_mask [b, A]`` over
    the last ``A`` tokens, as ``Actor.forward`` reads it; ``A = L − 1`` as OpenRLHF builds them): the micro-batches
    are ablated together (a counterfactual donor may sit in another micro-batch), with
    :func:`srpo_core.ablation.ablate_span` in ``options.ablation_mode``, then split back.

    Returns ``(sequences, attention_masks, action_masks, ab)``: per micro-batch lists, each cut to its longest row,
    and the :class:`srpo_core.ablation.AblatedBatch` over the whole (its rows in micro-batch order).
    """
    from srpo_core.ablation import ablate_span, counterfactual_donors

    def full(t: torch.Tensor, s) -> torch.Tensor:  # [b, A] over the last A tokens -> [b, L] over the sequence
        return torch.nn.functional.pad(t.to(torch.int64), (s.sequences.shape[1] - t.shape[1], 0), value=0)

    seq = _pad_cat([s.sequences for s in samples_list], pad_token_id)
    attn = _pad_cat([s.attention_mask.to(torch.int64) for s in samples_list], 0)
    action = _pad_cat([full(s.action_mask, s) for s in samples_list], 0)
    roles = _pad_cat([full(r, s) for r, s in zip(roles_list, samples_list, strict=True)], 0)
    span = (roles == Role.PERCEPTION) & action.bool() & attn.bool()
    donor = None
    if options.ablation_mode == "counterfactual":
        groups = torch.cat(_sample_indices(samples_list)) // n_samples_per_prompt
        donor = counterfactual_donors(groups, options.counterfactual_source, input_ids=seq, span_mask=span)
    ab = ablate_span(seq, attn, span, mode=options.ablation_mode, pad_token_id=pad_token_id, donor=donor)
    new_action = ab.ablate(action)
    sequences, attention_masks, action_masks, start = [], [], [], 0
    for s in samples_list:
        rows = slice(start, start + len(s.sequences))
        width = max(int(ab.attention_mask[rows].sum(1).max()) if len(s.sequences) else 1, 2)
        sequences.append(ab.input_ids[rows, :width])
        attention_masks.append(ab.attention_mask[rows, :width].to(s.attention_mask.dtype))
        action_masks.append(new_action[rows, 1:width].to(s.action_mask.dtype))
        start += len(s.sequences)
    return sequences, attention_masks, action_masks, ab


def _ablated_pass(self, samples_list, roles_list, options: AdapterOptions):
    """``(ℓ°, valid)`` per micro-batch, ``[b, A]`` like its ``action_mask``: one actor forward per micro-batch on
    :func:`ablated_inputs` (clean images), the results gathered back onto the original tokens."""
    pad = getattr(self.tokenizer, "pad_token_id", None) or 0
    sequences, attention_masks, action_masks, ab = ablated_inputs(
        samples_list, roles_list, self.args.rollout.n_samples_per_prompt, options, pad_token_id=int(pad))
    outs = _forward(self, sequences, attention_masks, action_masks, [s.mm_train_inputs for s in samples_list])
    values = torch.zeros(ab.input_ids.shape, dtype=torch.float32)
    start = 0
    for out, seq in zip(outs, sequences, strict=True):
        values[start:start + len(seq), 1:seq.shape[1]] = out.float().cpu()[:, :seq.shape[1] - 1]
        start += len(seq)
    back, valid = ab.gather(values), ab.valid
    result, start = [], 0
    for s in samples_list:
        rows, length, width = slice(start, start + len(s.sequences)), s.sequences.shape[1], s.action_mask.shape[1]
        cols = slice(length - width, length)
        result.append((back[rows, cols], valid[rows, cols] & s.action_mask.bool().cpu()))
        start += len(s.sequences)
    return result


def install(method: str | None = None, options: AdapterOptions | None = None) -> None:
    """Patch ``RemoteExperienceMaker`` (idempotent). With no arguments (Ray's setup hook), the method and options
    come from the ``SRPO_OPENRLHF`` environment variable (JSON: ``method`` plus option keys)."""
    from openrlhf.trainer.ppo_utils import experience_maker as em

    env_method, env_options = _options_from_env()
    if method is not None and method not in METHODS:
        raise ValueError(f"{_WHERE}: `method` must be one of {METHODS}, got {method!r}")
    method = method or env_method
    options = AdapterOptions.from_mapping(options, where=_WHERE) if options is not None else env_options
    if method == "srpo":
        require_ablation_mode("OpenRLHF", options, ABLATION_MODES_RUN)
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
        if method == "srpo" and options.ablates:
            roles = [getattr(s, KEY_ROLES) for s in samples_list]
            if any(bool((r == Role.PERCEPTION).any()) for r in roles):
                for s, (lp, valid) in zip(samples_list, _ablated_pass(self, samples_list, roles, options),
                                          strict=True):
                    setattr(s, KEY_LOGP_ABLATED, lp)
                    setattr(s, KEY_ABLATED_VALID, valid)
        return samples_list

    def compute_advantages_and_returns(self, experiences):
        experiences = original_adv(self, experiences)
        if self.advantage_estimator == "group_norm" and experiences and hasattr(experiences[0], KEY_LOGP_CORRUPT):
            refine_experiences(experiences, self.args.rollout.n_samples_per_prompt, method, options)
        return experiences

    cls.make_experience = torch.no_grad()(make_experience)
    cls.compute_advantages_and_returns = torch.no_grad()(compute_advantages_and_returns)
    cls.__srpo_installed__ = True


FLAG = "--srpo"


def _split_srpo_arguments(argv: list[str]) -> tuple[dict, dict, list[str]]:
    """SRPO's arguments out of ``argv``: ``--srpo JSON`` / ``--srpo=JSON`` (an object of option names) and
    ``--srpo.<name> VALUE`` / ``--srpo.<name>=VALUE`` (one option, OpenRLHF's dotted-flag style; later ones win).
    Returns ``(mapping, spellings, rest)``: the options, how the user wrote each key, and OpenRLHF's arguments."""
    raw = os.environ.get(ENV_OPTIONS, "") or ""
    mapping, spellings, rest, it = {}, {}, [], iter(argv)
    if raw:
        mapping = _json_object(raw, f"${ENV_OPTIONS}")
        spellings = {k: f'"{k}" in ${ENV_OPTIONS}' for k in mapping}
    for arg in it:
        if arg == FLAG or arg.startswith(FLAG + "="):
            text = next(it, None) if arg == FLAG else arg.split("=", 1)[1]
            if text is None:
                raise SystemExit(f"error: {FLAG} takes a JSON object, e.g. {FLAG} '{{\"beta_perception\": 0.5}}'")
            given = _json_object(text, FLAG)
            mapping.update(given)
            spellings.update({k: f'"{k}" in {FLAG} JSON' for k in given})
        elif arg.startswith(FLAG + "."):
            name, eq, value = arg[len(FLAG) + 1:].partition("=")
            if not eq:
                value = next(it, None)
                if value is None or value.startswith("--"):
                    raise SystemExit(f"error: {FLAG}.{name} takes a value")
            mapping[name] = value
            spellings[name] = f"{FLAG}.{name}"
        else:
            rest.append(arg)
    return mapping, spellings, rest


def _json_object(text: str, source: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"error: {source} must be a JSON object of SRPO options, got {text[:80]!r} ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: {source} must be a JSON object of SRPO options, got {text[:80]!r} (not a JSON "
                         f"object)")
    return value


def launch(argv: list[str] | None = None) -> None:
    """``python -m srpo_core.adapters.openrlhf [--srpo.<name> VALUE ...] [--srpo JSON] <train_ppo_ray arguments>``:
    OpenRLHF's ``train_ppo_ray`` with SRPO (or ``--srpo.method vppo``) patched into every Ray worker. Checks first,
    before Ray starts, every SRPO option (errors name the flag as written) and that the run is one the adapter
    refines: ``--algo.advantage.estimator group_norm`` and ``--algo.kl.use_loss``."""
    import runpy
    import sys

    mapping, spellings, rest = _split_srpo_arguments(sys.argv[1:] if argv is None else list(argv))
    try:
        method, options = read_options(mapping, lambda k: spellings.get(k, f"{FLAG}.{k}"))
    except (ValueError, TypeError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}") from None
    estimator = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--algo.advantage.estimator"), None)
    if estimator != "group_norm":
        raise SystemExit("error: SRPO refines OpenRLHF's GRPO advantages: pass --algo.advantage.estimator group_norm "
                         f"(got {estimator!r})")
    if "--algo.kl.use_loss" not in rest:
        raise SystemExit("error: pass --algo.kl.use_loss: a KL folded into the reward makes the advantage vary along "
                         "the response, which SRPO refuses")
    # the workers get the checked values under the current names (no second deprecation warning there)
    checked = {"method": method, **_flat(options)}
    os.environ[ENV_OPTIONS] = json.dumps(checked)
    import ray

    if not ray.is_initialized():
        env = {k: os.environ.get(k, v) for k, v in _OPENRLHF_ENV.items()}
        ray.init(runtime_env={"worker_process_setup_hook": f"{__name__}.install",
                              "env_vars": {**env, ENV_OPTIONS: os.environ[ENV_OPTIONS]}})
    install()  # this process too (a local-mode actor runs here)
    sys.argv = [ENTRY_MODULE, *rest]
    runpy.run_module(ENTRY_MODULE, run_name="__main__", alter_sys=True)


def _flat(options: AdapterOptions) -> dict:
    """``options`` as one flat mapping of option names (what :meth:`AdapterOptions.from_mapping` reads)."""
    import dataclasses

    flat = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "srpo"}
    flat.update(dataclasses.asdict(options.srpo))
    return flat


if __name__ == "__main__":
    launch()
