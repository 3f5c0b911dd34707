"""CPU time of ``role_aware_advantages`` at 1M tokens: B=256, T=4096, fp32, default config.

Two layouts of the same batch: padded ``[256, 4096]`` + ``mask`` and packed ``[1048576]`` + ``cu_seqlens``; every
token valid, roles ~10 % OTHER, 30 % PERCEPTION, 60 % REASONING; plus ``holes``: the padded batch with a random 95 %
mask (valid tokens scattered, so the fast path gathers them into its grid).

Three implementations, timed interleaved (one call of each per round, so that a noisy neighbour hits all alike):
``auto`` (the public op's default: the fast path, compiled on CPU), ``reference`` (the public op's reference path)
and ``reference composition`` (pack, contrast, the reference ``role_weights``, unpack; no validation: the anchor of
issue 7's "≥ 3× faster" bar).

Usage:
- ``python benchmarks/bench_role_weights.py [--repeats 15] [--threads N] [--json FILE]``: median and 20/80 %
  quantiles per layout and implementation, the ratio to the reference composition, with the machine, load,
  versions and shapes (also written to ``--json``).
- ``pytest benchmarks/bench_role_weights.py --benchmark-enable``: the same two cases under pytest-benchmark (the
  project's ``addopts`` disable benchmarks by default, so plain ``pytest`` runs each once as a smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from srpo_core import SRPOConfig, role_aware_advantages
from srpo_core.layout import cu_seqlens_from_mask
from srpo_core.reference.contrast import contrast
from srpo_core.reference.role_aware_advantages import role_weights

B, T = 256, 4096


def make_inputs(layout: str, b: int = B, t: int = T, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = b * t
    u = torch.rand(n, generator=g)
    roles = torch.where(u < 0.1, 0, torch.where(u < 0.4, 1, 2)).to(torch.int64)
    kw = {
        "advantages": torch.randn(b, generator=g),
        "logp": -torch.rand(n, generator=g) * 5,
        "logp_corrupt": -torch.rand(n, generator=g) * 5,
        "logp_ablated": -torch.rand(n, generator=g) * 5,
        "roles": roles,
    }
    if layout == "packed":
        kw["cu_seqlens"] = torch.arange(0, n + 1, t, dtype=torch.int64)
    else:
        kw = {k: (v.view(b, t) if k != "advantages" else v) for k, v in kw.items()}
        kw["mask"] = torch.ones(b, t, dtype=torch.bool) if layout == "padded" else torch.rand(b, t, generator=g) < 0.95
    return kw


def run(kw: dict, config: SRPOConfig = SRPOConfig(), backend: str = "auto"):  # noqa: B008 - frozen dataclass
    return role_aware_advantages(**kw, config=config, backend=backend)


def reference_composition(kw: dict, config: SRPOConfig = SRPOConfig()):  # noqa: B008 - frozen dataclass
    """Pack, contrast, SPEC steps 2-6 (the reference), unpack: what benchmarks/cases.py times as the anchor."""
    mask = kw.get("mask")
    get = (lambda x: x[mask]) if mask is not None else (lambda x: x)
    r, lp = get(kw["roles"]), get(kw["logp"])
    s = torch.where(r == 1, contrast(lp, get(kw["logp_corrupt"]), config.perception_contrast),
                    contrast(lp, get(kw["logp_ablated"]), config.reasoning_contrast))
    cu = cu_seqlens_from_mask(mask) if mask is not None else kw["cu_seqlens"]
    adv = role_weights(kw["advantages"], s, r, cu, config).advantages
    if mask is None:
        return adv
    out = torch.zeros(mask.shape, dtype=adv.dtype)
    out[mask] = adv
    return out


IMPLS = {"auto": lambda kw: run(kw), "reference": lambda kw: run(kw, backend="reference"),
         "reference composition": reference_composition}


def time_layout(layout: str, repeats: int, warmup: int = 2) -> list[dict]:
    kw = make_inputs(layout)
    for _ in range(warmup):
        for fn in IMPLS.values():
            fn(kw)
    wall = {name: [] for name in IMPLS}
    cpu = {name: [] for name in IMPLS}
    for _ in range(repeats):
        for name, fn in IMPLS.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn(kw)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    anchor = statistics.median(wall["reference composition"])
    rows = []
    for name in IMPLS:
        q = statistics.quantiles(wall[name], n=5)  # 20/40/60/80 %
        med = statistics.median(wall[name])
        rows.append({"layout": layout, "impl": name, "tokens": int(kw["logp"].numel()), "repeats": repeats,
                     "median_s": med, "q20_s": q[0], "q80_s": q[3], "median_cpu_s": statistics.median(cpu[name]),
                     "speedup_vs_reference_composition": anchor / med})
    return rows


# -- pytest-benchmark ---------------------------------------------------------------------------------------------
def test_role_aware_advantages_1m_padded(benchmark):
    kw = make_inputs("padded")
    out = benchmark(run, kw)
    assert out.weights.shape == (B, T)


def test_role_aware_advantages_1m_packed(benchmark):
    kw = make_inputs("packed")
    out = benchmark(run, kw)
    assert out.weights.shape == (B * T,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "shape": {"B": B, "T": T, "dtype": "float32", "config": "SRPOConfig()"},
    }
    env["load_before"] = os.getloadavg()
    results = [row for layout in ("padded", "packed", "holes") for row in time_layout(layout, args.repeats)]
    env["load_after"] = os.getloadavg()
    print(f"role_aware_advantages, {B}x{T} = {B * T} tokens, fp32, default config, "
          f"{env['torch_threads']} torch thread(s) on {env['cpu_count']} CPU(s); load average "
          f"{env['load_before'][0]:.2f} -> {env['load_after'][0]:.2f}")
    for r in results:
        print(f"  {r['layout']:>6} {r['impl']:>22}: median {r['median_s'] * 1e3:8.1f} ms  (20/80 %: "
              f"{r['q20_s'] * 1e3:.1f} / {r['q80_s'] * 1e3:.1f} ms; process CPU {r['median_cpu_s'] * 1e3:.1f} ms)"
              f"  {r['speedup_vs_reference_composition']:5.2f}x vs reference composition")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
