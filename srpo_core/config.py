"""Roles and the SRPO configuration: every knob of SPEC steps 1-5, with the SPEC's defaults."""

from __future__ import annotations

import dataclasses
import enum
import math


class Role(enum.IntEnum):
    """Token roles: ``roles`` tensors hold these integers; any other value is an error."""

    OTHER = 0
    PERCEPTION = 1
    REASONING = 2


CONTRAST_KINDS = ("logratio", "k3", "kl", "js")
WEIGHT_MAPS = ("exp", "linear", "sigmoid")


@dataclasses.dataclass(frozen=True)
class SRPOConfig:
    """SPEC steps 1-5. Frozen and validated at construction.

    Step 1 contrast: ``perception_contrast`` (visual dependency, default ``k3``), ``reasoning_contrast`` (consistency
    with the generated perception, default ``logratio``), ``clamp`` (``c``), ``k3_max``.
    Step 2: ``standardize`` (``"batch"`` | ``"none"``), ``eps``.
    Step 4: ``u_max``, ``beta_perception``, ``beta_reasoning``, ``weight_map`` (``"exp"`` | ``"linear"`` |
    ``"sigmoid"``), ``w_min`` (linear map only).
    Step 5: ``renorm`` (``"mean"`` | ``"none"``).
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

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"SRPOConfig: `{name}` must be one of {allowed}, got {value!r}")

        def number(name: str, *, positive: bool = False, nonnegative: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SRPOConfig: `{name}` must be a finite number, got {value!r}")
            if positive and not value > 0:
                raise ValueError(f"SRPOConfig: `{name}` must be > 0, got {value!r}")
            if nonnegative and not value >= 0:
                raise ValueError(f"SRPOConfig: `{name}` must be >= 0, got {value!r}")

        choice("perception_contrast", CONTRAST_KINDS)
        choice("reasoning_contrast", CONTRAST_KINDS)
        choice("standardize", ("batch", "none"))
        choice("weight_map", WEIGHT_MAPS)
        choice("renorm", ("mean", "none"))
        number("clamp", positive=True)
        number("k3_max", positive=True)
        number("eps", positive=True)
        number("u_max", positive=True)
        number("beta_perception", nonnegative=True)
        number("beta_reasoning", nonnegative=True)
        number("w_min", positive=True)
        if self.w_min > 1:
            raise ValueError(f"SRPOConfig: `w_min` must be in (0, 1], got {self.w_min!r} (a floor above 1 would "
                             "raise every role token above OTHER tokens even at beta = 0)")

    def beta(self, role: Role) -> float:
        return {Role.PERCEPTION: self.beta_perception, Role.REASONING: self.beta_reasoning}.get(role, 0.0)
