"""The extra teacher-forced passes of :class:`srpo_core.adapters.trl.SRPOGRPOTrainer` (a mixin before
``GRPOTrainer``): the corrupted ``pixel_values`` (``ℓ̃``, or the ``kl``/``js`` perception contrast) and the
completions with their perception span ablated (``ℓ°``: hidden with the original positions injected for
``ablation_mode="mask"``, removed for ``"drop"``, replaced by another response's span for ``"counterfactual"``).

By default (``_srpo_pass_runner = True``) they run through :mod:`srpo_core.passes`: each pass cut after the last
token its signal reads, the LM head only at those tokens (issue 24). ``_srpo_pass_runner = False`` (an internal flag,
for tests and ``benchmarks/bench_passes.py``) runs the former full passes through TRL's own
``_get_per_token_logps_and_entropies``; it has no ``kl``/``js``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from srpo_core import passes
from srpo_core.ablation import ablate_span, counterfactual_donors
from srpo_core.adapters._options import ABLATION_OFF
from srpo_core.adapters._trl_split import (
    corrupt_per_key,
    counterfactual_across_processes,
    num_processes,
    on_any_process,
)
from srpo_core.config import Role
from srpo_core.corruption import CLIP_MEAN, CLIP_STD
from srpo_core.roles import tag_tokens_from_token_ids

# Inputs of TRL's log-prob function that the generation step stores in its output dict.
_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
            "token_type_ids", "mm_token_type_ids", "image_position_ids")
_PER_POSITION_KEYS = ("token_type_ids", "mm_token_type_ids")  # [B, P+C]: ablated like input_ids


@dataclasses.dataclass
class PassResults:
    """What the passes give the advantage step, ``[B, C]`` on the completion positions: ``logp`` (``ℓ``),
    ``logp_corrupt`` (``ℓ̃`` where it was computed, ``ℓ`` elsewhere), ``logp_ablated`` (``ℓ°`` where computed, ``ℓ``
    elsewhere; None when no ablated pass ran), ``has_value`` (bool, the tokens the ablated pass gives a value; None
    when it did not run), ``perception_signal`` (the ``kl``/``js`` contrast on perception tokens, else None)."""

    logp: torch.Tensor
    logp_corrupt: torch.Tensor
    logp_ablated: torch.Tensor | None = None
    has_value: torch.Tensor | None = None
    perception_signal: torch.Tensor | None = None


@dataclasses.dataclass
class _PassPlan:
    """Which passes run, decided once per step: the ``[B, C]`` masks (valid, perception, reasoning tokens), the
    ``kl``/``js`` contrast (``kind`` None for VPPO/PAPO), the corrupted ``pixel_values`` (None when this process
    runs no corrupted pass of its own) and whether it stands in for the others' or runs the ablated pass."""

    mask: torch.Tensor
    perception: torch.Tensor
    reasoning: torch.Tensor
    kind: str | None
    divergence: bool
    needs_corrupt: bool
    corrupted: torch.Tensor | None
    stand_in: bool
    run_ablated: bool


def _wide(x: torch.Tensor, input_ids: torch.Tensor, width_p: int) -> torch.Tensor:
    """``[B, C]`` → ``[B, P + C]``, False on the prompt."""
    return torch.cat([torch.zeros_like(input_ids[:, :width_p], dtype=torch.bool), x.to(input_ids.device)], dim=1)


