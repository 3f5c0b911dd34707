"""Roles and the SRPO configuration: every knob of SPEC steps 1-5, with the SPEC's defaults."""

from __future__ import annotations

import dataclasses
import enum
import math

from srpo_core._validate import brief


class Role(enum.IntEnum):
    """Token roles: ``roles`` tensors hold these integers; any other value is an error."""

    OTHER = 0
    PERCEPTION = 1
    REASONING = 2

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"Role: `value` must be 0 (OTHER), 1 (PERCEPTION) or 2 (REASONING), got {brief(value)}")


CONTRAST_KINDS = ("logratio", "k3", "kl", "js")
WEIGHT_MAPS = ("exp", "linear", "sigmoid")
ROLE_STATS = ("all", "unclamped")

# Bounds that keep every accepted config's weights finite and > 0 in float32 on every backend (decision D85):
# contrast signals are at most SIGNAL_MAX in magnitude, β_r · u_max at most EXPONENT_MAX (so exp / sigmoid / linear
# weights stay within [e^-20, e^20] before and [e^-40, n] after renormalisation), eps at least EPS_MIN (1 / (σ + eps)
# is a float32 in the kernel), w_min at least W_MIN_MIN (a float32 floor that cannot round to 0).
SIGNAL_MAX = 1e15
EXPONENT_MAX = 20.0
BETA_MAX = 1e6
U_MAX_MAX = 1e6
EPS_MIN = 1e-30
W_MIN_MIN = 1e-6


