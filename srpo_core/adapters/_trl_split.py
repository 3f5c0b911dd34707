"""What keeps an SRPO step of :class:`srpo_core.adapters.trl.SRPOGRPOTrainer` independent of how TRL splits the
batch over processes (``accelerate launch`` with several processes; ``docs/decisions.md`` D220-D221).

TRL gives each process a contiguous slice of the generation batch, a prompt's completions consecutive, so a prompt's
group can straddle two processes. Three things then must not depend on the split, for the token weights of N
processes to equal those of one process holding the whole batch:

- the role statistics: :func:`srpo_core.role_aware_advantages` all-reduces them over ``process_group`` (trl.py);
- the corrupted images: one mask per (prompt, image) drawn from a generator seeded by the step and that key alone
  (:func:`corrupt_per_key`), not from a stream shared by whatever images a process happens to hold;
- the counterfactual donors: chosen over the whole batch's perception spans, exchanged between the processes, and a
  donor held by another process lent as an extra row (:func:`counterfactual_across_processes`).

And every process runs a pass when any process needs it (:func:`on_any_process`), so the collectives above, and
those of a model whose forward gathers sharded parameters, line up.
"""

from __future__ import annotations

import torch

from srpo_core.ablation import AblatedBatch, ablate_span, counterfactual_donors
from srpo_core.corruption import corrupt_pixel_values


def num_processes(trainer) -> int:
    return int(getattr(trainer.accelerator, "num_processes", 1))


def on_any_process(trainer, flag: bool) -> bool:
    """``flag`` of any process (a MAX all-reduce over the default group; ``flag`` itself with one process). SRPO's
    extra passes run on every process as soon as one needs them, so every process runs the same number of
    forwards: the counterfactual exchange is a collective, and a model whose forward gathers sharded parameters
    (FSDP, ZeRO-3) must not see one process skip a pass that another runs."""
    if num_processes(trainer) == 1:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=trainer.accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def corrupt_per_key(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, keys: list[int], seed: int,
                    **kwargs) -> torch.Tensor:
    """Corrupted Qwen-VL ``pixel_values``: the images with the same ``keys[i]`` share one mask (and noise), drawn
    from ``torch.Generator().manual_seed(hash((seed, key)))``, so an image's mask depends on its key and ``seed``
    only, never on the other images in the batch. ``kwargs`` go to :func:`srpo_core.corruption.corrupt_pixel_values`."""
    grids = image_grid_thw.detach().to("cpu", torch.int64)
    if len(keys) != grids.shape[0]:
        raise ValueError(f"corrupt_per_key: one key per image: {grids.shape[0]} images (image_grid_thw), got "
                         f"{len(keys)} keys")
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), grids.prod(-1).cumsum(0)]).tolist()
    images: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        images.setdefault(int(key), []).append(i)
    out = pixel_values.clone()
    for key, members in images.items():
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members]).to(pixel_values.device)
        gen = torch.Generator().manual_seed(hash((int(seed), key)) % (2**63))
        out[rows] = corrupt_pixel_values(pixel_values[rows], image_grid_thw[members], generator=gen,
                                         group_index=torch.zeros(len(members), dtype=torch.int64), **kwargs)
    return out


def _runs(input_ids: torch.Tensor, span_mask: torch.Tensor, run_mask: torch.Tensor) -> tuple[list, list]:
    """Per row: its span's tokens (what ``counterfactual_donors`` compares) and the tokens of its run from the first
    to the last ``run_mask`` position (what ``ablate_span`` lends as a donor), as lists of ints."""
    spans, runs = [], []
    for ids, span, run in zip(input_ids.tolist(), span_mask.tolist(), run_mask.tolist(), strict=True):
        spans.append([t for t, s in zip(ids, span, strict=True) if s])
        where = [j for j, r in enumerate(run) if r]
        runs.append(ids[where[0]:where[-1] + 1] if where else [])
    return spans, runs


def _padded(rows: list[list[int]], width: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), fill, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, :len(r)] = True
    return ids, mask