class SRPOPasses:
    """The passes' methods; they read ``self.srpo_options``, ``self.srpo_config``, ``self.model``,
    ``self.accelerator``, ``self.temperature``, ``self.args`` and (full passes) TRL's
    ``_get_per_token_logps_and_entropies`` of the trainer they are mixed into."""

    _srpo_pass_runner = True  # False: the full passes through TRL's log-prob function (no kl/js)

    def _srpo_passes(self, out: dict, input_ids, attention_mask, width_p, role_t, mask, group_ids, batch_size,
                     logp=None) -> PassResults:
        """ℓ (unless given), ℓ̃ (or the kl/js perception signal) and ℓ° for the batch ``[prompt | completion]``;
        ``role_t``, ``mask``: ``[B, C]``. The corrupted pass reads every completion token for VPPO/PAPO, the
        perception tokens for SRPO; the ablated pass (SRPO only) the reasoning tokens."""
        plan = self._srpo_plan(out, role_t, mask, group_ids)
        if not self._srpo_pass_runner:
            return self._srpo_full_passes(out, input_ids, attention_mask, width_p, plan, group_ids, batch_size, logp)
        common = self._srpo_runner_kwargs(out, batch_size)
        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            logp, clean_hidden = self._srpo_run_clean(model, input_ids, attention_mask, width_p, plan, common, logp)
            res = PassResults(logp, logp)
            if plan.divergence and plan.corrupted is None:  # no image, or no perception token: ℓ̃ = ℓ, a divergence of 0
                res.perception_signal = torch.zeros_like(logp)
            if plan.stand_in:  # the same forwards as a process with images; no image here, so ℓ̃ = ℓ: values unread
                self._srpo_run_stand_in(model, input_ids, attention_mask, width_p, plan, common, clean_hidden)
            if plan.corrupted is not None:
                self._srpo_run_corrupted(res, model, input_ids, attention_mask, width_p, plan, common, clean_hidden)
            if plan.run_ablated:
                self._srpo_run_ablated(res, out, input_ids, attention_mask, width_p, plan, group_ids, common)
        return res

    def _srpo_plan(self, out: dict, role_t, mask, group_ids) -> _PassPlan:
        """Which passes run on this process (agreed with the others: these are collectives) and the corrupted
        ``pixel_values``."""
        opts = self.srpo_options
        perception = (role_t == Role.PERCEPTION) & mask
        reasoning = (role_t == Role.REASONING) & mask
        kind = self.srpo_config.perception_contrast if opts.method == "srpo" else None
        # a pass runs on every process as soon as one needs it: the same forwards everywhere (D223). A process whose
        # rows have no image (TRL drops pixel_values then) still runs the corrupted pass when another process has
        # images, on its clean inputs, its values discarded: its collectives must line up with the others' (D236)
        has_images = out.get("pixel_values") is not None
        needs_corrupt = on_any_process(self, has_images and (opts.method != "srpo" or bool(perception.any())))
        corrupted = self._srpo_corrupt(out, group_ids) if needs_corrupt and has_images else None
        stand_in = needs_corrupt and not has_images  # this process runs the corrupted pass for the others' sake
        run_ablated = (opts.method == "srpo" and opts.ablation_mode != ABLATION_OFF
                       and on_any_process(self, bool(perception.any()) and bool(reasoning.any())))
        return _PassPlan(mask, perception, reasoning, kind, kind in ("kl", "js"), needs_corrupt, corrupted, stand_in,
                         run_ablated)

    def _srpo_full_passes(self, out: dict, input_ids, attention_mask, width_p, plan: _PassPlan, group_ids,
                          batch_size, logp) -> PassResults:
        """The former full passes through TRL's ``_get_per_token_logps_and_entropies`` (log-probs only)."""
        width_c = input_ids.shape[1] - width_p
        if plan.divergence:
            raise ValueError(f"SRPOGRPOTrainer: perception_contrast={plan.kind!r} needs the pass runner "
                             "(_srpo_pass_runner=True); the full passes through TRL give log-probs only")
        if logp is None:
            logp = self._srpo_logps(out, input_ids, attention_mask, width_c, batch_size)
        logp_corrupt = logp if plan.corrupted is None else self._srpo_logps(
            out, input_ids, attention_mask, width_c, batch_size, pixel_values=plan.corrupted)
        res = PassResults(logp, logp_corrupt)
        if plan.run_ablated:
            res.logp_ablated, res.has_value = self._srpo_ablated_logps(out, input_ids, attention_mask,
                                                                       plan.perception, width_p, batch_size,
                                                                       group_ids)
        return res

    def _srpo_run_clean(self, model, input_ids, attention_mask, width_p, plan: _PassPlan, common: dict, logp):
        """``(ℓ [B, C] float32, clean hidden states of the perception tokens or None)``: ℓ from the runner unless
        given; one clean pass gives both when the kl/js contrast needs the clean rows."""
        completion = _wide(attention_mask[:, width_p:].bool(), input_ids, width_p)
        clean_hidden = None
        if logp is None:
            if plan.divergence and plan.needs_corrupt:  # one clean pass for ℓ and the contrast's clean rows
                clean_hidden = passes.hidden_states(model, input_ids, attention_mask, completion,
                                                    **{k: v for k, v in common.items() if k != "head_fp32"})
                head = passes.lm_head(model, self.temperature)
                values = passes.head_logprobs(head, clean_hidden, input_ids[completion],
                                              fp32=common["head_fp32"])
                logp = passes._scatter(values.float(), completion.to(values.device))[:, width_p:]
                clean_hidden = clean_hidden[_wide(plan.perception, input_ids, width_p)[completion]]
            else:
                logp = passes.token_logprobs(model, input_ids, attention_mask, completion,
                                             temperature=self.temperature, **common)[:, width_p:]
        return logp.float(), clean_hidden

    def _srpo_run_stand_in(self, model, input_ids, attention_mask, width_p, plan: _PassPlan, common: dict,
                           clean_hidden) -> None:
        """The corrupted pass of a process without images, on its clean inputs, for the other processes' sake."""
        if plan.divergence:
            passes.contrast(model, input_ids, attention_mask, _wide(plan.perception, input_ids, width_p),
                            {"pixel_values": None}, kind=plan.kind, temperature=self.temperature,
                            clean_hidden=clean_hidden, **common)
        else:
            passes.token_logprobs(model, input_ids, attention_mask,
                                  _wide(plan.mask if self.srpo_options.method != "srpo" else plan.perception,
                                        input_ids, width_p),
                                  temperature=self.temperature, **common)

    def _srpo_run_corrupted(self, res: PassResults, model, input_ids, attention_mask, width_p, plan: _PassPlan,
                            common: dict, clean_hidden) -> None:
        """``res.logp_corrupt`` (and the kl/js ``res.perception_signal``) from the corrupted ``pixel_values``."""
        logp = res.logp
        if plan.divergence:
            c = passes.contrast(model, input_ids, attention_mask, _wide(plan.perception, input_ids, width_p),
                                {"pixel_values": plan.corrupted}, kind=plan.kind, temperature=self.temperature,
                                clean_hidden=clean_hidden, **common)
            res.perception_signal = c.div[:, width_p:].to(logp.device)
            lc = c.logp_ref[:, width_p:].to(logp.device)
            res.logp_corrupt = torch.where(plan.perception.to(logp.device), lc, logp)
        else:
            need = plan.mask if self.srpo_options.method != "srpo" else plan.perception
            lc = passes.token_logprobs(model, input_ids, attention_mask, _wide(need, input_ids, width_p),
                                       temperature=self.temperature,
                                       **{**common, "model_kwargs": {**common["model_kwargs"],
                                                                     "pixel_values": plan.corrupted}})
            res.logp_corrupt = torch.where(need.to(logp.device), lc[:, width_p:].to(logp.device), logp)

    def _srpo_run_ablated(self, res: PassResults, out: dict, input_ids, attention_mask, width_p, plan: _PassPlan,
                          group_ids, common: dict) -> None:
        """``res.logp_ablated`` and ``res.has_value`` from the pass with the perception span ablated."""
        logp = res.logp
        la, has_value = self._srpo_ablated_runner(out, input_ids, attention_mask,
                                                  _wide(plan.perception, input_ids, width_p),
                                                  _wide(plan.reasoning, input_ids, width_p), width_p, group_ids,
                                                  common)
        has_value = has_value[:, width_p:].to(logp.device)
        # ℓ° where computed, 0 where the ablated batch has no value (as the full pass gives), ℓ elsewhere
        res.logp_ablated = torch.where(plan.reasoning.to(logp.device) & has_value,
                                       la[:, width_p:].to(logp.device), torch.where(has_value, logp, 0.0))
        res.has_value = has_value

    def _srpo_runner_kwargs(self, out: dict, batch_size) -> dict:
        # a row chunk without a needed token is skipped only when it is on every process (D224)
        return dict(model_kwargs={k: out[k] for k in _MM_KEYS if out.get(k) is not None}, batch_size=batch_size,
                    num_images=out.get("num_images"), num_tiles=out.get("num_tiles"),
                    head_fp32=bool(getattr(self.args, "cast_lm_head_to_fp32", False)),
                    on_any_process=lambda flag: on_any_process(self, flag))

    def _srpo_donors_across(self) -> bool:
        """Counterfactual donors chosen over every process's rows (:func:`_trl_split.counterfactual_across_processes`,
        a collective), as one process holding the whole batch would choose them (D221)."""
        return self.srpo_options.ablation_mode == "counterfactual" and num_processes(self) > 1

    def _srpo_ablate_across(self, out, input_ids, attention_mask, full_span, group_ids, pad, tags):
        """``(AblatedBatch, per-position inputs ablated)`` of the local rows, donors from every process."""
        return counterfactual_across_processes(
            input_ids, attention_mask, full_span, group_ids, self.srpo_options.counterfactual_source,
            pad_token_id=pad, tags_mask=tags,
            per_position={k: out[k] for k in _PER_POSITION_KEYS if out.get(k) is not None})

    def _srpo_span_inputs(self, input_ids, attention_mask, full_span, width_p, group_ids):
        """``(pad_token_id, tags_mask, donor)`` for :func:`srpo_core.ablation.ablate_span` (``donor`` None when the
        donors are chosen across processes, :meth:`_srpo_donors_across`)."""
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        tags = None
        if self.srpo_options.ablate_tags:  # the <perception> tag tokens of the completions go with the span
            comp = tag_tokens_from_token_ids(input_ids[:, width_p:], self._tokenizer,
                                             attention_mask[:, width_p:].bool(), tags=self.srpo_options.perception_tags)
            tags = torch.cat([torch.zeros_like(input_ids[:, :width_p], dtype=torch.bool), comp], dim=1)
        donor = (counterfactual_donors(group_ids.to(input_ids.device), self.srpo_options.counterfactual_source,
                                       input_ids=input_ids, span_mask=full_span)  # identical spans: no donor
                 if self.srpo_options.ablation_mode == "counterfactual" and not self._srpo_donors_across() else None)
        return pad, tags, donor

    def _srpo_ablated_runner(self, out, input_ids, attention_mask, full_span, full_needed, width_p, group_ids,
                             common):
        pad, tags, donor = self._srpo_span_inputs(input_ids, attention_mask, full_span, width_p, group_ids)
        model = self.accelerator.unwrap_model(self.model)
        if self._srpo_donors_across():
            ab, extra = self._srpo_ablate_across(out, input_ids, attention_mask, full_span, group_ids, pad, tags)
            return passes.ablated_batch_logprobs(model, ab, full_needed, temperature=self.temperature,
                                                 **{**common, "model_kwargs": {**common["model_kwargs"], **extra}})
        return passes.ablated_logprobs(model, input_ids, attention_mask, full_span, full_needed,
                                       mode=self.srpo_options.ablation_mode, donor=donor, pad_token_id=pad,
                                       tags_mask=tags, temperature=self.temperature, **common)

    def _srpo_logps(self, out: dict, input_ids, attention_mask, logits_to_keep, batch_size, **overrides):
        kwargs = {k: out[k] for k in _MM_KEYS if k in out}
        kwargs.update(overrides)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
            num_images=out.get("num_images"), num_tiles=out.get("num_tiles"), **kwargs,
        )
        return logps.float()

    def _srpo_corrupt(self, out: dict, group_ids: torch.Tensor) -> torch.Tensor | None:
        """Corrupted ``pixel_values`` (one mask per prompt), or ``None`` when the batch has no images."""
        pixel_values = out.get("pixel_values")
        if pixel_values is None:
            return None
        grid = out.get("image_grid_thw")
        if grid is None:
            raise NotImplementedError("SRPOGRPOTrainer: the corrupted-image pass supports the Qwen-VL layout "
                                      "(pixel_values with image_grid_thw); this model's processor gives "
                                      f"pixel_values {tuple(pixel_values.shape)} without image_grid_thw")
        if self.srpo_options.corruption_share == "response":
            group_ids = torch.arange(len(group_ids)) + self.accelerator.process_index * len(group_ids)
        num_images = out.get("num_images") or [1] * len(group_ids)
        # image j of completion i belongs to group (prompt of i, j): the same corrupted image for a prompt's group,
        # drawn from that key and the step alone, so it does not depend on how the batch is split over processes
        image_keys = [int(group_ids[i]) * 1_000_003 + j for i, n in enumerate(num_images) for j in range(n)]
        ip = getattr(self.processing_class, "image_processor", None)
        opts = self.srpo_options
        return corrupt_per_key(
            pixel_values, grid, image_keys, self._srpo_seed(), mode=opts.corruption_mode, p=opts.corruption_p,
            patch=opts.corruption_patch,
            image_mean=tuple(getattr(ip, "image_mean", None) or CLIP_MEAN),
            image_std=tuple(getattr(ip, "image_std", None) or CLIP_STD),
            temporal_patch_size=getattr(ip, "temporal_patch_size", 2), patch_size=getattr(ip, "patch_size", 14),
            merge_size=getattr(ip, "merge_size", 2),
        )

    def _srpo_seed(self) -> int:
        base = self.srpo_options.seed if self.srpo_options.seed is not None else self.args.seed
        # different per generation step, reproducible across runs; the same on every process (masks are keyed by
        # the global group, _trl_split.corrupt_per_key)
        return (int(base) * 1_000_003 + self._srpo_generation * 7919) % (2**63)

    def _srpo_position_ids(self, input_ids, attention_mask, out):
        """Original positions for ``ablation_mode="mask"`` (:func:`srpo_core.passes.original_position_ids`)."""
        return passes.original_position_ids(self.accelerator.unwrap_model(self.model), input_ids, attention_mask,
                                            {k: out.get(k) for k in ("image_grid_thw", "mm_token_type_ids")})

    @contextlib.contextmanager
    def _srpo_inject_position_ids(self, position_ids: torch.Tensor):
        """Feed ``position_ids`` to the model's forward, sliced like TRL's chunks (consecutive rows, in order)."""
        model = self.accelerator.unwrap_model(self.model)
        batch_dim = 1 if position_ids.dim() == 3 else 0
        state = {"start": 0}

        def hook(_module, args, kwargs):
            n = kwargs["input_ids"].shape[0]
            kwargs["position_ids"] = position_ids.narrow(batch_dim, state["start"], n)
            state["start"] += n
            return args, kwargs

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _srpo_ablated_logps(self, out, input_ids, attention_mask, span, width_p, batch_size, group_ids):
        """``(ℓ° [B, C], has_value bool [B, C])`` on the completion positions; tokens without a value (the span, the
        first token after a masked span, D180) must get no reasoning signal."""
        full_span = torch.cat([torch.zeros_like(input_ids[:, :width_p], dtype=torch.bool), span], dim=1)
        pad, tags, donor = self._srpo_span_inputs(input_ids, attention_mask, full_span, width_p, group_ids)
        mode = self.srpo_options.ablation_mode
        if self._srpo_donors_across():
            ab, extra = self._srpo_ablate_across(out, input_ids, attention_mask, full_span, group_ids, pad, tags)
        else:
            ab = ablate_span(input_ids, attention_mask, full_span, mode=mode, pad_token_id=pad, tags_mask=tags,
                             donor=donor)
            extra = {k: ab.ablate(out[k]) for k in _PER_POSITION_KEYS if k in out}
        keep = ab.input_ids.shape[1] - width_p
        ctx = contextlib.nullcontext()
        if ab.mode == "mask":
            ctx = self._srpo_inject_position_ids(self._srpo_position_ids(input_ids, attention_mask, out))
        with ctx:
            logps = self._srpo_logps(out, ab.input_ids, ab.attention_mask, keep, batch_size, **extra)  # [B, keep]
        full = torch.cat([logps.new_zeros(logps.shape[0], width_p), logps], dim=1)
        return ab.gather(full)[:, width_p:], ab.valid[:, width_p:]


