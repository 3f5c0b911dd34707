"""SRPO for TRL: ``SRPOGRPOTrainer``, a drop-in ``GRPOTrainer`` whose advantages are role-aware and per token.

Tested with TRL 1.16.0 and transformers 5.24.0 (see ``docs/trl.md``). After TRL has generated, scored and computed its
sequence advantages ``A_i: [B_local]``, the trainer

1. labels each completion's tokens with :func:`srpo_core.roles_from_token_ids` (perception / reasoning / other);
2. runs three teacher-forced passes under ``no_grad`` through TRL's own ``_get_per_token_logps_and_entropies``
   (same fused LM head, same temperature): the original inputs (``ℓ``; reused when TRL already computed
   ``old_per_token_logps``), corrupted ``pixel_values`` (``ℓ̃``, :func:`srpo_core.corrupt_pixel_values`, one mask per
   prompt) and the completions with their perception span removed (``ℓ°``, :func:`srpo_core.ablate_span`);
3. calls :func:`srpo_core.role_aware_advantages` (role statistics all-reduced over the accelerator's processes, since
   TRL spreads a prompt's completions over them) and stores the ``[B, T]`` token advantages where TRL's
   ``_compute_loss`` reads them (it broadcasts ``[B]`` and accepts ``[B, T]`` as they are), plus SRPO's statistics
   in TRL's metrics under ``srpo/…``.

Usage: replace ``GRPOTrainer`` by ``SRPOGRPOTrainer`` and optionally pass ``srpo_config=SRPOConfig(...)`` (the math)
and ``srpo_options=SRPOTrainerOptions(...)`` (corruption, ablation, tags).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("srpo_core.adapters.trl needs TRL: pip install 'srpo-core[trl]'") from e

from srpo_core.ablation import ablate_span
from srpo_core.advantages import RoleAwareAdvantages, role_aware_advantages
from srpo_core.config import Role, SRPOConfig
from srpo_core.corruption import CLIP_MEAN, CLIP_STD, MODES, corrupt_pixel_values
from srpo_core.roles import PERCEPTION_TAGS, REASONING_TAGS, TokenRoles, roles_from_token_ids

# Inputs of TRL's log-prob function that the generation step stores in its output dict.
_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
            "token_type_ids", "mm_token_type_ids", "image_position_ids")
_PER_POSITION_KEYS = ("token_type_ids", "mm_token_type_ids")  # [B, P+C]: ablated like input_ids


@dataclasses.dataclass(frozen=True)
class SRPOTrainerOptions:
    """Adapter knobs (the math lives in :class:`srpo_core.SRPOConfig`).

    - ``corruption_mode``: ``"black"`` | ``"mean"`` | ``"noise"``; ``corruption_p``: probability per unit;
      ``corruption_patch``: ``"merged"`` (one merged visual token) | ``"raw"`` (one 14×14 patch).
    - ``ablation_mode``: ``"drop"`` (remove the perception span, positions recomputed by the model) | ``"mask"``
      (hide it from attention, original positions passed explicitly).
    - ``perception_tags`` / ``reasoning_tags``: tag names, as in :func:`srpo_core.roles_from_text`.
    - ``roles_fn``: optional ``(completion_ids [B, T], completion_mask bool [B, T], tokenizer) -> TokenRoles`` replacing
      the tag parser (e.g. a different response format, or a test that forces roles).
    - ``fused_loss``: compute TRL's GRPO loss with :func:`srpo_core.linear_policy_loss` from the model's last hidden
      state (LM-head gradients formed in the loss's forward, never the full logits); see
      ``srpo_core/adapters/_trl_fused.py`` for the TRL settings it reproduces (others are refused).
    - ``seed``: seeds the corruption masks (``seed + generation index``; default: the trainer's ``args.seed``). A
      private generator is used, so SRPO never consumes the global RNG that TRL samples and shuffles with.
    """

    corruption_mode: str = "black"
    corruption_p: float = 0.5
    corruption_patch: str = "merged"
    ablation_mode: str = "drop"
    perception_tags: tuple[str, ...] = PERCEPTION_TAGS
    reasoning_tags: tuple[str, ...] = REASONING_TAGS
    roles_fn: Callable | None = None
    seed: int | None = None
    fused_loss: bool = False

    def __post_init__(self) -> None:
        if self.corruption_mode not in MODES:
            raise ValueError(f"SRPOTrainerOptions: `corruption_mode` must be one of {MODES}, got "
                             f"{self.corruption_mode!r}")
        if not 0.0 <= self.corruption_p <= 1.0:
            raise ValueError(f"SRPOTrainerOptions: `corruption_p` must be in [0, 1], got {self.corruption_p!r}")
        if self.corruption_patch not in ("merged", "raw"):
            raise ValueError(f"SRPOTrainerOptions: `corruption_patch` must be 'merged' or 'raw', got "
                             f"{self.corruption_patch!r}")
        if self.ablation_mode not in ("drop", "mask"):
            raise ValueError(f"SRPOTrainerOptions: `ablation_mode` must be 'drop' or 'mask', got "
                             f"{self.ablation_mode!r}")


@dataclasses.dataclass
class SRPOStep:
    """What the last generation step computed (for inspection and tests): TRL's sequence advantages ``[B]``,
    SRPO's result (``[B, T]`` tensors), the roles and the three log-prob tensors."""

    sequence_advantages: torch.Tensor
    result: RoleAwareAdvantages
    roles: TokenRoles
    mask: torch.Tensor
    logp: torch.Tensor
    logp_corrupt: torch.Tensor
    logp_ablated: torch.Tensor


class SRPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with SRPO's role-aware token advantages ``A_{i,t} = w_t · A_i``.

    Takes every ``GRPOTrainer`` argument plus ``srpo_config`` (:class:`srpo_core.SRPOConfig`) and ``srpo_options``
    (:class:`SRPOTrainerOptions`). Multimodal corruption supports the Qwen-VL layout (``pixel_values`` with
    ``image_grid_thw``); text-only batches skip it (``ℓ̃ = ℓ``, no perception signal).
    """

    def __init__(self, *args, srpo_config: SRPOConfig | None = None, srpo_options: SRPOTrainerOptions | None = None,
                 **kwargs):
        srpo_config = SRPOConfig() if srpo_config is None else srpo_config
        srpo_options = SRPOTrainerOptions() if srpo_options is None else srpo_options
        if not isinstance(srpo_config, SRPOConfig):
            raise TypeError(f"SRPOGRPOTrainer: `srpo_config` must be an srpo_core.SRPOConfig, got "
                            f"{type(srpo_config).__name__}")
        if not isinstance(srpo_options, SRPOTrainerOptions):
            raise TypeError(f"SRPOGRPOTrainer: `srpo_options` must be an SRPOTrainerOptions, got "
                            f"{type(srpo_options).__name__}")
        if srpo_config.perception_contrast in ("kl", "js") or srpo_config.reasoning_contrast in ("kl", "js"):
            raise ValueError("SRPOGRPOTrainer: contrast kinds 'kl' and 'js' need full logit rows, which TRL's fused "
                             "LM head never materialises; use 'k3' or 'logratio'")
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if training_args is not None and getattr(training_args, "use_liger_kernel", False):
            raise ValueError(
                "SRPOGRPOTrainer does not support use_liger_kernel=True: Liger's GRPO path takes sequence-level [B] "
                "advantages and patches the model, so SRPO's per-token [B, T] advantages would not reach the loss "
                "as computed here. Set use_liger_kernel=False (TRL's fused LM head already avoids the full logits)."
            )
        self.srpo_config = srpo_config
        self.srpo_options = srpo_options
        self._srpo_generation = 0
        self._srpo_last: SRPOStep | None = None
        super().__init__(*args, **kwargs)
        if srpo_options.fused_loss:
            from srpo_core.adapters import _trl_fused

            _trl_fused.check_supported(self)

    def _compute_loss(self, model, inputs):
        if not self.srpo_options.fused_loss:
            return super()._compute_loss(model, inputs)
        from srpo_core.adapters import _trl_fused

        return _trl_fused.compute_loss(self, model, inputs)

    # ------------------------------------------------------------------ passes
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
        num_images = out.get("num_images") or [1] * len(group_ids)
        # image j of completion i belongs to group (prompt of i, j): the same corrupted image for a prompt's group
        image_groups = torch.tensor([int(group_ids[i]) * 1_000_003 + j for i, n in enumerate(num_images)
                                     for j in range(n)], dtype=torch.int64)
        ip = getattr(self.processing_class, "image_processor", None)
        gen = torch.Generator().manual_seed(self._srpo_seed())
        opts = self.srpo_options
        return corrupt_pixel_values(
            pixel_values, grid, mode=opts.corruption_mode, p=opts.corruption_p, patch=opts.corruption_patch,
            generator=gen, group_index=image_groups,
            image_mean=tuple(getattr(ip, "image_mean", None) or CLIP_MEAN),
            image_std=tuple(getattr(ip, "image_std", None) or CLIP_STD),
            temporal_patch_size=getattr(ip, "temporal_patch_size", 2), patch_size=getattr(ip, "patch_size", 14),
            merge_size=getattr(ip, "merge_size", 2),
        )

    def _srpo_seed(self) -> int:
        base = self.srpo_options.seed if self.srpo_options.seed is not None else self.args.seed
        # different per process and per generation step, reproducible across runs
        return (int(base) * 1_000_003 + self._srpo_generation * 7919 + self.accelerator.process_index) % (2**63)

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

    # ------------------------------------------------------------------ main override
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
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
        width_p, width_c = prompt_ids.shape[1], completion_ids.shape[1]
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
            logp = (self._srpo_logps(out, input_ids, attention_mask, width_c, batch_size)
                    if logp is None else logp.float())
            corrupted = self._srpo_corrupt(out, group_ids) if bool((role_t == Role.PERCEPTION).any()) else None
            if corrupted is None:
                logp_corrupt = logp  # no image, or nobody reads ℓ̃
            else:
                logp_corrupt = self._srpo_logps(out, input_ids, attention_mask, width_c, batch_size,
                                                pixel_values=corrupted)
            span = role_t == Role.PERCEPTION
            if not bool(span.any()) or not bool((role_t == Role.REASONING).any()):
                logp_ablated = logp  # nothing removed, or nobody reads ℓ°
            else:
                logp_ablated = self._srpo_ablated_logps(out, input_ids, attention_mask, span, width_p, batch_size)

        group = torch.distributed.group.WORLD if self.accelerator.num_processes > 1 else None
        res = role_aware_advantages(seq_adv.float(), logp, logp_corrupt, logp_ablated, role_t, mask=mask,
                                    config=self.srpo_config, process_group=group)
        out["advantages"] = res.advantages.to(seq_adv.dtype)  # [B, T]; 0 outside the mask
        self._srpo_last = SRPOStep(seq_adv, res, roles, mask, logp, logp_corrupt, logp_ablated)
        self._srpo_generation += 1

        metrics = self._metrics[mode]
        for key, value in res.stats.items():
            if value == value:  # skip NaN (a role with no tokens)
                metrics[f"srpo/{key}"].append(float(value))
        metrics["srpo/malformed_frac"].append(roles.num_malformed / max(len(seq_adv), 1))
        return out

    def _srpo_ablated_logps(self, out, input_ids, attention_mask, span, width_p, batch_size):
        full_span = torch.cat([torch.zeros_like(input_ids[:, :width_p], dtype=torch.bool), span], dim=1)
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        ab = ablate_span(input_ids, attention_mask, full_span, mode=self.srpo_options.ablation_mode, pad_token_id=pad)
        extra = {k: ab.ablate(out[k]) for k in _PER_POSITION_KEYS if k in out}
        keep = ab.input_ids.shape[1] - width_p
        ctx = contextlib.nullcontext()
        if ab.mode == "mask":
            ctx = self._srpo_inject_position_ids(self._srpo_position_ids(input_ids, attention_mask, out))
        with ctx:
            logps = self._srpo_logps(out, ab.input_ids, ab.attention_mask, keep, batch_size, **extra)  # [B, keep]
        full = torch.cat([logps.new_zeros(logps.shape[0], width_p), logps], dim=1)
        return ab.gather(full)[:, width_p:]
