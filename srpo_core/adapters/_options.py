"""One set of option names for every trainer adapter, parsed and checked where the trainer is built.

The names are those of :class:`srpo_core.SRPOConfig` (the math) plus :data:`SHARED` (the passes and the VPPO
preset). Each trainer spells them its own way, and every error names the user's spelling, the value and what was
expected:

- TRL: ``SRPOGRPOConfig`` fields / flags ``srpo_<name>`` (``--srpo_corruption_p 0.5``);
- verl: Hydra keys ``algorithm.srpo.<name>`` (``+algorithm.srpo.corruption_p=0.5``);
- EasyR1: keys of the ``srpo_options`` mapping given to ``SRPORayPPOTrainer`` (``srpo_options["corruption_p"]``);
- OpenRLHF: flags ``--srpo.<name> VALUE`` of the wrapper, or keys of its ``--srpo JSON`` object.

Values may come as strings (environment variables, JSON, command lines): numbers are parsed and range-checked,
booleans are read from ``true/false/1/0/yes/no`` (any other string is an error: ``bool("false")`` is True),
choices are checked against their list. The names :data:`DEPRECATED` (``corrupt_p``, ``corrupt_mode``, ``ablate``)
are read for one release with an :class:`OptionDeprecationWarning` naming the new one (``docs/decisions.md`` D195).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from srpo_core._validate import brief
from srpo_core.ablation import ABLATION_MODES, DEFAULT_ABLATION_MODE, DONOR_SOURCES
from srpo_core.config import SRPOConfig
from srpo_core.corruption import MODES

# ``ablation_mode="off"`` runs no ablated pass: reasoning tokens carry no signal (scored like OTHER tokens).
ABLATION_OFF = "off"
ABLATION_CHOICES = (*ABLATION_MODES, ABLATION_OFF)


class OptionDeprecationWarning(DeprecationWarning):
    """An old option name was used; shown by default (a plain DeprecationWarning is hidden outside ``__main__``)."""


warnings.filterwarnings("default", category=OptionDeprecationWarning)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: ``kind`` is ``"choice"`` (one of ``choices``), ``"number"`` (in ``[low, high]``, ``low_open``
    excludes ``low``), ``"int"`` (``>= low``) or ``"bool"``; ``nullable`` also accepts None."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    nullable: bool = False


# The options every adapter shares beyond SRPOConfig's fields, with their defaults (the TRL trainer's seed defaults to
# its ``args.seed`` instead: ``SRPOTrainerOptions.seed=None``).
SHARED = (
    Option("corruption_mode", "choice", "black", "corrupted image: 'black', 'mean' or 'noise'", choices=MODES),
    Option("corruption_p", "number", 0.5, "probability that a visual unit is corrupted", low=0.0, high=1.0),
    Option("seed", "int", 0, "base seed of the corruption masks", low=0),
    Option("ablation_mode", "choice", DEFAULT_ABLATION_MODE,
           "reasoning contrast: the perception span replaced by another response's ('counterfactual'), hidden with "
           "positions kept ('mask'), removed ('drop'), or no ablated pass ('off')", choices=ABLATION_CHOICES),
    Option("counterfactual_source", "choice", "group",
           "counterfactual span from the same prompt's 'group' or an 'other' prompt", choices=DONOR_SOURCES),
    Option("vppo_beta_min", "number", 0.9, "VPPO's trajectory-scale floor", low=0.0, high=1.0),
    Option("vppo_top_k", "number", 0.4, "VPPO's share of tokens kept", low=0.0, high=1.0, low_open=True),
)
SHARED_BY_NAME = {o.name: o for o in SHARED}
# old name -> new name (read for one release, with a warning)
DEPRECATED = {"corrupt_p": "corruption_p", "corrupt_mode": "corruption_mode", "ablate": "ablation_mode"}

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_SRPO_FIELDS = {f.name: f for f in dataclasses.fields(SRPOConfig)}


def _fail(where: str, spelled: str, value, expected: str, kind=ValueError):
    raise kind(f"{where}: `{spelled}` must be {expected}, got {brief(value)}")


def parse_bool(value, *, where: str, spelled: str) -> bool:
    """``value`` as a bool: a bool, 0/1, or one of ``true/false/1/0/yes/no`` (any case); anything else raises."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    _fail(where, spelled, value, "a boolean (true/false, 1/0, yes/no)")


