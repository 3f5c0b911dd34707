"""Vocab-parallel ``token_logprobs``: ``python tests/token_logprobs_dist_worker.py PORT WORLD BACKENDS``.

Spawns ``WORLD`` ranks on gloo; each holds an uneven vocabulary shard of the same logits, and its logp, entropy and
local gradient must equal the unsharded forward and gradient, for every backend in the comma list ``BACKENDS``. Also
checks the two sharding errors (overlapping shards, an id outside the global vocabulary). Prints
``vocab-parallel: OK world=<WORLD> checked=<n>``. Run by ``tests/test_token_logprobs.py`` (a script, so the spawned
children can unpickle the entry point).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_group import gloo_group

from srpo_core.ops.token_logprobs import token_logprobs
from srpo_core.testing import assert_close

CASES = [(37, torch.float32, 0.7, True), (41, torch.float64, 1.0, True), (29, torch.bfloat16, 1.3, False),
         (5, torch.float32, 1.0, True)]  # (V, dtype, temperature, entropy)


def check_cases(rank: int, world: int, backends: list[str]) -> int:
    checked = 0
    for seed, (V, dtype, temperature, entropy) in enumerate(CASES):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(2, 4, V, generator=g, dtype=torch.float64) * 3)
        x[0, 1, ::4] = -math.inf
        x[1, 0] = torch.randn(V, generator=g, dtype=torch.float64) * 1e4
        x = x.to(dtype)
        ids = torch.randint(0, V, (2, 4), generator=g)
        ids[1, 3] = -100
        ids[0, 0] = V - 1
        g1 = torch.randn(2, 4, generator=g)
        g2 = torch.randn(2, 4, generator=g)
        # uneven shards: rank r gets sizes[r] columns (the first rank the most), never divisible evenly
        sizes = [V // world + (1 if r < V % world else 0) for r in range(world)]
        if sizes[-1] > 1:
            sizes[0], sizes[-1] = sizes[0] + 1, sizes[-1] - 1
        start = sum(sizes[:rank])
        for backend in backends:
            if backend == "triton" and dtype == torch.float64:
                continue  # the kernels take fp32/bf16/fp16
            xf = x.clone().requires_grad_(True)
            full = token_logprobs(xf, ids, temperature=temperature, return_entropy=entropy, backend=backend)
            full = full if entropy else (full,)
            loss = (full[0] * g1.to(full[0].dtype)).sum() + ((full[1] * g2.to(full[1].dtype)).sum() if entropy else 0)
            (grad_full,) = torch.autograd.grad(loss, xf)
            xs = x[..., start:start + sizes[rank]].clone().requires_grad_(True)
            part = token_logprobs(xs, ids, temperature=temperature, return_entropy=entropy, backend=backend,
                                  process_group=dist.group.WORLD, vocab_start=start)
            part = part if entropy else (part,)
            loss = (part[0] * g1.to(part[0].dtype)).sum() + ((part[1] * g2.to(part[1].dtype)).sum() if entropy else 0)
            (grad_part,) = torch.autograd.grad(loss, xs)
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            for a, b, name in zip(part, full, ("logp", "entropy"), strict=False):  # entropy only when asked
                assert_close(a, b, atol=tol, rtol=tol, name=f"rank {rank} V={V} {dtype} {backend} {name}")
            want = grad_full[..., start:start + sizes[rank]]
            eps = 0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
            assert_close(grad_part, want, atol=tol + (tol + 2 * eps) * want.abs().double(),
                         name=f"rank {rank} V={V} {dtype} {backend} grad")
            checked += 1
    return checked


def check_errors(rank: int, world: int) -> None:
    # bad input: overlapping shards, and an id outside the global vocabulary, raise on every rank
    xs = torch.randn(3, 4)
    try:
        token_logprobs(xs, torch.tensor([0, 1, 2]), process_group=dist.group.WORLD, vocab_start=0)
        raise AssertionError("overlapping shards were accepted")
    except ValueError as e:
        assert "`vocab_start`" in str(e), e
    try:
        token_logprobs(xs, torch.tensor([0, 4 * world, 2]), process_group=dist.group.WORLD, vocab_start=4 * rank)
        raise AssertionError("an id outside the global vocabulary was accepted")
    except ValueError as e:
        assert "`ids` must lie in [0, V_global)" in str(e), e


def run(rank: int, world: int, port: int, backends: list[str]) -> None:
    with gloo_group(rank, world, port):
        checked = check_cases(rank, world, backends)
        check_errors(rank, world)
    if rank == 0:
        print(f"vocab-parallel: OK world={world} checked={checked}", flush=True)


if __name__ == "__main__":
    port, world, backends = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    mp.spawn(run, args=(world, port, backends), nprocs=world, join=True)
