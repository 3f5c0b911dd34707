"""Issue 12's CPU forward check: ``linear_token_logprobs`` (torch backend) against naive
``log_softmax(h @ Wᵀ).gather`` at one shape, the methods interleaved round by round (the host may be shared), medians.

    OMP_NUM_THREADS=2 python benchmarks/linear_cpu_forward.py [--n 1024 --h 1024 --v 32000 --rounds 7]
        [--tiles 1024x2097152,4096x4194304]   # also time these forward tiles (vocab x elements) of the torch path
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from srpo_core.ops.linear_token_logprobs import linear_token_logprobs
from srpo_core.tuning import TUNING


def naive(hidden, weight, ids):
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, ids[:, None])[:, 0]


def ours(hidden, weight, ids):
    return linear_token_logprobs(hidden, weight, ids, backend="torch")


def with_tiles(vocab_tile, tile_elements):
    def run(hidden, weight, ids):
        t = TUNING
        old = t.linear_vocab_tile, t.linear_tile_elements, t.linear_forward_tile_scale
        t.linear_vocab_tile, t.linear_tile_elements, t.linear_forward_tile_scale = vocab_tile, tile_elements, 1
        try:  # the forward's own tile
            return ours(hidden, weight, ids)
        finally:
            t.linear_vocab_tile, t.linear_tile_elements, t.linear_forward_tile_scale = old

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tiles", default="", help="comma-separated VTxTE variants (TUNING.linear_vocab_tile x "
                    "linear_tile_elements) to time as well")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=g)
    weight = torch.randn(args.v, args.h, generator=g) / args.h ** 0.5
    ids = torch.randint(0, args.v, (args.n,), generator=g)
    methods = {"naive": naive, "ours": ours}
    for spec in filter(None, args.tiles.split(",")):
        vt, te = (int(x) for x in spec.split("x"))
        methods[f"ours[{vt}x{te}]"] = with_tiles(vt, te)
    with torch.no_grad():
        err = (ours(hidden, weight, ids).double() - naive(hidden.double(), weight.double(), ids)).abs().max()
        times = {k: [] for k in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn(hidden, weight, ids)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"N={args.n} H={args.h} V={args.v} fp32, threads={torch.get_num_threads()}, "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.rounds} interleaved rounds; max |ours − fp64| = {err:.2e}")
    for k, v in med.items():
        print(f"  {k:22s} median {v * 1e3:8.1f} ms  (min {min(times[k]) * 1e3:.1f}, max {max(times[k]) * 1e3:.1f})"
              f"  / naive = {v / med['naive']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
