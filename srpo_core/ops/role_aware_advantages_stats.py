"""The logging statistics of ``role_aware_advantages`` (``RoleAwareAdvantages.stats``) and the implausible-log-prob
warning read with them: per role ``count``, ``mu``, ``sigma``, ``w_min``, ``w_mean``, ``w_max``, ``clamped``, brought
to the host in one transfer with the largest log-probs read (no extra host sync; D191)."""

from __future__ import annotations

import torch

from srpo_core._validate import _WARNED, largest_at, warn_positive_logprobs
from srpo_core.common.role_aware_advantages import RoleWeights
from srpo_core.config import Role

OP = "role_aware_advantages"
STAT_KEYS = ("count", "mu", "sigma", "w_min", "w_mean", "w_max", "clamped")


class LogprobChecks:
    """The log-prob inputs at the positions where they are read (``logp`` at perception and reasoning tokens,
    ``logp_corrupt`` at perception, ``logp_ablated`` at reasoning, each unless a precomputed signal replaces it), and
    their largest values there as one device tensor, read with the statistics (no extra host sync; D191)."""

    def __init__(self, logp, logp_corrupt, logp_ablated, roles, mask, perception_signal, reasoning_signal):
        self.checked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.largest: torch.Tensor | None = None
        wanted = {
            "logp": (logp, (perception_signal is None, reasoning_signal is None)),
            "logp_corrupt": (logp_corrupt, (perception_signal is None, False)),
            "logp_ablated": (logp_ablated, (False, reasoning_signal is None)),
        }
        wanted = {k: v for k, v in wanted.items() if v[0] is not None and any(v[1]) and (OP, k) not in _WARNED}
        if not wanted:
            return
        sel = {}
        for role, i in ((Role.PERCEPTION, 0), (Role.REASONING, 1)):
            if any(v[1][i] for v in wanted.values()):
                sel[i] = roles == role if mask is None else mask & (roles == role)
        for name, (x, (p, r)) in wanted.items():
            self.checked[name] = (x, sel[0] | sel[1] if p and r else sel[0] if p else sel[1])
        self.largest = torch.stack([largest_at(x, s) for x, s in self.checked.values()])

    def warn(self, largest: list[float]) -> None:
        warn_positive_logprobs(OP, self.checked, dict(zip(self.checked, largest, strict=True)),
                               "at the role positions where it is read")


def packed_rows(res: RoleWeights, r: torch.Tensor) -> torch.Tensor:
    """``float64 [2, 7]``, per role ``(count, mu, sigma, w_min, w_mean, w_max, clamped)`` of packed results (the
    reference's and the Triton path's; the CPU path returns its own)."""
    rows = []
    w = res.weights.to(torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=w.device)
    for k, role in enumerate((Role.PERCEPTION, Role.REASONING)):
        sel = r == role
        cnt = sel.sum()
        w_min = torch.where(sel, w, inf).amin() if w.numel() else inf
        w_max = torch.where(sel, w, -inf).amax() if w.numel() else -inf
        w_mean = torch.where(sel, w, 0.0).sum() / cnt.clamp(min=1)
        rows.append(torch.stack([res.role_stats[k, 0], res.role_stats[k, 1], res.role_stats[k, 2],
                                 torch.where(cnt > 0, w_min, torch.nan), w_mean.to(torch.float64),
                                 torch.where(cnt > 0, w_max, torch.nan), res.clamped[k]]))
    return torch.stack(rows)


def stats_dict(rows: torch.Tensor, checks: LogprobChecks | None = None) -> dict[str, float]:
    """``rows: float64 [2, 7]`` → the logging dict (keys like ``"perception/mu"``); ``checks``' largest log-probs
    come to the host in the same transfer (and may warn)."""
    if checks is not None and checks.largest is not None:
        flat = torch.cat([rows.reshape(-1), checks.largest.to(rows.device)]).tolist()
        checks.warn(flat[rows.numel():])
        values = [flat[:7], flat[7:14]]
    else:
        values = rows.tolist()
    stats = {f"{role}/{k}": v
             for role, vals in zip(("perception", "reasoning"), values, strict=True)
             for k, v in zip(STAT_KEYS, vals, strict=True)}
    for role in ("perception", "reasoning"):
        stats[f"{role}/count"] = int(stats[f"{role}/count"])
        stats[f"{role}/clamped"] = int(stats[f"{role}/clamped"])
        if stats[f"{role}/count"] == 0:
            stats.update({f"{role}/{k}": float("nan") for k in ("mu", "sigma", "w_mean")})
    return stats
