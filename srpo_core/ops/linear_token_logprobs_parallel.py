"""Vocab-parallel ``linear_token_logprobs`` (``process_group`` given): each rank holds a shard ``[V_local, H]`` of the
LM head; these are the collectives that check the shard layout (every rank sees and rejects the same one) and combine
the per-shard ``(lse_r, target_r, H_r)`` into the whole vocabulary's. The passes and the autograd function that call
them are in ``srpo_core/ops/linear_token_logprobs.py``."""

from __future__ import annotations

import torch

from srpo_core.ops.linear_token_logprobs_checks import OP


def _combine_shards(lse_r, tgt_r, ent_r, owned, group):
    """All-reduce per-shard ``(lse_r, target_r, H_r)`` into the whole vocabulary's ``(lse, target, H)``."""
    import torch.distributed as dist

    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_r = torch.exp(lse_r - m_safe)  # this shard's share of Σ exp, relative to the global max
    parts = [w_r, torch.where(owned, tgt_r - m_safe, torch.zeros_like(tgt_r))]
    if ent_r is not None:
        parts.append(torch.where(w_r > 0, w_r * (ent_r + m_safe - lse_r), torch.zeros_like(w_r)))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    s = stacked[0]
    lse = m_safe + torch.log(s)
    tgt = stacked[1] + m_safe
    ent = (stacked[2] / s + torch.log(s)) if ent_r is not None else None  # Σ_r w_r (H_r + lse − lse_r), rescaled
    return lse, tgt, ent


def _shard_layout(group, v_local: int, vocab_start: int, device: torch.device) -> tuple[list[int], list[int]]:
    """All-gather every rank's ``(V_local, vocab_start)``, so that all ranks see (and reject) the same layout."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    got = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(got, torch.tensor([v_local, vocab_start], dtype=torch.int64, device=device), group=group)
    return [int(x[0]) for x in got], [int(x[1]) for x in got]


def _global_vocab(process_group, v_local, vocab_start, device, *, op=OP):
    OP = op  # noqa: N806  (the messages below name the calling op)
    if process_group is None:
        if vocab_start != 0:
            raise ValueError(f"{OP}: `vocab_start` must be 0 without a process_group (the weight is the whole "
                             f"vocabulary), got {vocab_start}")
        return v_local
    import torch.distributed as dist

    sizes, starts = _shard_layout(process_group, v_local, vocab_start, device)
    rank = dist.get_rank(process_group)
    for r, start in enumerate(starts):  # every rank checks every rank, so all raise together (no hang)
        expect = sum(sizes[:r])
        if start != expect:
            who = "this rank" if r == rank else f"rank {r}"
            raise ValueError(f"{OP}: `vocab_start` on {who} must be {expect} (the sum of the lower ranks' "
                             f"shard sizes; shards {sizes}), got {start}")
    return sum(sizes)
