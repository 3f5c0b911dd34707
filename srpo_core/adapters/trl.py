"""SRPO for TRL: ``SRPOGRPOTrainer``, a drop-in ``GRPOTrainer`` whose advantages are role-aware and per token.

Tested with TRL 1.16 and transformers 5.24 (``srpo-core docs trl``); another TRL is refused at import (the trainer
overrides private ``GRPOTrainer`` methods) unless ``SRPO_ALLOW_UNTESTED_TRL=1``. After TRL has generated, scored and
computed its sequence advantages ``A_i: [B_local]``, the trainer

1. labels each completion's tokens with :func:`srpo_core.roles.roles_from_token_ids` (perception / reasoning / other);
2. runs three teacher-forced passes under ``no_grad`` through :mod:`srpo_core.passes` (each cut after the last
   token its signal reads, the model's own LM head only there, TRL's temperature and logit transform): the original
   inputs (``ℓ``; reused when TRL already computed ``old_per_token_logps``), corrupted ``pixel_values`` (``ℓ̃`` on
   perception tokens, or the ``kl``/``js`` perception contrast; :func:`srpo_core.corruption.corrupt_pixel_values`, one
   mask per prompt) and the completions with their perception span ablated (``ℓ°`` on reasoning tokens,
   :func:`srpo_core.ablation.ablate_span`);
3. calls :func:`srpo_core.role_aware_advantages` (role statistics all-reduced over the accelerator's processes, since
   TRL spreads a prompt's completions over them; the corruption masks and counterfactual donors do not depend on
   the split either, ``_trl_split.py``, so N processes give the weights of one holding the whole batch) and stores
   the ``[B, T]`` token advantages where TRL's ``_compute_loss`` reads them (it broadcasts ``[B]`` and accepts
   ``[B, T]`` as they are), plus SRPO's statistics in TRL's metrics under ``srpo/…``.

Usage: replace ``GRPOTrainer`` by ``SRPOGRPOTrainer`` and ``GRPOConfig`` by :class:`SRPOGRPOConfig`, whose flat
``srpo_*`` fields come from ``TrlParser``, YAML or the command line like TRL's own. In code,
``srpo_config=SRPOConfig(...)`` (the math) and ``srpo_options=SRPOTrainerOptions(...)`` (corruption, ablation, tags,
``roles_fn``) work as well.

The logged ``loss`` equals GRPO's at every step (each response's weights average 1, so its mean token advantage is
``A_i``); what SRPO changed shows in ``srpo/*``: per-role share of ``|A_t|`` beside GRPO's, the weight spread.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch

try:
    import trl
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("srpo_core.adapters.trl needs TRL: install srpo-core with its `trl` extra "
                      "(pip install '.[trl]' in a clone, or 'srpo_core-*.whl[trl]')") from e

from srpo_core.config import Role, SRPOConfig
from srpo_core.ops.role_aware_advantages import RoleAwareAdvantages, role_aware_advantages
from srpo_core.roles import TokenRoles, roles_from_token_ids

# The TRL releases the adapter is tested with, [low, high): it overrides GRPOTrainer's private
# _generate_and_score_completions and calls _get_per_token_logps_and_entropies, which TRL may change in any release.
TESTED_TRL = ("1.16", "1.17")
ALLOW_UNTESTED_ENV = "SRPO_ALLOW_UNTESTED_TRL"
_PRIVATE_METHODS = ("_generate_and_score_completions", "_get_per_token_logps_and_entropies")


def check_trl_version(version: str, trainer_cls: type = GRPOTrainer) -> None:
    """Raise ``ImportError`` unless TRL ``version`` is in :data:`TESTED_TRL` and ``trainer_cls`` has the private
    methods the adapter relies on; with ``SRPO_ALLOW_UNTESTED_TRL=1`` an untested version only warns."""
    from packaging.version import Version

    low, high = (Version(v) for v in TESTED_TRL)
    missing = [name for name in _PRIVATE_METHODS if not callable(getattr(trainer_cls, name, None))]
    if missing:
        raise ImportError(f"srpo_core.adapters.trl: TRL {version}'s GRPOTrainer has no {', '.join(missing)}, which "
                          f"SRPOGRPOTrainer overrides; install a tested TRL: trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}")
    if low <= Version(Version(version).base_version) < high:  # 1.17.0.dev0 counts as 1.17: untested
        return
    message = (f"srpo_core.adapters.trl is tested with trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}, and TRL {version} is "
               f"installed: SRPOGRPOTrainer overrides private GRPOTrainer methods that change between TRL releases")
    if os.environ.get(ALLOW_UNTESTED_ENV, "0") == "1":
        warnings.warn(f"{message} ({ALLOW_UNTESTED_ENV}=1: trying anyway)", stacklevel=2)
        return
    raise ImportError(f"{message}. Install a tested TRL (pip install 'trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}'), or set "
                      f"{ALLOW_UNTESTED_ENV}=1 to try this one at your own risk.")


check_trl_version(trl.__version__)

# The options subclass TRL's GRPOConfig: imported only after the version check above.
from srpo_core.adapters import _trl_passes  # noqa: E402
from srpo_core.adapters._options import ABLATION_OFF  # noqa: E402
from srpo_core.adapters._trl_options import (  # noqa: E402, F401 - METHODS, PRESETS: public names of this module
    METHODS,
    PRESETS,
    SRPOGRPOConfig,
    SRPOTrainerOptions,
    _resolve_srpo_settings,
)


def srpo_change_metrics(result: RoleAwareAdvantages, roles: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """What SRPO changed, for the logs (the loss cannot show it: it equals GRPO's). Per role: its share of the total
    ``|A_t|`` under SRPO (``adv_share``) and under GRPO (``adv_share_grpo``, every token ``|A_i|``); and the spread
    of the weights over all response tokens (``w_std``). ``roles``, ``mask``: ``[B, T]``."""
    w = result.weights.float()
    adv = result.advantages.float().abs() * mask
    grpo = (adv / w.clamp_min(1e-30)) * mask  # |A_i| on every response token (w > 0 there)
    total, total_grpo = float(adv.sum()), float(grpo.sum())
    out = {"w_std": float(w[mask].std(correction=0)) if bool(mask.any()) else float("nan")}
    for role in (Role.PERCEPTION, Role.REASONING):
        sel = mask & (roles == role)
        out[f"{role.name.lower()}/adv_share"] = float(adv[sel].sum()) / total if total > 0 else float("nan")
        out[f"{role.name.lower()}/adv_share_grpo"] = (float(grpo[sel].sum()) / total_grpo if total_grpo > 0
                                                      else float("nan"))
    return out


def check_padding_side(processing_class, *, after_init: bool = False) -> None:
    """Refuse a multimodal processor whose tokenizer does not pad on the left (D238). TRL 1.16 pads ``prompt_ids``
    on the left itself but takes ``mm_token_type_ids`` / ``token_type_ids`` from the processor's own padding
    (huggingface/trl#5785): with prompts of different lengths, Qwen2-VL's image positions (M-RoPE) come out shifted
    in TRL's loss pass and in SRPO's passes alike. A bare tokenizer (text only) has no such fields and passes."""
    tokenizer = getattr(processing_class, "tokenizer", None)
    side = getattr(tokenizer, "padding_side", "left")
    if tokenizer is None or side == "left":
        return
    when = ("was changed after SRPOGRPOTrainer was built" if after_init
            else "must be 'left' for SRPOGRPOTrainer with a multimodal processor")
    raise ValueError(
        f"SRPOGRPOTrainer: processing_class.tokenizer.padding_side is {side!r} and {when}: TRL {trl.__version__} "
        "pads prompt_ids on the left but takes mm_token_type_ids / token_type_ids from the processor's own "
        "padding (huggingface/trl#5785), so with prompts of different lengths the image positions (M-RoPE) are "
        "shifted in the loss pass and in SRPO's passes, silently or as a shape error, in GRPOTrainer alike. Set "
        "processor.tokenizer.padding_side = 'left' (or AutoProcessor.from_pretrained(..., padding_side='left')) "
        "and keep it while training; give GRPO baselines the same processor so the comparison stays fair."
    )


@dataclasses.dataclass
class SRPOStep:
    """What the last generation step computed (for inspection and tests): TRL's sequence advantages ``[B]``,
    SRPO's result (``[B, T]`` tensors), the roles, the three log-prob tensors and the roles as scored (``[B, T]``:
    a reasoning token without ``ℓ°``, e.g. the one after a masked span (D180), is scored as OTHER)."""

    sequence_advantages: torch.Tensor
    result: RoleAwareAdvantages
    roles: TokenRoles
    mask: torch.Tensor
    logp: torch.Tensor
    logp_corrupt: torch.Tensor
    logp_ablated: torch.Tensor
    scored_roles: torch.Tensor | None = None


class SRPOGRPOTrainer(_trl_passes.SRPOPasses, GRPOTrainer):
    """``GRPOTrainer`` with SRPO's role-aware token advantages ``A_{i,t} = w_t · A_i``.

    Takes every ``GRPOTrainer`` argument; SRPO's settings come from ``args`` when it is an :class:`SRPOGRPOConfig`,
    else from ``srpo_config`` (:class:`srpo_core.SRPOConfig`) and ``srpo_options`` (:class:`SRPOTrainerOptions`).
    Multimodal corruption supports the Qwen-VL layout (``pixel_values`` with
    ``image_grid_thw``); text-only batches skip it (``ℓ̃ = ℓ``, no perception signal). A multimodal processor's
    tokenizer must pad on the left (:func:`check_padding_side`, D238).
    """

    def __init__(self, *args, srpo_config: SRPOConfig | None = None, srpo_options: SRPOTrainerOptions | None = None,
                 **kwargs):
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        srpo_config, srpo_options = _resolve_srpo_settings(training_args, srpo_config, srpo_options)
        if not isinstance(srpo_config, SRPOConfig):
            raise TypeError(f"SRPOGRPOTrainer: `srpo_config` must be an srpo_core.SRPOConfig, got "
                            f"{type(srpo_config).__name__}")
        if not isinstance(srpo_options, SRPOTrainerOptions):
            raise TypeError(f"SRPOGRPOTrainer: `srpo_options` must be an SRPOTrainerOptions, got "
                            f"{type(srpo_options).__name__}")
        if srpo_config.reasoning_contrast in ("kl", "js"):
            raise ValueError(f"SRPOGRPOTrainer: reasoning_contrast={srpo_config.reasoning_contrast!r} is not "
                             "supported (the ablated pass gives log-probs only); use 'k3' or 'logratio'. "
                             "perception_contrast accepts 'kl' and 'js' (srpo_core.passes.contrast)")
        if training_args is not None and getattr(training_args, "use_liger_kernel", False):
            raise ValueError(
                "SRPOGRPOTrainer does not support use_liger_kernel=True: Liger's GRPO path takes sequence-level [B] "
                "advantages and patches the model, so SRPO's per-token [B, T] advantages would not reach the loss "
                "as computed here. Set use_liger_kernel=False (TRL's fused LM head already avoids the full logits)."
            )
        processing_class = kwargs.get("processing_class", args[5] if len(args) > 5 else None)
        if processing_class is not None:  # None: TRL loads the processor itself, padding on the left
            check_padding_side(processing_class)
        self.srpo_config = srpo_config
        self.srpo_options = srpo_options
        self._srpo_generation = 0
        self._srpo_last: SRPOStep | None = None
        super().__init__(*args, **kwargs)
        self._srpo_view = None  # explain_every: the token-weight view for TensorBoard / W&B (_trl_view.py)
        if srpo_options.explain_every:
            from srpo_core.adapters._trl_view import TokenViewCallback

            self._srpo_view = TokenViewCallback(self)
            self.add_callback(self._srpo_view)
        if srpo_options.fused_loss:
            from srpo_core.adapters import _trl_fused

            _trl_fused.check_supported(self)

    # ------------------------------------------------------------------ main override
    def _generate_and_score_completions(self, inputs):
        check_padding_side(self.processing_class, after_init=True)  # e.g. an evaluation callback set it to "right"
        out = super()._generate_and_score_completions(inputs)
        return self._srpo_score(out, "train" if self.model.training else "eval")

    def _srpo_score(self, out: dict, mode: str) -> dict:
        """SRPO's part of a generation step on TRL's output ``out`` (this process's rows): roles, the extra passes,
        the token advantages written into ``out["advantages"]``, the metrics. Split from the TRL call so that a test
        can score a batch that several processes generated in one process (``tests/test_trl_distributed.py``)."""
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval

        prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
        completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
        mask = completion_mask.bool()
        if "tool_mask" in out:
            mask = mask & out["tool_mask"].bool()
        seq_adv = out["advantages"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        width_p = prompt_ids.shape[1]
        # Group (prompt) of each local completion: TRL orders a prompt's completions consecutively over processes.
        offset = self.accelerator.process_index * len(seq_adv)
        group_ids = (torch.arange(len(seq_adv)) + offset) // num_generations

        opts = self.srpo_options
        if opts.roles_fn is not None:
            roles = opts.roles_fn(completion_ids, mask, self.processing_class)
            if not isinstance(roles, TokenRoles):
                roles = TokenRoles(*roles) if isinstance(roles, tuple) else TokenRoles(
                    roles, torch.zeros(len(seq_adv), dtype=torch.bool), 0)
        else:
            roles = roles_from_token_ids(completion_ids, self.processing_class, mask,
                                         perception_tags=opts.perception_tags, reasoning_tags=opts.reasoning_tags)
        role_t = roles.roles.to(completion_ids.device).masked_fill(~mask, int(Role.OTHER))

        with torch.no_grad():
            logp = out.get("old_per_token_logps")
            res = self._srpo_passes(out, input_ids, attention_mask, width_p, role_t, mask, group_ids, batch_size,
                                    logp=None if logp is None else logp.float())
            logp, logp_corrupt = res.logp, res.logp_corrupt
            if opts.method != "srpo":
                return self._preset_step(out, mode, seq_adv, roles, mask, logp, logp_corrupt)
            if opts.ablation_mode == ABLATION_OFF:  # no ablated pass: reasoning tokens carry no signal, like OTHER
                logp_ablated = logp
                role_t = role_t.masked_fill(role_t == Role.REASONING, int(Role.OTHER))
            elif res.logp_ablated is None:
                logp_ablated = logp  # nothing removed, or nobody reads ℓ°
            else:
                logp_ablated = res.logp_ablated
                # a reasoning token without ℓ° (after a masked span, D180; no donor) gets no signal, like OTHER
                role_t = role_t.masked_fill((role_t == Role.REASONING) & ~res.has_value.to(role_t.device),
                                            int(Role.OTHER))

        group = torch.distributed.group.WORLD if self.accelerator.num_processes > 1 else None
        signal = res.perception_signal
        res = role_aware_advantages(seq_adv.float(), logp, logp_corrupt, logp_ablated, role_t, mask=mask,
                                    config=self.srpo_config, process_group=group,
                                    perception_signal=None if signal is None else signal.to(logp.device))
        out["advantages"] = res.advantages.to(seq_adv.dtype)  # [B, T]; 0 outside the mask
        self._srpo_last = SRPOStep(seq_adv, res, roles, mask, logp, logp_corrupt, logp_ablated, role_t)
        self._srpo_generation += 1
        if opts.explain_every and (self._srpo_generation - 1) % opts.explain_every == 0:
            self._srpo_write_rollouts(completion_ids, group_ids)

        metrics = self._metrics[mode]
        for key, value in res.stats.items():
            if value == value:  # skip NaN (a role with no tokens)
                metrics[f"srpo/{key}"].append(float(value))
        for key, value in srpo_change_metrics(res, role_t, mask).items():
            if value == value:
                metrics[f"srpo/{key}"].append(value)
        metrics["srpo/malformed_frac"].append(roles.num_malformed / max(len(seq_adv), 1))
        return out

    def _srpo_write_rollouts(self, completion_ids: torch.Tensor, group_ids: torch.Tensor):
        """The last step's rollouts as ``srpo-core explain`` reads them (``explain_every``); returns the path."""
        from srpo_core.rollouts import to_records, write_jsonl

        last, opts = self._srpo_last, self.srpo_options
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        tokens = [tok.batch_decode([[int(i)] for i in row[m]]) for row, m in zip(completion_ids, last.mask.bool(),
                                                                                   strict=True)]
        rank = self.accelerator.process_index
        records = to_records(tokens, last.mask, last.scored_roles, last.logp, last.logp_corrupt, last.logp_ablated,
                             last.sequence_advantages, group_ids.tolist(),
                             [f"r{rank}-{i}" for i in range(len(tokens))])
        view = getattr(self, "_srpo_view", None)
        if view is not None:
            view.record(records, last.result, last.mask, last.sequence_advantages)
        folder = opts.explain_dir or os.path.join(self.args.output_dir, "srpo_rollouts")
        return write_jsonl(os.path.join(folder, f"step-{self.state.global_step:06d}-rank{rank}.jsonl"), records)

    def _preset_step(self, out, mode, seq_adv, roles, mask, logp, logp_corrupt):
        """VPPO's or PAPO's step (no ablated pass): VPPO's token advantages, or PAPO's ℓ̃ kept for the loss."""
        from srpo_core.presets import vppo_advantages

        opts, metrics = self.srpo_options, self._metrics[mode]
        res = None
        if opts.method == "vppo":
            res = vppo_advantages(seq_adv.float(), logp, logp_corrupt, mask=mask, beta_min=opts.vppo_beta_min,
                                  top_k=opts.vppo_top_k)
            out["advantages"] = torch.where(res.loss_mask, res.advantages, 0.0).to(seq_adv.dtype)
            for key, value in res.stats.items():
                metrics[key].append(float(value))
        out["srpo_logp_corrupt"] = logp_corrupt.detach()  # [B, T]: travels with TRL's shuffle to _compute_loss
        self._srpo_last = SRPOStep(seq_adv, res, roles, mask, logp, logp_corrupt, logp)
        self._srpo_generation += 1
        return out

    def _compute_loss(self, model, inputs):
        """TRL's loss (or, with ``fused_loss``, the fused linear policy loss from the last hidden state), plus the
        entropy terms and PAPO's perception KL when the options ask for them (never with ``fused_loss``)."""
        opts = self.srpo_options
        if opts.fused_loss:
            from srpo_core.adapters import _trl_fused

            return _trl_fused.compute_loss(self, model, inputs)
        papo = opts.method == "papo" and "srpo_logp_corrupt" in inputs
        if not (opts.entropy_penalty_coef or papo):
            return super()._compute_loss(model, inputs)
        seen = {}
        original = self._get_per_token_logps_and_entropies
        own = "_get_per_token_logps_and_entropies" in self.__dict__  # an instance attribute set by someone else

        def spy(*args, **kwargs):
            result = original(*args, **kwargs)
            seen["logps"] = result[0]  # [B, T], with gradient: the current policy on the clean image
            return result

        self._get_per_token_logps_and_entropies = spy
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            if own:
                self._get_per_token_logps_and_entropies = original
            else:
                del self._get_per_token_logps_and_entropies
        logp = seen["logps"]
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        count = mask.sum().clamp(min=1)
        mode = "train" if self.model.training else "eval"
        extra = opts.entropy_penalty_coef * (-(logp * mask).sum() / count)
        if papo:
            from srpo_core.presets import papo_perception_kl

            lc = inputs["srpo_logp_corrupt"]
            kl = papo_perception_kl(logp, lc, mask=mask)
            kl_mean = kl.sum() / count
            extra = extra - opts.papo_kl_coef * kl_mean
            extra = extra + opts.papo_aug_entropy_coef * (-(torch.where(mask, lc, 0.0)).sum() / count)
            self._metrics[mode]["papo/kl_prcp"].append(float(kl_mean.detach()))
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss + extra / normalizer
