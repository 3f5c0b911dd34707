"""Rollouts as JSONL (the input of ``srpo-core explain`` and the built-in demo), validated line by line.

One JSON object per line, one line per response (schema and examples: docs/rollouts.md):
- ``prompt_id`` (string or integer, required): responses with the same id form a GRPO group;
- ``tokens`` (list of strings, required): the response's tokens as text; ``"".join(tokens)`` is the response;
- ``logp``, ``logp_corrupt``, ``logp_ablated`` (lists of numbers, one per token): ℓ, ℓ̃, ℓ°;
  ``null`` (or ``-Infinity``) stands for ``-inf``; NaN and ``+inf`` are refused;
- ``reward`` (number) or ``advantage`` (number): advantages come from ``grpo_advantages`` over the file's groups
  unless every line carries ``advantage``;
- ``roles`` (list of 0/1/2, optional): per-token roles; derived from the tags in the text when absent;
- ``perception_signal``, ``reasoning_signal`` (lists of finite numbers, optional, on every line or on none):
  precomputed ``s_t`` (e.g. ``kl`` from ``token_contrast``) replacing that role's contrast; ``logp_corrupt`` /
  ``logp_ablated`` may then be left out;
- ``response_id``, ``prompt`` (optional): shown in the output.

Every error names the file, the line and the field, and is a :class:`RolloutError` (a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import torch

from srpo_core._validate import brief
from srpo_core.roles import roles_from_text

LOGP_FIELDS = ("logp", "logp_corrupt", "logp_ablated")
SIGNAL_FIELDS = {"perception_signal": "logp_corrupt", "reasoning_signal": "logp_ablated"}


class RolloutError(ValueError):
    """A malformed rollout line: the message names the file, the line and the field."""


@dataclasses.dataclass
class Rollouts:
    """A batch in the packed layout: per-token tensors ``[N]``, ``cu_seqlens: [B+1]``, per-response lists ``[B]``.

    ``logp_corrupt`` / ``logp_ablated`` are ``None`` when the file gives the matching precomputed signal instead.
    """

    records: list[dict]
    tokens: list[list[str]]
    logp: torch.Tensor
    logp_corrupt: torch.Tensor | None
    logp_ablated: torch.Tensor | None
    roles: torch.Tensor
    cu_seqlens: torch.Tensor
    group_ids: torch.Tensor
    rewards: torch.Tensor | None
    advantages: torch.Tensor | None
    perception_signal: torch.Tensor | None
    reasoning_signal: torch.Tensor | None
    malformed: int


def _fail(where: str, field: str, message: str):
    raise RolloutError(f"{where}: field `{field}` {message}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_numbers(rec: dict, field: str, n: int, where: str, *, allow_null: bool) -> None:
    values = rec[field]
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)}" if isinstance(values, list) else type(values).__name__
        _fail(where, field, f"must be a list of {n} numbers (one per token), got {got}")
    for k, v in enumerate(values):
        if v is None and allow_null:
            continue
        if not _is_number(v) or math.isnan(v) or v == math.inf or (not allow_null and not math.isfinite(v)):
            what = "a number or null (for -inf)" if allow_null else "a finite number"
            _fail(where, field, f"[{k}] must be {what}, got {brief(v)}")


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise RolloutError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
    if "prompt_id" not in rec:
        _fail(where, "prompt_id", "is missing (responses with the same prompt_id form a group)")
    if not isinstance(rec["prompt_id"], (str, int)) or isinstance(rec["prompt_id"], bool):
        _fail(where, "prompt_id", f"must be a string or an integer, got {brief(rec['prompt_id'])}")
    tokens = rec.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        _fail(where, "tokens", "must be a list of strings" + (" (it is missing)" if tokens is None else ""))
    n = len(tokens)
    for field in LOGP_FIELDS:
        if rec.get(field) is None:
            instead = [s for s, f in SIGNAL_FIELDS.items() if f == field]
            if instead and rec.get(instead[0]) is not None:
                continue  # the precomputed signal replaces this contrast
            also = f", or give `{instead[0]}`" if instead else ""
            _fail(where, field, f"is missing (a list of {n} numbers, one per token{also})")
        _check_numbers(rec, field, n, where, allow_null=True)
    for field in SIGNAL_FIELDS:
        if rec.get(field) is not None:
            _check_numbers(rec, field, n, where, allow_null=False)
    if "roles" in rec:
        roles = rec["roles"]
        if not isinstance(roles, list) or len(roles) != n:
            got = f"{len(roles)}" if isinstance(roles, list) else type(roles).__name__
            _fail(where, "roles", f"must be a list of {n} integers (one per token), got {got}")
        for k, r in enumerate(roles):
            if isinstance(r, bool) or r not in (0, 1, 2):
                _fail(where, "roles", f"[{k}] must be 0 (OTHER), 1 (PERCEPTION) or 2 (REASONING), got {brief(r)}")
    for field in ("reward", "advantage"):
        v = rec.get(field)
        if v is not None and (not _is_number(v) or not math.isfinite(v)):
            _fail(where, field, f"must be a finite number, got {brief(v)}")
    if rec.get("reward") is None and rec.get("advantage") is None:
        _fail(where, "reward", "is missing (give `reward`, or `advantage` on every line)")
    return rec


def _check_file(records: list[dict], wheres: list[str]) -> None:
    """Rules across lines: ``advantage`` is used only if every line has it, else every line needs ``reward``;
    a precomputed signal is given on every line or on none."""
    if not all(r.get("advantage") is not None for r in records):
        for rec, where in zip(records, wheres, strict=True):
            if rec.get("reward") is None:
                other = wheres[next(k for k, r in enumerate(records) if r.get("advantage") is None)]
                _fail(where, "reward", f"is missing, and `advantage` cannot be used because {other} has none: "
                                       "give `reward` on every line, or `advantage` on every line")
    for field in SIGNAL_FIELDS:
        has = [r.get(field) is not None for r in records]
        if any(has) and not all(has):
            first_with = wheres[has.index(True)]
            _fail(wheres[has.index(False)], field, f"is missing while {first_with} gives it: a precomputed signal "
                                                   "goes on every line or on none")


def parse_lines(lines, name: str = "<rollouts>") -> list[dict]:
    """Validate JSONL lines (blank lines skipped) and return the records; raises :class:`RolloutError`."""
    records, wheres = [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RolloutError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:  # a line nested deeper than the interpreter's stack (D91)
            raise RolloutError(f"{where}: JSON nested too deeply to read (a rollout is one flat object)") from None
        records.append(_check_record(rec, where))
        wheres.append(where)
    if not records:
        raise RolloutError(f"{name}: no rollouts (the file is empty)")
    _check_file(records, wheres)
    return records


def load(path) -> list[dict]:
    """Read and validate a rollouts JSONL file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RolloutError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RolloutError(f"{path}: is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_lines(text.splitlines(), str(path))


def _per_token(records: list[dict], field: str) -> torch.Tensor | None:
    if any(r.get(field) is None for r in records):
        return None
    return torch.tensor([-math.inf if v is None else float(v) for r in records for v in r[field]],
                        dtype=torch.float32)


def token_roles(rec: dict) -> tuple[list[int], bool]:
    """The record's per-token roles (``roles`` if given, else from the tags in its text) and whether its tags were
    malformed. Tokens are matched to characters by concatenation: token ``k`` covers its own text in
    ``"".join(tokens)``."""
    if "roles" in rec:
        return list(rec["roles"]), False
    text, offsets, pos = "".join(rec["tokens"]), [], 0
    for t in rec["tokens"]:
        offsets.append((pos, pos + len(t)))
        pos += len(t)
    found = roles_from_text(text, offsets)
    return found.roles.tolist(), bool(found.malformed)


def to_batch(records: list[dict]) -> Rollouts:
    """Validated records (from :func:`load` / :func:`parse_lines`) → the packed tensors ``role_aware_advantages``
    takes."""
    roles, malformed = [], 0
    for rec in records:
        r, bad = token_roles(rec)
        roles.extend(r)
        malformed += bad
    lengths = [len(r["tokens"]) for r in records]
    keys = [json.dumps(r["prompt_id"]) for r in records]  # "1" and 1 are different prompts
    groups = {key: k for k, key in enumerate(dict.fromkeys(keys))}
    has_adv = all(r.get("advantage") is not None for r in records)
    signals = {f: _per_token(records, f) for f in SIGNAL_FIELDS}
    return Rollouts(
        records=records,
        tokens=[r["tokens"] for r in records],
        logp=_per_token(records, "logp"),
        logp_corrupt=None if signals["perception_signal"] is not None else _per_token(records, "logp_corrupt"),
        logp_ablated=None if signals["reasoning_signal"] is not None else _per_token(records, "logp_ablated"),
        roles=torch.tensor(roles, dtype=torch.int64),
        cu_seqlens=torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0),
        group_ids=torch.tensor([groups[key] for key in keys], dtype=torch.int64),
        rewards=None if has_adv else torch.tensor([float(r["reward"]) for r in records]),
        advantages=torch.tensor([float(r["advantage"]) for r in records]) if has_adv else None,
        perception_signal=signals["perception_signal"],
        reasoning_signal=signals["reasoning_signal"],
        malformed=malformed,
    )


