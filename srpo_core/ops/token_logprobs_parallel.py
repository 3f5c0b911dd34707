"""Vocab-parallel ``token_logprobs`` (``process_group`` given): ``logits`` is this rank's shard ``[..., V_local]`` of
the vocabulary ``[vocab_start, vocab_start + V_local)``; see ``srpo_core.ops.token_logprobs``'s docstring. Called by
the public ``token_logprobs`` (which imports this module lazily: this one imports it).
"""

from __future__ import annotations

import math

import torch

from srpo_core._validate import describe
from srpo_core.ops.token_logprobs import OP, _check_ids


# ------------------------------------------------------------------------------------------------- vocab-parallel
class _VocabParallel(torch.autograd.Function):
    """Sharded logits ``[..., V_local]`` → full-vocabulary ``(logp, entropy or None)``; see the module docstring."""

    @staticmethod
    def forward(ctx, logits, local_ids, owned, keep, temperature, return_entropy, backend, group):
        # local_ids: the id's column in this shard where owned, V_local (outside the shard) where not, -1 if ignored
        _, ent_r, _, c_r, log_s_r = torch.ops.srpo_core.token_logprobs(
            logits, local_ids, temperature, -1, return_entropy, backend)
        inv_t = 1.0 / temperature
        # global shift: the largest shard log-sum-exp (in logit units), so every a_r = lse_r − max lse ≤ 0 whatever
        # shift c_r each shard used (its max, or its sampled logit on the CPU one-pass path); a shard whose row is
        # all −inf (c_r = 0, log s_r = −inf) takes no part in it
        c = torch.where(log_s_r == -math.inf, torch.full_like(c_r, -math.inf), c_r + log_s_r * temperature)
        if c.numel():
            torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX, group=group)
        c = torch.where(c == -math.inf, torch.zeros_like(c), c)
        a = (c_r - c) * inv_t + log_s_r  # log of this shard's mass relative to e^{c/τ}
        mass = torch.exp(a)
        zero = torch.zeros_like(a)
        x_id = logits.gather(-1, torch.where(owned, local_ids, 0).unsqueeze(-1)).squeeze(-1).to(c.dtype)
        parts = [mass, torch.where(owned, (x_id - c) * inv_t, zero)]  # the owner's sampled logit, shifted
        if return_entropy:  # H = Σ_r w_r (H_r − log w_r), w_r = e^{a_r}/S  ⇒  H = Σ_r e^{a_r} (H_r − a_r) / S + log S
            parts.append(torch.where(mass > 0, mass * (ent_r - a), zero))
        sums = torch.stack(parts)
        if sums.numel():
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
        log_s = torch.log(sums[0])
        logp = torch.where(keep, sums[1] - log_s, zero)
        ent = torch.where(keep, sums[2] / sums[0] + log_s, zero) if return_entropy else None
        c, log_s = torch.where(keep, c, zero), torch.where(keep, log_s, zero)
        ctx.save_for_backward(logits, local_ids, c, log_s, None if ent is None else ent.clone())  # ent: editable
        ctx.args = (temperature, backend)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_ids, c, log_s, ent = ctx.saved_tensors
        temperature, backend = ctx.args
        if ent is None:
            grad_entropy = None
        grad = torch.ops.srpo_core.token_logprobs_backward(grad_logp, grad_entropy, None, logits, local_ids, c, log_s,
                                                           ent, temperature, -1, backend)
        return grad, None, None, None, None, None, None, None


def _check_shards(logits, vocab_start, group) -> int:
    """All-gather every rank's ``(vocab_start, V_local)``; the shards must tile ``[0, V)``. → the global ``V``."""
    dist = torch.distributed
    mine = torch.tensor([vocab_start, logits.shape[-1]], dtype=torch.int64)
    backend = dist.get_backend(group)
    if backend == "nccl":
        mine = mine.to(logits.device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    shards = sorted((int(t[0]), int(t[1]), r) for r, t in enumerate(gathered))
    end = 0
    for start, size, rank in shards:
        if start != end:
            raise ValueError(
                f"{OP}: `vocab_start` must make the ranks' shards tile the vocabulary; the shards (vocab_start, "
                f"V_local) per rank are {[(int(t[0]), int(t[1])) for t in gathered]}: rank {rank}'s starts at "
                f"{start}, expected {end}"
            )
        end = start + size
    return end


def _vocab_parallel(logits, ids, temperature, return_entropy, ignore_index, process_group, vocab_start, chosen,
                    scan_ids, on_meta):
    if on_meta:
        raise ValueError(f"{OP}: vocab-parallel logits (`process_group` given) cannot be meta tensors: the shards are "
                         f"checked with a collective, which needs real tensors; got {describe(logits)}")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError(f"{OP}: `process_group` was given but torch.distributed is not initialized")
    v_local = logits.shape[-1]
    v_global = _check_shards(logits, vocab_start, process_group)
    if scan_ids:
        _check_ids(ids, v_global, ignore_index, what="V_global")
    keep = (ids != ignore_index).reshape(-1)
    local = ids.reshape(-1).long() - vocab_start
    owned = keep & (local >= 0) & (local < v_local)
    local_ids = torch.where(owned, local, torch.full_like(local, v_local))
    local_ids = torch.where(keep, local_ids, torch.full_like(local, -1)).view(ids.shape)
    return _VocabParallel.apply(logits, local_ids, owned.view(ids.shape), keep.view(ids.shape), temperature,
                                return_entropy, chosen, process_group)