def pass_host(model, processing_class, *, srpo_config=None, srpo_options=None, temperature: float = 1.0,
              cast_lm_head_to_fp32: bool = False, seed: int = 0, pass_runner: bool = True):
    """The trainer's passes (:class:`SRPOPasses`) without a trainer, for tests and ``benchmarks/bench_passes.py``:
    an object with the attributes they read, TRL's ``_get_per_token_logps_and_entropies`` and TRL's fused LM head
    added to ``model`` (as ``GRPOTrainer.__init__`` adds it; once per model). Needs TRL and accelerate."""
    import types

    from accelerate import Accelerator
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from srpo_core.adapters._trl_options import SRPOTrainerOptions
    from srpo_core.config import SRPOConfig

    if not getattr(model, "_srpo_fused_lm_head", False):
        add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                          outputs=("log_probs", "entropy"))
        model._srpo_fused_lm_head = True

    class Host(SRPOPasses):
        _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies

    host = Host()
    host.model, host.processing_class = model, processing_class
    host._tokenizer = getattr(processing_class, "tokenizer", processing_class)
    host.accelerator = Accelerator(cpu=model.device.type == "cpu")
    host.srpo_config = srpo_config or SRPOConfig()
    host.srpo_options = srpo_options or SRPOTrainerOptions()
    host.temperature = temperature
    host.args = types.SimpleNamespace(cast_lm_head_to_fp32=cast_lm_head_to_fp32, seed=seed)
    host._srpo_generation = 0
    host._srpo_pass_runner = pass_runner
    return host
