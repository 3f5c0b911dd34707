"""CPU time of ``role_aware_advantages`` (torch path) at 1M tokens: B=256, T=4096, fp32, default config.

Two layouts of the same batch: padded ``[256, 4096]`` + ``mask`` and packed ``[1048576]`` + ``cu_seqlens``; every
token valid, roles ~10 % OTHER, 30 % PERCEPTION, 60 % REASONING.

Usage:
- ``python benchmarks/bench_role_weights.py [--repeats 15] [--threads N] [--json FILE]``: median and 20/80 %
  quantiles per layout, with the machine, versions and shapes (also written to ``--json``).
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
        kw["mask"] = torch.ones(b, t, dtype=torch.bool)
    return kw


def run(kw: dict, config: SRPOConfig = SRPOConfig()):  # noqa: B008 - frozen dataclass
    return role_aware_advantages(**kw, config=config, backend="torch")


def time_layout(layout: str, repeats: int, warmup: int = 2) -> dict:
    kw = make_inputs(layout)
    for _ in range(warmup):
        run(kw)
    wall, cpu = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        run(kw)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    q = statistics.quantiles(wall, n=5)  # 20/40/60/80 %
    return {"layout": layout, "tokens": B * T, "repeats": repeats, "median_s": statistics.median(wall),
            "q20_s": q[0], "q80_s": q[3], "median_cpu_s": statistics.median(cpu)}


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
    results = [time_layout(layout, args.repeats) for layout in ("padded", "packed")]
    print(f"role_aware_advantages, torch backend, {B}x{T} = {B * T} tokens, fp32, default config, "
          f"{env['torch_threads']} torch thread(s) on {env['cpu_count']} CPU(s)")
    for r in results:
        print(f"  {r['layout']:>6}: median {r['median_s'] * 1e3:8.1f} ms  (20/80 %: {r['q20_s'] * 1e3:.1f} / "
              f"{r['q80_s'] * 1e3:.1f} ms; process CPU {r['median_cpu_s'] * 1e3:.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
