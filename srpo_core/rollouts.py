"""Rollouts as JSONL (the input of ``srpo-core explain`` and the built-in demo), validated line by line.

One JSON object per line (schema: docs/rollouts.md):
- ``prompt_id`` (string or integer, required): responses with the same id form a GRPO group;
- ``tokens`` (list of strings, required): the response's tokens as text; ``"".join(tokens)`` is the response;
- ``logp``, ``logp_corrupt``, ``logp_ablated`` (lists of numbers, one per token, required): ℓ, ℓ̃, ℓ°;
  ``null`` stands for ``-inf`` (JSON has no infinity); NaN is refused;
- ``reward`` (number) or ``advantage`` (number): one of the two; advantages come from ``grpo_advantages`` over
  the file's groups unless every record carries ``advantage``;
- ``roles`` (list of 0/1/2, optional): per-token roles; derived from the tags in the text when absent;
- ``response_id``, ``prompt`` (optional): shown in the output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import torch

from srpo_core.roles import roles_from_text

REQUIRED_LISTS = ("logp", "logp_corrupt", "logp_ablated")


class RolloutError(ValueError):
    """A malformed rollout line: the message names the file, the line and the field."""


@dataclasses.dataclass
class Rollouts:
    """A batch in the packed layout: per-token tensors ``[N]``, ``cu_seqlens: [B+1]``, per-response lists ``[B]``."""

    records: list[dict]
    tokens: list[list[str]]
    logp: torch.Tensor
    logp_corrupt: torch.Tensor
    logp_ablated: torch.Tensor
    roles: torch.Tensor
    cu_seqlens: torch.Tensor
    group_ids: torch.Tensor
    rewards: torch.Tensor | None
    advantages: torch.Tensor | None
    malformed: int


def _fail(where: str, field: str, message: str):
    raise RolloutError(f"{where}: field `{field}` {message}")


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise RolloutError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
    if "prompt_id" not in rec:
        _fail(where, "prompt_id", "is missing (responses with the same prompt_id form a group)")
    if not isinstance(rec["prompt_id"], (str, int)) or isinstance(rec["prompt_id"], bool):
        _fail(where, "prompt_id", f"must be a string or an integer, got {rec['prompt_id']!r}")
    tokens = rec.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        _fail(where, "tokens", "must be a list of strings" + (" (it is missing)" if tokens is None else ""))
    n = len(tokens)
    for field in REQUIRED_LISTS:
        values = rec.get(field)
        if values is None:
            _fail(where, field, f"is missing (a list of {n} numbers, one per token)")
        if not isinstance(values, list) or len(values) != n:
            got = f"{len(values)}" if isinstance(values, list) else type(values).__name__
            _fail(where, field, f"must be a list of {n} numbers (one per token), got {got}")
        for k, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v == math.inf:
                _fail(where, field, f"[{k}] must be a number or null (for -inf), got {v!r}")
    if "roles" in rec:
        roles = rec["roles"]
        if not isinstance(roles, list) or len(roles) != n:
            _fail(where, "roles", f"must be a list of {n} integers (one per token)")
        for k, r in enumerate(roles):
            if r not in (0, 1, 2) or isinstance(r, bool):
                _fail(where, "roles", f"[{k}] must be 0 (OTHER), 1 (PERCEPTION) or 2 (REASONING), got {r!r}")
    for field in ("reward", "advantage"):
        v = rec.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            _fail(where, field, f"must be a finite number, got {v!r}")
    if rec.get("reward") is None and rec.get("advantage") is None:
        _fail(where, "reward", "is missing (give `reward`, or `advantage` for every record)")
    return rec


def parse_lines(lines, name: str = "<rollouts>") -> list[dict]:
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RolloutError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        records.append(_check_record(rec, where))
    if not records:
        raise RolloutError(f"{name}: no rollouts (the file is empty)")
    return records


def load(path) -> list[dict]:
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RolloutError(f"{path}: cannot be read ({e.strerror})") from None
    return parse_lines(text.splitlines(), str(path))


def _floats(values) -> list[float]:
    return [-math.inf if v is None else float(v) for v in values]


def to_batch(records: list[dict]) -> Rollouts:
    """Records → the packed tensors ``role_aware_advantages`` takes (roles from tags where not given)."""
    roles, malformed = [], 0
    for rec in records:
        if "roles" in rec:
            roles.extend(rec["roles"])
            continue
        text, offsets, pos = "".join(rec["tokens"]), [], 0
        for t in rec["tokens"]:
            offsets.append((pos, pos + len(t)))
            pos += len(t)
        found = roles_from_text(text, offsets)
        roles.extend(found.roles.tolist())
        malformed += int(found.malformed)
    lengths = [len(r["tokens"]) for r in records]
    cu = torch.tensor([0] + lengths).cumsum(0)
    groups = {pid: k for k, pid in enumerate(dict.fromkeys(str(r["prompt_id"]) for r in records))}
    has_adv = all(r.get("advantage") is not None for r in records)
    if not has_adv and any(r.get("reward") is None for r in records):
        k = next(i for i, r in enumerate(records) if r.get("reward") is None)
        raise RolloutError(f"record {k + 1}: field `reward` is missing while other records have no `advantage`: "
                           "give `advantage` for every record, or `reward` for every record")
    return Rollouts(
        records=records,
        tokens=[r["tokens"] for r in records],
        logp=torch.tensor([x for r in records for x in _floats(r["logp"])], dtype=torch.float32),
        logp_corrupt=torch.tensor([x for r in records for x in _floats(r["logp_corrupt"])], dtype=torch.float32),
        logp_ablated=torch.tensor([x for r in records for x in _floats(r["logp_ablated"])], dtype=torch.float32),
        roles=torch.tensor(roles, dtype=torch.int64),
        cu_seqlens=cu,
        group_ids=torch.tensor([groups[str(r["prompt_id"])] for r in records]),
        rewards=None if has_adv else torch.tensor([float(r["reward"]) for r in records]),
        advantages=torch.tensor([float(r["advantage"]) for r in records]) if has_adv else None,
        malformed=malformed,
    )
