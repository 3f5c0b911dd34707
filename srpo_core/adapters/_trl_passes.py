"""The extra teacher-forced passes of :class:`srpo_core.adapters.trl.SRPOGRPOTrainer` (a mixin before
``GRPOTrainer``): log-probs through TRL's own ``_get_per_token_logps_and_entropies``, the corrupted ``pixel_values``
(``ℓ̃``), and the completions with their perception span ablated (``ℓ°``: hidden with the original positions injected
for ``ablation_mode="mask"``, removed for ``"drop"``, replaced by another response's span for ``"counterfactual"``).
"""

from __future__ import annotations

import contextlib

import torch

from srpo_core.ablation import ablate_span, counterfactual_donors
from srpo_core.adapters._trl_split import corrupt_per_key, counterfactual_across_processes, num_processes
from srpo_core.corruption import CLIP_MEAN, CLIP_STD
from srpo_core.roles import tag_tokens_from_token_ids

# Inputs of TRL's log-prob function that the generation step stores in its output dict.
_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
            "token_type_ids", "mm_token_type_ids", "image_position_ids")
_PER_POSITION_KEYS = ("token_type_ids", "mm_token_type_ids")  # [B, P+C]: ablated like input_ids


class SRPOPasses:
    """The passes' methods; they read ``self.srpo_options``, ``self.model``, ``self.accelerator`` and TRL's
    ``_get_per_token_logps_and_entropies`` of the trainer they are mixed into."""

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
        """Original positions for ``ablation_mode="mask"``: M-RoPE ids from the model's ``get_rope_index`` when it
        has one and the batch has images, else 1-D ``cumsum(attention_mask) − 1``."""
        model = self.accelerator.unwrap_model(self.model)
        rope = next((m.get_rope_index for m in model.modules() if hasattr(m, "get_rope_index")), None)
        if rope is not None and out.get("image_grid_thw") is not None:
            pos, _ = rope(input_ids, mm_token_type_ids=out.get("mm_token_type_ids"),
                          image_grid_thw=out.get("image_grid_thw"), attention_mask=attention_mask)
            return pos  # [3, B, L]
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]

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
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        tags = None
        if self.srpo_options.ablate_tags:  # the <perception> tag tokens of the completions go with the span
            comp = tag_tokens_from_token_ids(input_ids[:, width_p:], self._tokenizer,
                                             attention_mask[:, width_p:].bool(), tags=self.srpo_options.perception_tags)
            tags = torch.cat([torch.zeros_like(input_ids[:, :width_p], dtype=torch.bool), comp], dim=1)
        mode = self.srpo_options.ablation_mode
        if mode == "counterfactual" and num_processes(self) > 1:  # donors over every process's rows (a collective)
            ab, extra = counterfactual_across_processes(
                input_ids, attention_mask, full_span, group_ids, self.srpo_options.counterfactual_source,
                pad_token_id=pad, tags_mask=tags, per_position={k: out[k] for k in _PER_POSITION_KEYS if k in out})
        else:
            donor = (counterfactual_donors(group_ids.to(input_ids.device), self.srpo_options.counterfactual_source,
                                           input_ids=input_ids, span_mask=full_span)  # identical spans: no donor
                     if mode == "counterfactual" else None)
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