def to_records(tokens: list[list[str]], mask: torch.Tensor, roles: torch.Tensor, logp: torch.Tensor,
               logp_corrupt: torch.Tensor, logp_ablated: torch.Tensor, advantages: torch.Tensor,
               prompt_ids: list, response_ids: list | None = None) -> list[dict]:
    """Rollouts in this module's schema, one record per response, from a trainer's padded batch: ``mask: bool [B, T]``
    (the response tokens), ``roles``, ``logp``, ``logp_corrupt``, ``logp_ablated``: ``[B, T]``; ``advantages: [B]``
    (the sequence advantage); ``tokens[b]``: the text of each masked token of row ``b``. ``−inf`` is written as
    ``null``; ``srpo-core explain`` reads the result (:func:`write_jsonl`)."""
    m = mask.bool().cpu()
    cols = {name: t.detach().float().cpu() for name, t in
            (("logp", logp), ("logp_corrupt", logp_corrupt), ("logp_ablated", logp_ablated))}
    r, adv = roles.cpu(), advantages.detach().double().cpu().tolist()
    records = []
    for b in range(m.shape[0]):
        n = int(m[b].sum())
        if len(tokens[b]) != n:
            raise ValueError(f"to_records: row {b} has {n} masked tokens but {len(tokens[b])} token texts")
        rec = {"prompt_id": prompt_ids[b], "tokens": list(tokens[b]), "roles": r[b][m[b]].tolist(),
               "advantage": adv[b]}
        for name, t in cols.items():
            rec[name] = [None if v == -math.inf else v for v in t[b][m[b]].tolist()]
        if response_ids is not None:
            rec["response_id"] = response_ids[b]
        records.append(rec)
    return records


def write_jsonl(path, records: list[dict]) -> pathlib.Path:
    """Write ``records`` one per line (``allow_nan=False``: a NaN or ``+inf`` is an error here, never a file that
    :func:`load` refuses later); the folder is created. Returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
    return path