@dataclasses.dataclass(frozen=True)
class SRPOConfig:
    """SPEC steps 1-5. Frozen and validated at construction.

    Step 1 contrast: ``perception_contrast`` (visual dependency, default ``k3``), ``reasoning_contrast`` (consistency
    with the generated perception, default ``logratio``), ``clamp`` (``c``), ``k3_max``.
    Step 2: ``standardize`` (``"batch"`` | ``"none"``), ``eps``.
    Step 4: ``u_max``, ``beta_perception``, ``beta_reasoning``, ``weight_map`` (``"exp"`` | ``"linear"`` |
    ``"sigmoid"``), ``w_min`` (linear map only).
    Step 5: ``renorm`` (``"mean"`` | ``"none"``).
    ``role_stats``: which signals step 2's ``μ_r, σ_r`` are taken over: ``"all"`` (SPEC, the default) or
    ``"unclamped"`` (signals at a bound of their contrast, e.g. a ``−inf`` log-prob driven to ``±clamp``, are left out
    of the statistics but still standardised by them; decision D87).

    Bounds (D85): ``0 < clamp, k3_max <= 1e15``; ``eps >= 1e-30``; ``0 < u_max <= 1e6``; ``0 <= β_r <= 1e6`` and
    ``β_r · u_max <= 20``; ``1e-6 <= w_min <= 1``. Within them every weight is finite and > 0 in float32.
    """

    perception_contrast: str = "k3"
    reasoning_contrast: str = "logratio"
    clamp: float = 20.0
    k3_max: float = 10.0
    standardize: str = "batch"
    eps: float = 1e-6
    u_max: float = 3.0
    beta_perception: float = 0.5
    beta_reasoning: float = 0.5
    weight_map: str = "exp"
    w_min: float = 0.1
    renorm: str = "mean"
    role_stats: str = "all"

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"SRPOConfig: `{name}` must be one of {allowed}, got {brief(value)}")

        def number(name: str, *, positive: bool = False, nonnegative: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SRPOConfig: `{name}` must be a finite number, got {brief(value)}")
            if positive and not value > 0:
                raise ValueError(f"SRPOConfig: `{name}` must be > 0, got {brief(value)}")
            if nonnegative and not value >= 0:
                raise ValueError(f"SRPOConfig: `{name}` must be >= 0, got {brief(value)}")

        choice("perception_contrast", CONTRAST_KINDS)
        choice("reasoning_contrast", CONTRAST_KINDS)
        choice("standardize", ("batch", "none"))
        choice("weight_map", WEIGHT_MAPS)
        choice("renorm", ("mean", "none"))
        choice("role_stats", ROLE_STATS)
        number("clamp", positive=True)
        number("k3_max", positive=True)
        number("eps", positive=True)
        number("u_max", positive=True)
        number("beta_perception", nonnegative=True)
        number("beta_reasoning", nonnegative=True)
        number("w_min", positive=True)
        if self.w_min > 1:
            raise ValueError(f"SRPOConfig: `w_min` must be in (0, 1], got {brief(self.w_min)} (a floor above 1 would "
                             "raise every role token above OTHER tokens even at beta = 0)")

        def at_most(name: str, bound: float, why: str) -> None:
            if getattr(self, name) > bound:
                raise ValueError(f"SRPOConfig: `{name}` must be <= {bound:g}, got {getattr(self, name)!r} ({why})")

        at_most("clamp", SIGNAL_MAX, "the bound on every signal: larger ones overflow float32 statistics")
        at_most("k3_max", SIGNAL_MAX, "the bound on every signal: larger ones overflow float32 statistics")
        at_most("u_max", U_MAX_MAX, "a float32 clip; z is at most sqrt(N) under standardize='batch'")
        at_most("beta_perception", BETA_MAX, "a float32 strength")
        at_most("beta_reasoning", BETA_MAX, "a float32 strength")
        if self.eps < EPS_MIN:
            raise ValueError(f"SRPOConfig: `eps` must be >= {EPS_MIN:g}, got {brief(self.eps)} (1 / (sigma + eps) must "
                             "be a finite float32)")
        if self.w_min < W_MIN_MIN:
            raise ValueError(f"SRPOConfig: `w_min` must be >= {W_MIN_MIN:g}, got {brief(self.w_min)} (a smaller floor "
                             "rounds to 0 in float32 after renormalisation)")
        for name in ("beta_perception", "beta_reasoning"):
            if getattr(self, name) * self.u_max > EXPONENT_MAX:
                raise ValueError(
                    f"SRPOConfig: `{name}` · `u_max` must be <= {EXPONENT_MAX:g}, got {getattr(self, name)!r} · "
                    f"{brief(self.u_max)} (a weight ratio of e^40 within a trajectory is the most float32 keeps finite "
                    "and > 0 after renormalisation)")

    def beta(self, role: Role) -> float:
        return {Role.PERCEPTION: self.beta_perception, Role.REASONING: self.beta_reasoning}.get(role, 0.0)


KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """The loss options of ``linear_policy_loss``. Frozen and validated at construction.

    ``epsilon_low``, ``epsilon_high``: PPO clip range ``[1 − ε_low, 1 + ε_high]`` (``epsilon_high`` None: = ε_low).
    ``clip_ratio_c``: dual-clip constant ``c > 1`` (verl's name), None: off.
    ``beta``, ``kl_kind``: KL coefficient and estimator (``"k1" | "k2" | "k3" | "low_var_kl"``);
    ``kl_ratio_correction``: weight the KL term by the ratio ``r_t`` (TRL's ``use_bias_correction_kl``).
    ``entropy_coeff``: entropy bonus coefficient (subtracted).
    ``loss_agg_mode``: verl's aggregation modes; ``"seq-mean-token-sum-norm"`` also divides by ``loss_scale_factor``
    (None: ``T`` in the padded layout, required in the packed one). ``global_batch_size``: what the sequence means
    divide by (None: the sequences with a valid token). ``temperature``: ``τ > 0``.
    """

    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    clip_ratio_c: float | None = None
    beta: float = 0.0
    kl_kind: str = "k3"
    kl_ratio_correction: bool = False
    entropy_coeff: float = 0.0
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: float | None = None
    global_batch_size: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        def number(name: str, *, low: float | None = None, low_open: bool = False, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"PolicyLossConfig: `{name}` must be a finite float, got {brief(value)}")
            if low is not None and (value <= low if low_open else value < low):
                raise ValueError(f"PolicyLossConfig: `{name}` must be {'>' if low_open else '>='} {low}, "
                                 f"got {brief(value)}")

        number("epsilon_low", low=0)
        number("epsilon_high", low=0, allow_none=True)
        number("clip_ratio_c", low=1, low_open=True, allow_none=True)
        number("beta")
        number("entropy_coeff")
        number("temperature", low=0, low_open=True)
        number("loss_scale_factor", low=0, low_open=True, allow_none=True)
        number("global_batch_size", low=0, low_open=True, allow_none=True)
        for name, allowed in (("kl_kind", KL_KINDS), ("loss_agg_mode", LOSS_AGG_MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"PolicyLossConfig: `{name}` must be one of {allowed}, got {brief(value)}")
        if not isinstance(self.kl_ratio_correction, bool):
            raise TypeError(f"PolicyLossConfig: `kl_ratio_correction` must be a bool, got "
                            f"{brief(self.kl_ratio_correction)}")