def counterfactual_across_processes(input_ids: torch.Tensor, attention_mask: torch.Tensor, span_mask: torch.Tensor,
                                    group_ids: torch.Tensor, source: str, *, pad_token_id: int,
                                    tags_mask: torch.Tensor | None = None, per_position: dict | None = None,
                                    process_group=None) -> tuple[AblatedBatch, dict]:
    """``ablate_span(mode="counterfactual")`` of this process's rows with the donors one process holding the whole
    batch would choose (:func:`srpo_core.ablation.counterfactual_donors` over every process's rows, in process
    order; ``group_ids`` are global). A collective: every process of ``process_group`` must call it, with or without
    spans. Each process sends its rows' spans (a few tokens each, ``all_gather_object``); a donor held by another
    process is appended as an extra row holding only its run, ablated, then cut off again. Returns the
    :class:`AblatedBatch` of the local rows and ``per_position`` (``[B, L]`` tensors such as ``mm_token_type_ids``)
    ablated the same way (a lent run counts as text, type 0)."""
    import torch.distributed as dist

    b, width = input_ids.shape
    run_mask = span_mask if tags_mask is None else span_mask | tags_mask
    spans, runs = _runs(input_ids, span_mask, run_mask)
    mine = (group_ids.tolist(), spans, runs)
    world = dist.get_world_size(process_group)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=process_group)
    rank = dist.get_rank(process_group)
    offset = sum(len(everyone[r][0]) for r in range(rank))
    all_groups = [g for part in everyone for g in part[0]]
    all_spans = [s for part in everyone for s in part[1]]
    all_runs = [r for part in everyone for r in part[2]]
    span_width = max((len(s) for s in all_spans), default=0)
    span_ids, span_valid = _padded(all_spans, max(span_width, 1), 0)
    donor_global = counterfactual_donors(torch.tensor(all_groups, dtype=torch.int64), source, input_ids=span_ids,
                                         span_mask=span_valid).tolist()
    lent: dict[int, int] = {}  # global row of a remote donor -> its extra row here
    donor = []
    for i in range(b):
        d = donor_global[offset + i]
        if d < 0 or offset <= d < offset + b:
            donor.append(d - offset if d >= 0 else -1)
        else:
            donor.append(lent.setdefault(d, b + len(lent)))
    extra_rows = [all_runs[d] for d in lent]
    full_width = max([width] + [len(r) for r in extra_rows])
    device = input_ids.device

    def widen(x: torch.Tensor, fill) -> torch.Tensor:
        """``x: [B, L, ...]`` → ``[B + extra rows, full_width, ...]``, the new cells ``fill``."""
        out = x.new_full((b + len(extra_rows), full_width, *x.shape[2:]), fill)
        out[:b, :width] = x
        return out

    ids = widen(input_ids, pad_token_id)
    attn = widen(attention_mask, 0)
    span = widen(span_mask, False)
    tags = None if tags_mask is None else widen(tags_mask, False)
    if extra_rows:
        lent_ids, lent_valid = _padded(extra_rows, full_width, pad_token_id)
        ids[b:] = lent_ids.to(device, ids.dtype)
        attn[b:] = lent_valid.to(device, attn.dtype)
        span[b:] = lent_valid.to(device)  # the whole run is the span: first..last of it is lent
    donor_t = torch.tensor(donor + [-1] * len(extra_rows), dtype=torch.int64, device=device)
    ab = ablate_span(ids, attn, span, mode="counterfactual", pad_token_id=pad_token_id, tags_mask=tags,
                     donor=donor_t)
    keep = int((ab.source[:b, :, 1] >= 0).sum(dim=1).max()) if b else 0
    ablated = {k: ab.ablate(widen(v, 0))[:b, :keep] for k, v in (per_position or {}).items()}
    local = AblatedBatch(ab.input_ids[:b, :keep], ab.attention_mask[:b, :keep], ab.index[:b, :width], None,
                         "counterfactual", ab.source[:b, :keep])
    return local, ablated
