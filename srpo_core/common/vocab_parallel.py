"""Vocab-parallel collectives of the log-prob ops (``process_group`` given): each rank holds a shard of the
vocabulary (``logits [..., V_local]`` or an LM-head shard ``[V_local, H]`` starting at ``vocab_start``). These check
the shard layout (every rank sees, and rejects, the same layout, so no rank hangs in a later collective) and combine
the per-shard row statistics into the whole vocabulary's with one max and one sum all-reduce. Backend-independent:
the statistics come from whichever path the op chose.
"""

from __future__ import annotations

import math

import torch


def _dist():
    import torch.distributed as dist

    return dist


# ------------------------------------------------------------------------------------------------------ the layout
def tiling_vocab(op: str, logits: torch.Tensor, vocab_start: int, group) -> int:
    """``token_logprobs``: all-gather every rank's ``(vocab_start, V_local)``; the shards, in any rank order, must
    tile ``[0, V)``. → the global ``V``."""
    dist = _dist()
    mine = torch.tensor([vocab_start, logits.shape[-1]], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.to(logits.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    end = 0
    for start, size, rank in sorted((int(t[0]), int(t[1]), r) for r, t in enumerate(gathered)):
        if start != end:
            raise ValueError(
                f"{op}: `vocab_start` must make the ranks' shards tile the vocabulary; the shards (vocab_start, "
                f"V_local) per rank are {[(int(t[0]), int(t[1])) for t in gathered]}: rank {rank}'s starts at "
                f"{start}, expected {end}"
            )
        end = start + size
    return end


def rank_ordered_vocab(op: str, group, v_local: int, vocab_start: int, device: torch.device) -> int:
    """The LM-head ops: without a group ``vocab_start`` must be 0 and ``V = v_local``; with one, every rank's shard
    must start at the sum of the lower ranks' shard sizes (checked by every rank on the all-gathered layout). → the
    global ``V``."""
    if group is None:
        if vocab_start != 0:
            raise ValueError(f"{op}: `vocab_start` must be 0 without a process_group (the weight is the whole "
                             f"vocabulary), got {vocab_start}")
        return v_local
    dist = _dist()
    world = dist.get_world_size(group)
    got = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(got, torch.tensor([v_local, vocab_start], dtype=torch.int64, device=device), group=group)
    sizes, starts = [int(x[0]) for x in got], [int(x[1]) for x in got]
    rank = dist.get_rank(group)
    for r, start in enumerate(starts):  # every rank checks every rank, so all raise together (no hang)
        expect = sum(sizes[:r])
        if start != expect:
            who = "this rank" if r == rank else f"rank {r}"
            raise ValueError(f"{op}: `vocab_start` on {who} must be {expect} (the sum of the lower ranks' "
                             f"shard sizes; shards {sizes}), got {start}")
    return sum(sizes)


# ----------------------------------------------------------------------------------------------------- combining
def reducers(group):
    """``(allmax, allsum)``: functions that all-reduce a copy of a tensor over ``group``."""
    dist = _dist()

    def reduce(op):
        def run(x):
            x = x.clone()
            dist.all_reduce(x, op=op, group=group)
            return x

        return run

    return reduce(dist.ReduceOp.MAX), reduce(dist.ReduceOp.SUM)


def all_sum_(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over ``group`` in place (``grad_hidden`` of the LM-head ops, a shard's ``js`` terms)."""
    _dist().all_reduce(x, group=group)
    return x


def combine_shards(lse_r, tgt_r, ent_r, owned, group):
    """All-reduce per-shard ``(lse_r, target_r, H_r)`` (natural units) into the whole vocabulary's
    ``(lse, target, H)``; ``target`` counts only where ``owned`` (the id falls in this shard), ``ent_r`` may be
    None."""
    dist = _dist()
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


def combine_shifted(c_r, log_s_r, ent_r, x_id, owned, keep, temperature: float, group):
    """``token_logprobs``' shards: each rank's rows as ``(c_r, log s_r)`` with ``lse_r = c_r/τ + log s_r`` (any shift
    ``c_r``), ``H_r`` (or None) and the sampled logit ``x_id`` where ``owned`` → the whole vocabulary's
    ``(logp, H or None, c, log s)``, 0 where not ``keep``. The global shift ``c`` is the largest shard log-sum-exp
    (in logit units), so every ``a_r = lse_r − max lse ≤ 0``; a shard whose row is all −inf takes no part in it."""
    dist = _dist()
    inv_t = 1.0 / temperature
    c = torch.where(log_s_r == -math.inf, torch.full_like(c_r, -math.inf), c_r + log_s_r * temperature)
    if c.numel():
        dist.all_reduce(c, op=dist.ReduceOp.MAX, group=group)
    c = torch.where(c == -math.inf, torch.zeros_like(c), c)
    a = (c_r - c) * inv_t + log_s_r  # log of this shard's mass relative to e^{c/τ}
    mass = torch.exp(a)
    zero = torch.zeros_like(a)
    parts = [mass, torch.where(owned, (x_id - c) * inv_t, zero)]  # the owner's sampled logit, shifted
    if ent_r is not None:  # H = Σ_r w_r (H_r − log w_r), w_r = e^{a_r}/S  ⇒  H = Σ_r e^{a_r} (H_r − a_r) / S + log S
        parts.append(torch.where(mass > 0, mass * (ent_r - a), zero))
    sums = torch.stack(parts)
    if sums.numel():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    log_s = torch.log(sums[0])
    logp = torch.where(keep, sums[1] - log_s, zero)
    ent = torch.where(keep, sums[2] / sums[0] + log_s, zero) if ent_r is not None else None
    return logp, ent, torch.where(keep, c, zero), torch.where(keep, log_s, zero)


__all__ = ["all_sum_", "combine_shards", "combine_shifted", "rank_ordered_vocab", "reducers", "tiling_vocab"]
