"""``python tests/trl_split_worker.py PORT [CASES]``: ``_trl_split.counterfactual_across_processes`` on 2 gloo ranks.

For each deterministic random batch (uneven split, rows without a span, tag tokens around spans, identical spans,
groups of 1-4, both donor sources), both ranks ablate the whole batch in one process (``counterfactual_donors`` +
``ablate_span``), then each rank ablates its own rows with the exchange, and checks that each of its rows is the
whole-batch row (tokens, attention, index map, a per-position tensor ablated alongside) up to right padding.
Prints ``split: OK <cases>``; a mismatch raises in the rank and ``mp.spawn`` exits non-zero.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_group import gloo_group

from srpo_core.ablation import ablate_span, counterfactual_donors
from srpo_core.adapters._trl_split import counterfactual_across_processes

WORLD, PAD = 2, 0


def make_case(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi, shape=()):
        return torch.randint(lo, hi, shape, generator=g)

    b, width = int(randint(1, 9)), int(randint(6, 13))
    lengths = randint(3, width + 1, (b,))
    ids = randint(3, 9, (b, width))  # few token values: identical spans happen
    pos = torch.arange(width)[None, :]
    attn = (pos < lengths[:, None]).long()
    ids = ids.masked_fill(attn == 0, PAD)
    start = randint(1, 3, (b,))
    length = randint(0, 4, (b,)) * (torch.rand(b, generator=g) < 0.8)  # some rows without a span
    span = (pos >= start[:, None]) & (pos < (start + length)[:, None]) & attn.bool()
    tags = None
    if seed % 2:  # a tag token on each side of the span, when it fits
        before = (pos == (start - 1)[:, None]) & (length[:, None] > 0)
        after = (pos == (start + length)[:, None]) & (length[:, None] > 0)
        tags = (before | after) & attn.bool() & ~span
    run = span if tags is None else span | tags
    mm = randint(1, 4, (b, width)).masked_fill(run | (attn == 0), 0)  # e.g. mm_token_type_ids: 0 on text
    return {"ids": ids, "attn": attn, "span": span, "tags": tags, "mm": mm,
            "groups": torch.arange(b) // int(randint(1, 5)), "source": ("group", "other")[seed % 4 // 2],
            "split": int(randint(0, b + 1))}


def check(rank: int, seed: int, case: dict) -> int:
    """Checks one case; returns how many of this rank's rows took a donor from the other rank."""
    ids, attn, span, tags, mm = case["ids"], case["attn"], case["span"], case["tags"], case["mm"]
    donor = counterfactual_donors(case["groups"], case["source"], input_ids=ids, span_mask=span)
    whole = ablate_span(ids, attn, span, mode="counterfactual", pad_token_id=PAD, tags_mask=tags, donor=donor)
    whole_mm = whole.ablate(mm)
    lo, hi = (0, case["split"]) if rank == 0 else (case["split"], ids.shape[0])
    local, extra = counterfactual_across_processes(
        ids[lo:hi], attn[lo:hi], span[lo:hi], case["groups"][lo:hi], case["source"], pad_token_id=PAD,
        tags_mask=None if tags is None else tags[lo:hi], per_position={"mm": mm[lo:hi]},
        process_group=dist.group.WORLD)
    assert local.input_ids.shape[0] == hi - lo and local.index.shape == (hi - lo, ids.shape[1])
    assert extra["mm"].shape == local.input_ids.shape
    for b in range(hi - lo):
        n = int((local.source[b, :, 1] >= 0).sum())
        where = f"seed {seed} rank {rank} row {lo + b}"
        assert n == int((whole.source[lo + b, :, 1] >= 0).sum()), where
        assert torch.equal(local.input_ids[b, :n], whole.input_ids[lo + b, :n]), where
        assert torch.equal(local.attention_mask[b, :n], whole.attention_mask[lo + b, :n]), where
        assert torch.equal(extra["mm"][b, :n], whole_mm[lo + b, :n]), where
        assert bool((local.attention_mask[b, n:] == 0).all()), where
        assert torch.equal(local.index[b], whole.index[lo + b]), where
    values = torch.randn(local.input_ids.shape)
    assert local.gather(values).shape == (hi - lo, ids.shape[1])
    mine = donor[lo:hi]
    return int(((mine >= 0) & ((mine < lo) | (mine >= hi))).sum())


def worker(rank: int, port: int, cases: int) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, WORLD, port):
        lent = sum(check(rank, seed, make_case(seed)) for seed in range(cases))
    print(f"rank {rank}: {lent} rows with a donor on the other rank", flush=True)


if __name__ == "__main__":
    port = int(sys.argv[1])
    cases = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    mp.spawn(worker, args=(port, cases), nprocs=WORLD, join=True)
    print(f"split: OK {cases}")
