"""Vocab-parallel ``linear_token_contrast``: ``python tests/linear_contrast_dist_worker.py PORT WORLD``.

Spawns ``WORLD`` ranks on gloo. Every rank builds the same deterministic inputs, takes its (uneven) shard of the
vocabulary, and checks the sharded ``(div, logp, logp_ref)`` (kl and js, with and without bias, an empty batch, every
row ignored) against the unsharded torch-path result computed in the same process. Prints
``linear-contrast-dist: OK <WORLD>``; a failure raises in the rank and makes the spawn exit non-zero. Run by
``tests/test_linear_token_contrast.py``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_group import gloo_group

from srpo_core.ops.linear_token_contrast import linear_token_contrast

CASES = [  # (N, H, V, dtype, temperature, bias, ignored)
    (13, 8, 23, torch.float64, 1.0, True, 0.3),
    (7, 5, 11, torch.float32, 0.7, False, 0.3),
    (1, 4, 5, torch.float64, 1.3, True, 0.0),
    (0, 3, 7, torch.float32, 1.0, False, 0.0),
    (4, 3, 7, torch.float32, 1.0, True, 1.0),
]


def shards(v: int, world: int) -> list[int]:
    base, extra = divmod(v, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def check_cases(rank: int, world: int) -> None:
    for i, (n, h_dim, v, dtype, tau, with_bias, ignored) in enumerate(CASES):
        g = torch.Generator().manual_seed(200 + i)
        hidden = torch.randn(n, h_dim, generator=g, dtype=torch.float64).to(dtype)
        hidden_ref = (hidden.double() + 0.5 * torch.randn(n, h_dim, generator=g, dtype=torch.float64)).to(dtype)
        weight = (torch.randn(v, h_dim, generator=g, dtype=torch.float64) * 1.5).to(dtype)
        bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
        ids = torch.randint(0, v, (n,), generator=g)
        ids[torch.rand(n, generator=g) < ignored] = -100
        sizes = shards(v, world)
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        for kind in ("kl", "js"):
            full = linear_token_contrast(hidden, hidden_ref, weight, ids, kind=kind, bias=bias, temperature=tau,
                                         backend="torch")
            sh = linear_token_contrast(hidden, hidden_ref, weight[lo:hi], ids, kind=kind,
                                       bias=bias[lo:hi] if with_bias else None, temperature=tau, backend="torch",
                                       process_group=dist.group.WORLD, vocab_start=lo)
            tol = 1e-10 if dtype == torch.float64 else 2e-5
            for name, got, want in zip(("div", "logp", "logp_ref"), sh, full, strict=True):
                if got.shape != want.shape:
                    raise AssertionError(f"rank {rank} case {i} {kind}: {name} shape {got.shape} != {want.shape}")
                err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
                if not err <= tol * (1 + (want.double().abs().max().item() if want.numel() else 1)):
                    raise AssertionError(f"rank {rank} case {i} {kind}: {name} differs from unsharded by {err:.3e}")


def run(rank: int, world: int, port: int) -> None:
    with gloo_group(rank, world, port):
        check_cases(rank, world)


def main() -> None:
    port, world = int(sys.argv[1]), int(sys.argv[2])
    mp.spawn(run, args=(world, port), nprocs=world, join=True)
    print(f"linear-contrast-dist: OK {world}")


if __name__ == "__main__":
    main()
