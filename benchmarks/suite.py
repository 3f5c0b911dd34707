"""`srpo-core bench`: every public op side by side with the anchors that run on this device.

The cases (``srpo_core.bench.cases``) are timed and their peak extra memory measured (``srpo_core.bench.measure``),
and ``ours / anchor`` ratios are reported against srpo-core's CPU performance targets (the bars). The JSON this writes
(``srpo_core.bench.report.save_json``) feeds ``benchmarks/write_docs.py`` (the generated ``docs/benchmarks.md``).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from srpo_core.bench.cases import OPS, build_cases
from srpo_core.bench.host import _load, environment
from srpo_core.bench.measure import measure

SCHEMA_VERSION = 1


@dataclasses.dataclass
class Bar:
    """``ours / anchor`` of ``metric`` must be ≤ ``max_ratio`` (for times: "≥ k× faster" is ``max_ratio = 1/k``)."""

    op: str
    mode: str
    anchor: str
    metric: str  # "time" or "memory"
    max_ratio: float
    text: str


CPU_BARS = [
    Bar("token_logprobs", "fwd", "trl.selective_log_softmax", "time", 1 / 1.5, "≥ 1.5× faster than TRL"),
    Bar("token_logprobs", "fwd", "naive", "time", 1 / 3, "≥ 3× faster than naive"),
    Bar("token_logprobs", "fwd", "naive", "memory", 1 / 16, "peak extra memory ≤ 1/16 of naive"),
    Bar("token_logprobs", "fwd+bwd", "naive", "time", 1 / 3, "≥ 3× faster than naive"),
    Bar("token_logprobs", "fwd+bwd", "naive", "memory", 1 / 16, "peak extra memory ≤ 1/16 of naive"),
    Bar("role_aware_advantages", "fwd", "reference composition", "time", 1 / 3, "≥ 3× faster than the reference"),
]


def _ratios(results: list[dict]) -> list[dict]:
    """``ours / anchor`` for time and memory, per (op, mode, shape, dtype)."""
    ours = {(r["op"], r["mode"], r["shape"], r["dtype"]): r for r in results
            if r["impl"] == "srpo-core" and r["status"] == "ok"}
    out = []
    for r in results:
        key = (r["op"], r["mode"], r["shape"], r["dtype"])
        if r["impl"] == "srpo-core" or r["status"] != "ok" or key not in ours:
            continue
        o = ours[key]
        out.append({"op": r["op"], "mode": r["mode"], "shape": r["shape"], "dtype": r["dtype"], "anchor": r["impl"],
                    "time_ratio": o["median_s"] / r["median_s"],
                    "memory_ratio": (o["peak_bytes"] / r["peak_bytes"]) if r["peak_bytes"] else None})
    return out


def _bars(ratios: list[dict], device: str, preset: str) -> list[dict]:
    """The CPU bars, evaluated on every run; they *apply* only at the sizes they are stated at (``full``): elsewhere
    a row informs and holds nothing (``applies`` false)."""
    if device != "cpu":
        return []
    out = []
    for bar in CPU_BARS:
        for r in ratios:
            if (r["op"], r["mode"], r["anchor"]) != (bar.op, bar.mode, bar.anchor):
                continue
            value = r["time_ratio"] if bar.metric == "time" else r["memory_ratio"]
            out.append({"op": bar.op, "mode": bar.mode, "anchor": bar.anchor, "metric": bar.metric,
                        "shape": r["shape"], "dtype": r["dtype"], "bar": bar.text, "max_ratio": bar.max_ratio,
                        "ratio": value, "held": value is not None and value <= bar.max_ratio,
                        "applies": preset == "full"})
    return out


def run(preset: str = "quick", device: str | None = None, ops: list[str] | None = None,
        progress: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"bench: unknown op {', '.join(map(repr, unknown))}; the ops are {', '.join(OPS)}")
    env = environment(device)  # load average before the run
    start = time.perf_counter()
    cases = [c for c in build_cases(preset, device) if not ops or c.op in ops]
    min_time = {"full": 2.0, "quick": 0.3, "tiny": 0.0}[preset]
    results = []
    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("benchmarking", total=len(cases))
            for c in cases:
                bar.update(task, description=f"{c.op} {c.mode} {c.impl} {c.dtype}")
                results.append(measure(c, device, min_time=min_time))
                bar.advance(task)
    else:
        results = [measure(c, device, min_time=min_time) for c in cases]
    ratios = _ratios(results)
    env["load_average_after"] = _load()
    env["wall_s"] = round(time.perf_counter() - start, 1)
    return {"schema": SCHEMA_VERSION, "preset": preset, "environment": env, "results": results,
            "ratios": ratios, "bars": _bars(ratios, device, preset)}


def check_arguments(device: str | None, json_path: str | None, plot_path: str | None) -> None:
    """What ``srpo-core bench`` checks before a run of minutes: the device exists, ``--json`` / ``--plot`` can be
    written, matplotlib imports for ``--plot``. Raises ``ValueError`` with the option named."""
    import importlib.util
    import os
    import pathlib

    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None and torch.version.hip is None
               else "no GPU is visible")
        raise ValueError(f"--device cuda: {why} (torch {torch.__version__}); use --device cpu or leave it out")
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is None:
            continue
        target = pathlib.Path(path)
        parent = target.parent if str(target.parent) else pathlib.Path(".")
        if target.is_dir():
            raise ValueError(f"{option} {path}: is a directory; give a file name")
        if not parent.is_dir():
            raise ValueError(f"{option} {path}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise ValueError(f"{option} {path}: cannot be written (no write permission)")
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib, which is not installed (pip install matplotlib, or the `bench` "
                         "extra of srpo-core)")
