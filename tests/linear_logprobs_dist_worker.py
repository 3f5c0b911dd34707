"""Vocab-parallel ``linear_token_logprobs``: ``python tests/linear_logprobs_dist_worker.py PORT WORLD``.

Spawns ``WORLD`` ranks on gloo. Every rank builds the same deterministic inputs, takes its shard of the vocabulary
(uneven sizes: ``V`` is not a multiple of ``WORLD``), and checks the sharded result — logp, entropy, and the gradients
of hidden (all-reduced), of its weight shard and of its bias shard — against the unsharded torch-path result computed
in the same process. It also checks the two sharding errors (a wrong ``vocab_start``, an id outside the global
vocabulary). Prints ``linear-dist: OK <WORLD>``; a failure raises in the rank and makes the spawn exit non-zero.
Run by ``tests/test_linear_token_logprobs.py`` (a script, so the spawned children can unpickle the entry point).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_group import gloo_group

from srpo_core.ops.linear_token_logprobs import linear_token_logprobs

CASES = [  # (N, H, V, dtype, temperature, bias, entropy)
    (13, 8, 23, torch.float64, 1.0, True, True),
    (7, 5, 11, torch.float32, 0.7, False, True),
    (1, 4, 5, torch.float64, 1.3, True, False),
    (0, 3, 7, torch.float32, 1.0, False, True),
]


def shards(v: int, world: int) -> list[int]:
    base, extra = divmod(v, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def check_cases(rank: int, world: int) -> None:
    for i, (n, h_dim, v, dtype, tau, with_bias, ent) in enumerate(CASES):
        g = torch.Generator().manual_seed(100 + i)
        hidden = torch.randn(n, h_dim, generator=g, dtype=torch.float64).to(dtype)
        weight = (torch.randn(v, h_dim, generator=g, dtype=torch.float64) * 1.5).to(dtype)
        bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
        ids = torch.randint(0, v, (n,), generator=g)
        if n > 2:
            ids[1] = -100
        g_lp = torch.randn(n, generator=g, dtype=torch.float64)
        g_h = torch.randn(n, generator=g, dtype=torch.float64)
        sizes = shards(v, world)
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]

        def loss_of(out, ent=ent, g_lp=g_lp, g_h=g_h):
            lp, e = out if ent else (out, None)
            loss = (lp.double() * g_lp).sum()
            return loss + ((e.double() * g_h).sum() if ent else 0), lp, e

        hf = hidden.clone().requires_grad_()
        wf = weight.clone().requires_grad_()
        bf = bias.clone().requires_grad_() if with_bias else None
        loss, lp_full, e_full = loss_of(linear_token_logprobs(hf, wf, ids, bias=bf, temperature=tau,
                                                              return_entropy=ent, backend="torch"))
        loss.backward()

        hs = hidden.clone().requires_grad_()
        ws = weight[lo:hi].clone().requires_grad_()
        bs = bias[lo:hi].clone().requires_grad_() if with_bias else None
        loss, lp_sh, e_sh = loss_of(linear_token_logprobs(hs, ws, ids, bias=bs, temperature=tau,
                                                          return_entropy=ent, process_group=dist.group.WORLD,
                                                          vocab_start=lo, backend="torch"))
        loss.backward()
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        checks = [("logp", lp_sh, lp_full), ("grad_hidden", hs.grad, hf.grad),
                  ("grad_weight", ws.grad, wf.grad[lo:hi])]
        if ent:
            checks.append(("entropy", e_sh, e_full))
        if with_bias:
            checks.append(("grad_bias", bs.grad, bf.grad[lo:hi]))
        for name, got, want in checks:
            err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
            if not err <= tol * (1 + want.double().abs().max().item() if want.numel() else 1):
                raise AssertionError(f"rank {rank} case {i}: {name} differs from unsharded by {err:.3e}")


def check_errors(rank: int, world: int) -> None:
    # errors: a vocab_start that does not match the shard layout, an id outside the global vocabulary
    hidden = torch.randn(3, 4, dtype=torch.float64)
    weight = torch.randn(2 + rank, 4, dtype=torch.float64)
    lo = sum(2 + r for r in range(rank))
    v_global = sum(2 + r for r in range(world))
    try:
        linear_token_logprobs(hidden, weight, torch.zeros(3, dtype=torch.long), process_group=dist.group.WORLD,
                              vocab_start=lo + (1 if rank == world - 1 else 0))  # only the last rank is wrong
    except ValueError as e:
        if "vocab_start" not in str(e):
            raise
    else:
        raise AssertionError("a wrong vocab_start (on the last rank) was accepted")
    try:
        linear_token_logprobs(hidden, weight, torch.tensor([0, v_global, 1]), process_group=dist.group.WORLD,
                              vocab_start=lo)
    except ValueError as e:
        if "global vocabulary" not in str(e):
            raise
    else:
        raise AssertionError("an id outside the global vocabulary was accepted")


def run(rank: int, world: int, port: int) -> None:
    with gloo_group(rank, world, port):
        check_cases(rank, world)
        check_errors(rank, world)


def main() -> None:
    port, world = int(sys.argv[1]), int(sys.argv[2])
    mp.spawn(run, args=(world, port), nprocs=world, join=True)
    print(f"linear-dist: OK {world}")


if __name__ == "__main__":
    main()