def parse_number(value, *, where: str, spelled: str, low=None, high=None, low_open=False) -> float:
    """``value`` as a finite float (numeric strings accepted) in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    span = ""
    if low is not None or high is not None:
        span = f" in {'(' if low_open else '['}{'-inf' if low is None else f'{low:g}'}, " \
               f"{'inf' if high is None else f'{high:g}'}]"
    x = value
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            _fail(where, spelled, value, f"a number{span}")
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        _fail(where, spelled, value, f"a finite number{span}")
    if (low is not None and (x <= low if low_open else x < low)) or (high is not None and x > high):
        _fail(where, spelled, value, f"a number{span}")
    return float(x)


def parse_int(value, *, where: str, spelled: str, low=None) -> int:
    """``value`` as an int (decimal strings and integral floats accepted), ``>= low``."""
    expected = "an integer" + ("" if low is None else f" >= {low}")
    x = value
    if isinstance(x, str):
        try:
            x = int(x.strip())
        except ValueError:
            _fail(where, spelled, value, expected)
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int) or (low is not None and x < low):
        _fail(where, spelled, value, expected)
    return x


def parse_option(option: Option, value, *, where: str, spelled: str):
    """``value`` parsed and checked as ``option`` says."""
    if value is None and option.nullable:
        return None
    if option.kind == "bool":
        return parse_bool(value, where=where, spelled=spelled)
    if option.kind == "number":
        return parse_number(value, where=where, spelled=spelled, low=option.low, high=option.high,
                            low_open=option.low_open)
    if option.kind == "int":
        return parse_int(value, where=where, spelled=spelled, low=option.low)
    if isinstance(value, str) and value.strip() in option.choices:
        return value.strip()
    _fail(where, spelled, value, f"one of {option.choices}")


def parse_math_value(name: str, value, *, where: str, spelled: str):
    """An :class:`SRPOConfig` field's value with strings turned into numbers where the field is a number (the
    ranges are SRPOConfig's own, checked when it is built: :func:`respell` renames its messages)."""
    kind = _SRPO_FIELDS[name].type
    if kind in ("float", float) and isinstance(value, str):
        return parse_number(value, where=where, spelled=spelled)
    return value


_MESSAGE = re.compile(r"^(SRPOConfig|SRPOTrainerOptions|AdapterOptions): `(\w+)`")


def respell(error: Exception, where: str, spell: Callable[[str], str]) -> Exception:
    """``error`` (from SRPOConfig / SRPOTrainerOptions / AdapterOptions) with its ``Class: `name``` prefix rewritten
    as ``where: `<the user's spelling of name>```; other messages get ``where: `` in front."""
    text = str(error)
    m = _MESSAGE.match(text)
    text = f"{where}: `{spell(m.group(2))}`{text[m.end():]}" if m else f"{where}: {text}"
    return type(error)(text)


def read_options(mapping: Mapping[str, Any] | None, *, where: str, spell: Callable[[str], str],
                 defaults: Mapping[str, Any] | None = None) -> tuple[SRPOConfig, dict[str, Any]]:
    """Parse one flat mapping of option names (SRPOConfig fields, :data:`SHARED`, :data:`DEPRECATED`) into an
    :class:`SRPOConfig` and a dict of the shared options (defaults filled in). ``spell(name)`` is how the user wrote
    ``name`` (e.g. ``"algorithm.srpo." + name``); every error names it, with the value and what was expected."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{where}: the SRPO options must be a mapping of option names to values, got {brief(mapping)}")
    known = sorted({*_SRPO_FIELDS, *SHARED_BY_NAME})
    values = dict(mapping)
    for key in values:
        if not isinstance(key, str) or (key not in _SRPO_FIELDS and key not in SHARED_BY_NAME
                                        and key not in DEPRECATED):
            close = difflib.get_close_matches(str(key), known + list(DEPRECATED), n=1)
            hint = f" (did you mean `{spell(close[0])}`?)" if close else ""
            raise ValueError(f"{where}: unknown option `{spell(str(key))}`{hint}; the options are {known}")
    for old, new in DEPRECATED.items():
        if old not in values:
            continue
        raw = values.pop(old)
        if old == "ablate":
            value = None if parse_bool(raw, where=where, spelled=spell(old)) else ABLATION_OFF
            hint = f"`{spell(new)}={ABLATION_OFF}` to turn the ablated pass off"
        else:
            value = raw
            hint = f"`{spell(new)}`"
        warnings.warn(f"{where}: `{spell(old)}` is deprecated and will be removed in the next release; use {hint}",
                      OptionDeprecationWarning, stacklevel=3)
        if value is None:
            continue  # ablate=true: the mode as given (or its default)
        if new in values and values[new] != value:
            raise ValueError(f"{where}: `{spell(old)}={brief(raw)}` (deprecated) and `{spell(new)}="
                             f"{brief(values[new])}` disagree; give `{spell(new)}` alone")
        values[new] = value
    shared = {o.name: (defaults or {}).get(o.name, o.default) for o in SHARED}
    for name, value in values.items():
        if name in SHARED_BY_NAME:
            shared[name] = parse_option(SHARED_BY_NAME[name], value, where=where, spelled=spell(name))
    math_values = {k: parse_math_value(k, v, where=where, spelled=spell(k)) for k, v in values.items()
                   if k in _SRPO_FIELDS}
    try:
        srpo = SRPOConfig(**math_values)
    except (ValueError, TypeError) as e:
        raise respell(e, where, spell) from None
    return srpo, shared


def check_fields(obj, where: str, *, nullable: tuple[str, ...] = ()) -> None:
    """Check (and normalise) the :data:`SHARED` option fields of a frozen dataclass ``obj`` in place; the fields
    named in ``nullable`` may also be None (the TRL trainer's ``seed``: its ``args.seed``)."""
    for option in SHARED:
        if not hasattr(obj, option.name):
            continue
        value = getattr(obj, option.name)
        if value is None and option.name in nullable:
            continue
        object.__setattr__(obj, option.name, parse_option(option, value, where=where, spelled=option.name))
