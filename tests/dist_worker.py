"""SPEC property 10, the multi-process half: ``python tests/dist_worker.py PORT [CASES [BACKEND]]``.

Spawns two ranks with ``torch.multiprocessing`` on the gloo backend (``127.0.0.1:PORT``, ``gloo_group.py``). For each of
``CASES`` deterministic random batches, both ranks compute the whole batch in one process (no group), then each rank
computes its own slice of trajectories with ``process_group`` and checks that its weights, advantages, ``z``,
baselines and global role statistics equal the whole-batch ones. Slices may be empty, a role may live on one rank
only, layouts and dtypes vary. Prints ``property10: OK <cases>`` on success; any mismatch raises in the rank, and
``torch.multiprocessing.spawn`` turns it into a non-zero exit with the traceback.

Run by ``tests/test_distributed.py`` as a subprocess: a function defined in a pytest module (imported with
``--import-mode=importlib``) cannot be unpickled by spawned children, a script's ``__main__`` can.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_group import gloo_group

from srpo_core import SRPOConfig, role_aware_advantages

WORLD = 2
CONFIGS = [
    SRPOConfig(),
    SRPOConfig(standardize="none", weight_map="linear", renorm="none"),
    SRPOConfig(weight_map="sigmoid", beta_perception=2.0, beta_reasoning=0.1, u_max=0.5),
    SRPOConfig(perception_contrast="logratio", reasoning_contrast="k3", clamp=3.0, k3_max=2.0, eps=1e-3),
]


def make_case(seed: int) -> dict:
    """A deterministic batch (same on every rank): packed fp64 values plus how to split and lay it out."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi, shape=()):
        return torch.randint(lo, hi, shape, generator=g)

    b = int(randint(0, 9))
    lengths = randint(0, 7, (b,))
    if b and seed % 5 == 0:
        lengths[0] = 0
    n = int(lengths.sum())
    mix = seed % 4  # 0: mixed, 1: perception only, 2: reasoning only, 3: none
    roles = randint(0, 3, (n,)) if mix == 0 else (randint(0, 2, (n,)) * (1 if mix == 1 else 2) if mix < 3
                                                   else torch.zeros(n, dtype=torch.int64))
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 8
    logp[torch.rand(n, generator=g) < 0.05] = -float("inf")
    return {
        "advantages": torch.randn(b, generator=g, dtype=torch.float64),
        "lengths": lengths,
        "roles": roles,
        "logp": logp,
        "logp_corrupt": -torch.rand(n, generator=g, dtype=torch.float64) * 8,
        "logp_ablated": -torch.rand(n, generator=g, dtype=torch.float64) * 8,
        "split": int(randint(0, b + 1)),  # rank 0 gets trajectories [0, split), rank 1 the rest
        "config": CONFIGS[seed % len(CONFIGS)],
        "dtype": torch.float64 if seed % 2 else torch.float32,
        "padded": seed % 3 == 0,
    }


def layout(case: dict, lo: int, hi: int) -> tuple[dict, torch.Tensor]:
    """Keyword arguments for trajectories ``lo:hi`` and the positions of their tokens in the packed batch."""
    lengths = case["lengths"][lo:hi]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(case["lengths"], 0)])
    start, end = int(cu[lo]), int(cu[hi])
    kw = {"advantages": case["advantages"][lo:hi].to(case["dtype"])}
    per_token = {k: case[k][start:end] for k in ("roles", "logp", "logp_corrupt", "logp_ablated")}
    if case["padded"]:
        t = int(lengths.max()) + 1 if lengths.numel() else 1
        mask = torch.arange(t)[None, :] < lengths[:, None]
        kw["mask"] = mask
        for k, v in per_token.items():
            full = torch.full(mask.shape, -100 if k == "roles" else float("nan"), dtype=v.dtype)
            full[mask] = v
            per_token[k] = full
    else:
        kw["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    for k, v in per_token.items():
        kw[k] = v if k == "roles" else v.to(case["dtype"])
    return kw, torch.arange(start, end)


def packed_of(out, kw) -> dict:
    get = (lambda x: x[kw["mask"]]) if "mask" in kw else (lambda x: x)
    return {"advantages": get(out.advantages), "weights": get(out.weights), "signals": get(out.signals)}


def check(rank: int, seed: int, case: dict, backend: str = "auto") -> None:
    if backend == "triton" and case["dtype"] == torch.float64:
        backend = "reference"  # backend="triton" refuses float64 (it used to run the reference for it)
    b = case["advantages"].numel()
    full_kw, _ = layout(case, 0, b)
    full = role_aware_advantages(**full_kw, config=case["config"], backend=backend)
    lo, hi = (0, case["split"]) if rank == 0 else (case["split"], b)
    kw, positions = layout(case, lo, hi)
    local = role_aware_advantages(**kw, config=case["config"], process_group=dist.group.WORLD, backend=backend)
    tol = 1e-12 if case["dtype"] == torch.float64 else 1e-6
    # The Triton kernel folds fp32 partial statistics: another split rounds them differently.
    stats_tol = 1e-6 if backend == "triton" and case["dtype"] != torch.float64 else 1e-12
    if stats_tol > 1e-12:
        tol = 4e-6
    want, got = packed_of(full, full_kw), packed_of(local, kw)
    for name in ("weights", "advantages", "signals"):
        torch.testing.assert_close(got[name], want[name][positions], atol=tol, rtol=tol,
                                   msg=lambda m, n=name: f"seed {seed} rank {rank} `{n}`: {m}")
    torch.testing.assert_close(local.baseline, full.baseline[lo:hi], atol=tol, rtol=tol,
                               msg=lambda m: f"seed {seed} rank {rank} baseline: {m}")
    for key in ("perception/count", "reasoning/count", "perception/mu", "reasoning/mu", "perception/sigma",
                "reasoning/sigma"):
        a, e = local.stats[key], full.stats[key]
        same = (a != a and e != e) or abs(a - e) <= stats_tol * (1 + abs(e))  # NaN (a role with no tokens) on both
        assert same, f"seed {seed} rank {rank} stats[{key}] = {a} vs {e}"


def worker(rank: int, port: int, cases: int, backend: str = "auto") -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, WORLD, port):
        for seed in range(cases):
            check(rank, seed, make_case(seed), backend)


if __name__ == "__main__":
    port = int(sys.argv[1])
    cases = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    backend = sys.argv[3] if len(sys.argv) > 3 else "auto"  # "triton": the kernel, under TRITON_INTERPRET=1 on CPU
    mp.spawn(worker, args=(port, cases, backend), nprocs=WORLD, join=True)
    print(f"property10: OK {cases}")
