"""SRPO for TRL: ``SRPOGRPOTrainer``, a drop-in ``GRPOTrainer`` whose advantages are role-aware and per token.

Tested with TRL 1.16 and transformers 5.24 (``srpo-core docs trl``); another TRL is refused at import (the trainer
overrides private ``GRPOTrainer`` methods) unless ``SRPO_ALLOW_UNTESTED_TRL=1``. After TRL has generated, scored and
computed its sequence advantages ``A_i: [B_local]``, the trainer

1. labels each completion's tokens with :func:`srpo_core.roles_from_token_ids` (perception / reasoning / other);
2. runs three teacher-forced passes under ``no_grad`` through TRL's own ``_get_per_token_logps_and_entropies``
   (same fused LM head, same temperature): the original inputs (``ℓ``; reused when TRL already computed
   ``old_per_token_logps``), corrupted ``pixel_values`` (``ℓ̃``, :func:`srpo_core.corrupt_pixel_values`, one mask per
   prompt) and the completions with their perception span removed (``ℓ°``, :func:`srpo_core.ablate_span`);
3. calls :func:`srpo_core.role_aware_advantages` (role statistics all-reduced over the accelerator's processes, since
   TRL spreads a prompt's completions over them) and stores the ``[B, T]`` token advantages where TRL's
   ``_compute_loss`` reads them (it broadcasts ``[B]`` and accepts ``[B, T]`` as they are), plus SRPO's statistics
   in TRL's metrics under ``srpo/…``.

Usage: replace ``GRPOTrainer`` by ``SRPOGRPOTrainer`` and ``GRPOConfig`` by :class:`SRPOGRPOConfig`, whose flat
``srpo_*`` fields come from ``TrlParser``, YAML or the command line like TRL's own. In code,
``srpo_config=SRPOConfig(...)`` (the math) and ``srpo_options=SRPOTrainerOptions(...)`` (corruption, ablation, tags,
``roles_fn``) work as well.

The logged ``loss`` equals GRPO's at every step (each response's weights average 1, so its mean token advantage is
``A_i``); what SRPO changed shows in ``srpo/*``: per-role share of ``|A_t|`` beside GRPO's, the weight spread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable

import torch

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("srpo_core.adapters.trl needs TRL: install srpo-core with its `trl` extra "
                      "(pip install '.[trl]' in a clone, or 'srpo_core-*.whl[trl]')") from e

from srpo_core.ablation import ablate_span
from srpo_core.advantages import RoleAwareAdvantages, role_aware_advantages
from srpo_core.config import Role, SRPOConfig
from srpo_core.corruption import CLIP_MEAN, CLIP_STD, MODES, corrupt_pixel_values
from srpo_core.roles import PERCEPTION_TAGS, REASONING_TAGS, TokenRoles, roles_from_token_ids

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

# Inputs of TRL's log-prob function that the generation step stores in its output dict.
_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
            "token_type_ids", "mm_token_type_ids", "image_position_ids")
_PER_POSITION_KEYS = ("token_type_ids", "mm_token_type_ids")  # [B, P+C]: ablated like input_ids


METHODS = ("srpo", "vppo", "papo")
# Each method's corruption and loss terms as in its source (file:line in docs/decisions.md D112-D114).
PRESETS = {
    "srpo": {},
    # VPPO-RL verl/workers/perc_utils.py:5 (14-px cells, p=0.5) applied per response image (fsdp_workers.py:511);
    # entropy penalty coef·(−mean log π) in dp_actor.py:564-567, coef 0.06 in examples/configs/train_vppo_7b.sh:23
    # (0.12 for the 8B script, train_vppo_8b.sh:23).
    "vppo": dict(method="vppo", corruption_patch="raw", corruption_p=0.5, corruption_share="response",
                 entropy_penalty_coef=0.06),
    # PAPO verl/trainer/papo_utils.py:17 (14-px cells, black_prob=0.6) on the raw images before rollout, so a
    # prompt's responses share them; kl_prcp_coef 0.01 and Double Entropy Loss 0.03 + 0.03 in
    # examples/papo_grpo/qwen2_5_vl_3b_grpo_papo_no_kl_ref.sh:28-34 (the GRPO script without a reference KL, as here).
    "papo": dict(method="papo", corruption_patch="raw", corruption_p=0.6, corruption_share="prompt",
                 papo_kl_coef=0.01, entropy_penalty_coef=0.03, papo_aug_entropy_coef=0.03),
}


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
    - ``method``: ``"srpo"`` (default) | ``"vppo"`` (VPPO's trajectory scale and top-k token mask, see
      :func:`srpo_core.vppo_advantages`; the mask is folded into the advantages, D36) | ``"papo"`` (TRL's sequence
      advantages, and ``−papo_kl_coef · mean(KL_prcp)`` added to the loss, :func:`srpo_core.papo_perception_kl`).
    - ``corruption_share``: ``"prompt"`` (one corrupted image per prompt, shared by its responses) | ``"response"``
      (a mask drawn per response, as VPPO).
    - ``entropy_penalty_coef``: adds ``coef · (−mean ℓ)`` over the response tokens to the loss (VPPO's entropy
      penalty; PAPO's "original" half of the Double Entropy Loss); ``papo_aug_entropy_coef``: adds
      ``coef · (−mean ℓ̃)`` (PAPO's "augmented" half; ``ℓ̃`` is computed without gradient, as PAPO's default).
    - :meth:`preset` gives each method its source's defaults (``docs/decisions.md`` D112-D114).
    """

    corruption_mode: str = "black"
    corruption_p: float = 0.5
    corruption_patch: str = "merged"
    ablation_mode: str = "drop"
    perception_tags: tuple[str, ...] = PERCEPTION_TAGS
    reasoning_tags: tuple[str, ...] = REASONING_TAGS
    roles_fn: Callable | None = None
    seed: int | None = None
    method: str = "srpo"
    corruption_share: str = "prompt"
    entropy_penalty_coef: float = 0.0
    papo_kl_coef: float = 0.01
    papo_aug_entropy_coef: float = 0.0
    vppo_beta_min: float = 0.9
    vppo_top_k: float = 0.4
    fused_loss: bool = False

    @classmethod
    def preset(cls, method: str, **overrides) -> SRPOTrainerOptions:
        """Options with the corruption and loss terms of ``method``'s own launch scripts (then ``overrides``)."""
        if method not in PRESETS:
            raise ValueError(f"SRPOTrainerOptions.preset: `method` must be one of {tuple(PRESETS)}, got {method!r}")
        return cls(**{**PRESETS[method], **overrides})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"SRPOTrainerOptions: `method` must be one of {METHODS}, got {self.method!r}")
        if self.corruption_share not in ("prompt", "response"):
            raise ValueError(f"SRPOTrainerOptions: `corruption_share` must be 'prompt' or 'response', got "
                             f"{self.corruption_share!r}")
        for name in ("entropy_penalty_coef", "papo_kl_coef", "papo_aug_entropy_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"SRPOTrainerOptions: `{name}` must be a number >= 0, got {value!r}")
        if self.fused_loss and (self.method == "papo" or self.entropy_penalty_coef or self.papo_aug_entropy_coef):
            raise ValueError("SRPOTrainerOptions: `fused_loss=True` computes the clipped policy loss alone; it does "
                             "not add the entropy terms or PAPO's perception KL (method='papo', entropy_penalty_coef, "
                             "papo_aug_entropy_coef): turn those off or use fused_loss=False")
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


def _field(default, help: str):  # noqa: A002 - HfArgumentParser reads metadata["help"]
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


_MATH = SRPOConfig()
_OPTS = SRPOTrainerOptions()


@dataclasses.dataclass
class SRPOGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus SRPO's settings as flat ``srpo_*`` fields (parser-friendly: ``TrlParser``, YAML, the
    command line as ``--srpo_beta_perception 0.5``), read by :class:`SRPOGRPOTrainer`.

    ``srpo_<name>`` is field ``<name>`` of :class:`srpo_core.SRPOConfig` (the math, SPEC steps 1-5) or of
    :class:`SRPOTrainerOptions` (the passes). The prefix keeps them apart from GRPO's own fields (GRPO's ``beta`` is
    the KL coefficient, ``epsilon`` the clip range). Validated at construction, with SRPOConfig's messages.
    """

    srpo_perception_contrast: str = _field(_MATH.perception_contrast,
                                           "SRPO: perception signal, 'k3' or 'logratio' (TRL gives no logit rows)")
    srpo_reasoning_contrast: str = _field(_MATH.reasoning_contrast, "SRPO: reasoning signal, 'logratio' or 'k3'")
    srpo_clamp: float = _field(_MATH.clamp, "SRPO: log-prob differences are clamped to ±clamp")
    srpo_k3_max: float = _field(_MATH.k3_max, "SRPO: cap of the k3 contrast")
    srpo_standardize: str = _field(_MATH.standardize, "SRPO: role-wise standardisation, 'batch' or 'none'")
    srpo_eps: float = _field(_MATH.eps, "SRPO: added to the role standard deviation")
    srpo_u_max: float = _field(_MATH.u_max, "SRPO: standardised signals are clamped to ±u_max")
    srpo_beta_perception: float = _field(_MATH.beta_perception, "SRPO: strength on perception tokens (0 = GRPO)")
    srpo_beta_reasoning: float = _field(_MATH.beta_reasoning, "SRPO: strength on reasoning tokens (0 = GRPO)")
    srpo_weight_map: str = _field(_MATH.weight_map, "SRPO: 'exp', 'linear' or 'sigmoid'")
    srpo_w_min: float = _field(_MATH.w_min, "SRPO: weight floor of the linear map, in (0, 1]")
    srpo_renorm: str = _field(_MATH.renorm, "SRPO: 'mean' (each response's weights average 1) or 'none'")
    srpo_role_stats: str = _field(_MATH.role_stats, "SRPO: role statistics over 'all' signals or the 'unclamped' ones")
    srpo_corruption_mode: str = _field(_OPTS.corruption_mode, "SRPO: corrupted image, 'black', 'mean' or 'noise'")
    srpo_corruption_p: float = _field(_OPTS.corruption_p, "SRPO: probability that a visual unit is corrupted")
    srpo_corruption_patch: str = _field(_OPTS.corruption_patch, "SRPO: unit, 'merged' (one visual token) or 'raw'")
    srpo_ablation_mode: str = _field(_OPTS.ablation_mode, "SRPO: perception span 'drop'ped or 'mask'ed")
    srpo_perception_tags: list[str] = _field(list(_OPTS.perception_tags), "SRPO: tags of perception spans")
    srpo_reasoning_tags: list[str] = _field(list(_OPTS.reasoning_tags), "SRPO: tags of reasoning spans")
    srpo_seed: int | None = _field(_OPTS.seed, "SRPO: seed of the corruption masks (default: `seed`)")
    srpo_method: str = _field(_OPTS.method, "SRPO: 'srpo', or the 'vppo' / 'papo' baselines through this trainer")
    srpo_corruption_share: str = _field(_OPTS.corruption_share,
                                        "SRPO: one corrupted image per 'prompt', or a mask per 'response'")
    srpo_entropy_penalty_coef: float = _field(_OPTS.entropy_penalty_coef,
                                              "SRPO: adds coef·(−mean log π) to the loss (VPPO's entropy penalty)")
    srpo_papo_kl_coef: float = _field(_OPTS.papo_kl_coef, "SRPO: PAPO's perception-KL coefficient (method='papo')")
    srpo_papo_aug_entropy_coef: float = _field(_OPTS.papo_aug_entropy_coef,
                                               "SRPO: PAPO's augmented-image entropy term coefficient")
    srpo_vppo_beta_min: float = _field(_OPTS.vppo_beta_min, "SRPO: VPPO's trajectory-scale floor (method='vppo')")
    srpo_vppo_top_k: float = _field(_OPTS.vppo_top_k, "SRPO: VPPO's share of tokens kept (method='vppo')")
    srpo_fused_loss: bool = _field(_OPTS.fused_loss, "SRPO: compute the loss with srpo_core.linear_policy_loss "
                                   "from the last hidden state (never the full logits)")

    def __post_init__(self):
        super().__post_init__()
        self.srpo_math_config()
        self.srpo_trainer_options()

    def _srpo_values(self, cls) -> dict:
        values = {f.name: getattr(self, f"srpo_{f.name}") for f in dataclasses.fields(cls)
                  if hasattr(self, f"srpo_{f.name}")}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}

    def srpo_math_config(self) -> SRPOConfig:
        """The :class:`srpo_core.SRPOConfig` these fields describe."""
        return SRPOConfig(**self._srpo_values(SRPOConfig))

    def srpo_trainer_options(self, **extra) -> SRPOTrainerOptions:
        """The :class:`SRPOTrainerOptions` these fields describe, plus ``extra`` (e.g. ``roles_fn``)."""
        return SRPOTrainerOptions(**{**self._srpo_values(SRPOTrainerOptions), **extra})


def _resolve_srpo_settings(args, srpo_config, srpo_options) -> tuple[SRPOConfig, SRPOTrainerOptions]:
    """With an :class:`SRPOGRPOConfig` the settings come from ``args``; ``srpo_options`` may still bring what a
    config file cannot (``roles_fn``), provided its other fields agree with ``args``."""
    if not isinstance(args, SRPOGRPOConfig):
        return (SRPOConfig() if srpo_config is None else srpo_config,
                SRPOTrainerOptions() if srpo_options is None else srpo_options)
    if srpo_config is not None:
        raise ValueError("SRPOGRPOTrainer: `args` is an SRPOGRPOConfig, whose srpo_* fields are the math config; "
                         "do not also pass `srpo_config` (set args.srpo_beta_perception etc. instead)")
    from_args = args.srpo_trainer_options()
    if srpo_options is None:
        return args.srpo_math_config(), from_args
    if not isinstance(srpo_options, SRPOTrainerOptions):
        raise TypeError(f"SRPOGRPOTrainer: `srpo_options` must be an SRPOTrainerOptions, got "
                        f"{type(srpo_options).__name__}")
    # A field srpo_options leaves at its default comes from args; one it sets must agree with args.
    for name in args._srpo_values(SRPOTrainerOptions):
        mine, theirs = getattr(srpo_options, name), getattr(from_args, name)
        if mine != getattr(_OPTS, name) and mine != theirs:
            raise ValueError(f"SRPOGRPOTrainer: srpo_options.{name}={mine!r} disagrees with args.srpo_{name}="
                             f"{theirs!r}; set it in one place (args)")
    extra = {f.name: getattr(srpo_options, f.name) for f in dataclasses.fields(SRPOTrainerOptions)
             if f.name not in args._srpo_values(SRPOTrainerOptions)}
    return args.srpo_math_config(), dataclasses.replace(from_args, **extra)


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

    Takes every ``GRPOTrainer`` argument; SRPO's settings come from ``args`` when it is an :class:`SRPOGRPOConfig`,
    else from ``srpo_config`` (:class:`srpo_core.SRPOConfig`) and ``srpo_options`` (:class:`SRPOTrainerOptions`).
    Multimodal corruption supports the Qwen-VL layout (``pixel_values`` with
    ``image_grid_thw``); text-only batches skip it (``ℓ̃ = ℓ``, no perception signal).
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
        if srpo_config.perception_contrast in ("kl", "js") or srpo_config.reasoning_contrast in ("kl", "js"):
            raise ValueError("SRPOGRPOTrainer: contrast kinds 'kl' and 'js' need full logit rows, which TRL's fused "
                             "LM head never materialises; use 'k3' or 'logratio'")
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
        if self.srpo_options.corruption_share == "response":
            group_ids = torch.arange(len(group_ids)) + self.accelerator.process_index * len(group_ids)
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
            needs_corrupt = opts.method != "srpo" or bool((role_t == Role.PERCEPTION).any())
            corrupted = self._srpo_corrupt(out, group_ids) if needs_corrupt else None
            if corrupted is None:
                logp_corrupt = logp  # no image, or nobody reads ℓ̃
            else:
                logp_corrupt = self._srpo_logps(out, input_ids, attention_mask, width_c, batch_size,
                                                pixel_values=corrupted)
            if opts.method != "srpo":
                return self._preset_step(out, mode, seq_adv, roles, mask, logp, logp_corrupt)
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
        for key, value in srpo_change_metrics(res, role_t, mask).items():
            if value == value:
                metrics[f"srpo/{key}"].append(value)
        metrics["srpo/malformed_frac"].append(roles.num_malformed / max(len(seq_adv), 1))
        return out

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
