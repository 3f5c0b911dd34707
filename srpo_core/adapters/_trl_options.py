"""The TRL adapter's settings: :class:`SRPOTrainerOptions` (the passes, corruption, ablation, tags, the VPPO / PAPO
presets) and :class:`SRPOGRPOConfig` (``GRPOConfig`` plus the flat ``srpo_*`` fields), and how
:class:`srpo_core.adapters.trl.SRPOGRPOTrainer` resolves them. Imported through :mod:`srpo_core.adapters.trl`, which
checks the TRL version first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from trl import GRPOConfig

from srpo_core._validate import brief
from srpo_core.ablation import DEFAULT_ABLATION_MODE
from srpo_core.adapters import _options
from srpo_core.config import SRPOConfig
from srpo_core.roles import PERCEPTION_TAGS, REASONING_TAGS

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
    - ``ablation_mode``: one of :data:`srpo_core.ablation.ABLATION_MODES` (default
      :data:`srpo_core.ablation.DEFAULT_ABLATION_MODE`): ``"counterfactual"`` (the perception span replaced by another
      response's, see ``counterfactual_source``; later tokens realigned by their offset from the span's end) |
      ``"mask"`` (hide it from attention, original positions passed explicitly, M-RoPE included; the token right
      after it gets no ``ℓ°``) | ``"drop"`` (remove it, positions recomputed by the model) | ``"off"`` (no ablated
      pass: reasoning tokens carry no signal, scored like OTHER tokens). See ``docs/decisions.md`` D180-D182.
      ``corruption_mode``, ``corruption_p``, ``seed``, ``ablation_mode``, ``counterfactual_source``,
      ``vppo_beta_min``, ``vppo_top_k`` are the options every adapter shares (same names, checked by the same code,
      ``srpo_core.adapters._options``).
    - ``counterfactual_source``: ``"group"`` (another response of the same prompt, default) | ``"other"`` (a
      response of another prompt); :func:`srpo_core.ablation.counterfactual_donors`.
    - ``ablate_tags``: also remove the ``<perception>`` / ``</perception>`` tag tokens in the ablated pass (default
      False: ``ℓ°`` is computed after an empty tag pair; see ``docs/decisions.md`` D116).
    - ``perception_tags`` / ``reasoning_tags``: tag names, as in :func:`srpo_core.roles.roles_from_text`.
    - ``roles_fn``: optional ``(completion_ids [B, T], completion_mask bool [B, T], tokenizer) -> TokenRoles`` replacing
      the tag parser (e.g. a different response format, or a test that forces roles).
    - ``fused_loss``: compute TRL's GRPO loss with :func:`srpo_core.linear_policy_loss` from the model's last hidden
      state (LM-head gradients formed in the loss's forward, never the full logits); see
      ``srpo_core/adapters/_trl_fused.py`` for the TRL settings it reproduces (others are refused).
    - ``seed``: seeds the corruption masks (``seed + generation index``; default: the trainer's ``args.seed``). A
      private generator is used, so SRPO never consumes the global RNG that TRL samples and shuffles with.
    - ``method``: ``"srpo"`` (default) | ``"vppo"`` (VPPO's trajectory scale and top-k token mask, see
      :func:`srpo_core.presets.vppo_advantages`; the mask is folded into the advantages, D36) | ``"papo"`` (TRL's
      sequence advantages, and ``−papo_kl_coef · mean(KL_prcp)`` added to the loss,
      :func:`srpo_core.presets.papo_perception_kl`).
    - ``corruption_share``: ``"prompt"`` (one corrupted image per prompt, shared by its responses) | ``"response"``
      (a mask drawn per response, as VPPO).
    - ``entropy_penalty_coef``: adds ``coef · (−mean ℓ)`` over the response tokens to the loss (VPPO's entropy
      penalty; PAPO's "original" half of the Double Entropy Loss); ``papo_aug_entropy_coef``: adds
      ``coef · (−mean ℓ̃)`` (PAPO's "augmented" half; ``ℓ̃`` is computed without gradient, as PAPO's default).
    - ``explain_every``: every k-th generation step (the first included; 0 = never) write the rollouts SRPO weighted
      as the JSONL that ``srpo-core explain`` reads (tokens, roles as scored, the three log-probs, TRL's sequence
      advantage): ``explain_dir`` (default ``<output_dir>/srpo_rollouts``), ``step-<global step>-rank<r>.jsonl``,
      one file per process and step.
    - :meth:`preset` gives each method its source's defaults (``docs/decisions.md`` D112-D114).
    """

    corruption_mode: str = "black"
    corruption_p: float = 0.5
    corruption_patch: str = "merged"
    ablation_mode: str = DEFAULT_ABLATION_MODE
    counterfactual_source: str = "group"
    ablate_tags: bool = False
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
    explain_every: int = 0
    explain_dir: str | None = None

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
        _options.check_fields(self, "SRPOTrainerOptions", nullable=("seed",))
        if self.corruption_patch not in ("merged", "raw"):
            raise ValueError(f"SRPOTrainerOptions: `corruption_patch` must be 'merged' or 'raw', got "
                             f"{self.corruption_patch!r}")
        for name in ("ablate_tags", "fused_loss"):
            object.__setattr__(self, name, _options.parse_bool(getattr(self, name), where="SRPOTrainerOptions",
                                                               spelled=name))
        if isinstance(self.explain_every, bool) or not isinstance(self.explain_every, int) or self.explain_every < 0:
            raise ValueError(f"SRPOTrainerOptions: `explain_every` must be an int >= 0 (0: never), got "
                             f"{brief(self.explain_every)}")
        if self.explain_dir is not None and not isinstance(self.explain_dir, str):
            raise TypeError(f"SRPOTrainerOptions: `explain_dir` must be a path string or None, got "
                            f"{brief(self.explain_dir)}")


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
    srpo_ablation_mode: str = _field(_OPTS.ablation_mode, "SRPO: perception span replaced by another response's "
                                     "('counterfactual'), 'mask'ed (positions kept), 'drop'ped, or 'off' (no "
                                     "ablated pass)")
    srpo_counterfactual_source: str = _field(_OPTS.counterfactual_source, "SRPO: counterfactual span from the same "
                                             "prompt's 'group' or an 'other' prompt")
    srpo_ablate_tags: bool = _field(_OPTS.ablate_tags, "SRPO: also remove the perception tags in the ablated pass")
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
    srpo_explain_every: int = _field(_OPTS.explain_every, "SRPO: write the weighted rollouts every k generation steps "
                                     "as JSONL for `srpo-core explain` (0: never)")
    srpo_explain_dir: str | None = _field(_OPTS.explain_dir, "SRPO: where those files go (default: "
                                          "<output_dir>/srpo_rollouts)")

    def __post_init__(self):
        super().__post_init__()
        where = "SRPOGRPOConfig"
        for f in dataclasses.fields(self):  # strings (YAML, environment) read as the field's type, as TRL's parser
            if not f.name.startswith("srpo_") or not isinstance(getattr(self, f.name), str):
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            value, spelled = getattr(self, f.name), f"--{f.name}"
            if kind == "bool":
                setattr(self, f.name, _options.parse_bool(value, where=where, spelled=spelled))
            elif kind == "float":
                setattr(self, f.name, _options.parse_number(value, where=where, spelled=spelled))
            elif kind.startswith("int"):
                setattr(self, f.name, _options.parse_int(value, where=where, spelled=spelled, low=0))
        try:
            self.srpo_math_config()
            self.srpo_trainer_options()
        except (ValueError, TypeError) as e:  # named as the user wrote it: the flag / field srpo_<name>
            raise _options.respell(e, where, lambda name: f"--srpo_{name}") from None

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

