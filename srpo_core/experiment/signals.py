"""Signal validity before RL: do SRPO's two signals measure what they claim on the warm-started model?

For every held-out sample two responses are teacher-forced — the grounded one and a hallucinated one (one or two cell
colours wrong, reasoning consistent with them) — under three passes: the clean image, the corrupted image
(:func:`srpo_core.corruption.corrupt_pixel_values`, the SRPO trainer's default corruption, one mask per sample shared by
its two responses) and the clean image with the perception span ablated (:func:`srpo_core.ablation.ablate_span` in each
mode: ``mask`` with the original M-RoPE positions, ``drop``, ``counterfactual`` with the span of another probe sample's
response). Per token:

- visual dependency ``k3`` (:func:`srpo_core.advantages.contrast` of ``ℓ`` and ``ℓ̃``), ``kl`` and ``js``
  (:func:`srpo_core.token_contrast` of the clean and corrupted next-token rows), and the signed ``logratio`` ``ℓ − ℓ̃``;
- reasoning consistency ``reasoning_<mode>_logratio`` ``ℓ − ℓ°`` (SRPO's default) and ``k3`` / ``kl`` / ``js`` of the
  clean and ablated rows; ``reasoning_drop_no_tags_logratio`` drops the ``<perception>`` tags too.

Roles come from the real tag parser (:func:`srpo_core.roles.roles_from_token_ids`). Comparisons (difference of token
means and Cohen's d, with a cluster bootstrap over samples): perception vs reasoning vs OTHER tokens; grounded vs
hallucinated perception spans (and the changed colour words alone); reasoning tokens that use a perceived fact (all of
them, or the ones read directly off the span) vs those that do not.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from srpo_core.ablation import ablate_span, counterfactual_donors
from srpo_core.advantages import contrast
from srpo_core.config import Role
from srpo_core.corruption import CLIP_MEAN, CLIP_STD, corrupt_pixel_values
from srpo_core.experiment.sft import PART_CODES, encode
from srpo_core.experiment.task import VALUES, Sample, hallucinate, response
from srpo_core.ops.token_contrast import token_contrast
from srpo_core.roles import roles_from_token_ids

KINDS = ("k3", "kl", "js", "logratio")
REASONING_KINDS = ("logratio", "k3", "kl", "js")
REASONING_MODES = ("mask", "drop", "counterfactual")  # side by side in the signal table (issue 23)


def _rows_logits(model, inputs) -> torch.Tensor:
    """``[B, L, V]`` next-token logits, shifted so that position ``j`` holds the row that predicts token ``j``."""
    logits = model(**inputs).logits.float()
    return torch.cat([logits[:, :1] * 0, logits[:, :-1]], dim=1)


def _ablated_rows(model, inputs: dict, ab) -> torch.Tensor:
    """``[B, L, V]`` rows of the ablated pass on the original positions (0 where a token gets no value). ``mask``
    passes the original M-RoPE positions (``get_rope_index`` on the unablated batch); the other modes let the model
    compute the positions of their rebuilt rows."""
    kw = {**inputs, "input_ids": ab.input_ids, "attention_mask": ab.attention_mask,
          "mm_token_type_ids": ab.ablate(inputs["mm_token_type_ids"])}
    if ab.mode == "mask":
        kw["position_ids"], _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    return ab.gather(_rows_logits(model, kw))


def _per_token(rows_a, rows_b, ids, keep, kind):
    """Signal of ``kind`` between two ``[B, L, V]`` row tensors at the ``keep`` positions, as a flat tensor."""
    a, b, t = rows_a[keep], rows_b[keep], ids[keep]
    if kind in ("kl", "js"):
        return token_contrast(a, b, t, kind=kind).div
    la = torch.log_softmax(a, -1).gather(-1, t[:, None])[:, 0]
    lb = torch.log_softmax(b, -1).gather(-1, t[:, None])[:, 0]
    return contrast(la, lb, kind)


@torch.no_grad()
def token_signals(model, processor, samples: list[Sample], *, seed: int = 0, corruption_p: float = 0.5,
                  batch_size: int = 16) -> dict:
    """Per-token signals and labels of the grounded and hallucinated responses of ``samples`` (numpy arrays)."""
    rng = random.Random(f"srpo-signals-{seed}")
    gen = torch.Generator().manual_seed(int(seed))
    ip = processor.image_processor
    cols: dict[str, list] = {}
    model.eval()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pairs = [(s, s.cells) for s in chunk] + [(s, hallucinate(s.cells, rng)) for s in chunk]
        batch = encode(processor, [s for s, _ in pairs], [response(s, c) for s, c in pairs])
        inputs, ids = batch.inputs, batch.inputs["input_ids"]
        n = len(chunk)
        cluster = torch.tensor([start + i for i in range(n)] * 2)
        corrupted = corrupt_pixel_values(inputs["pixel_values"], inputs["image_grid_thw"], p=corruption_p,
                                         generator=gen, group_index=cluster, image_mean=tuple(ip.image_mean or
                                         CLIP_MEAN), image_std=tuple(ip.image_std or CLIP_STD))
        clean = _rows_logits(model, inputs)
        corrupt = _rows_logits(model, {**inputs, "pixel_values": corrupted})
        span = batch.part == PART_CODES["perception"]
        pad = processor.tokenizer.pad_token_id
        comp = batch.completion
        tag_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(["<perception>", "</perception>"]))
        tags = comp & torch.isin(ids, tag_ids)
        passes = {"mask": ablate_span(ids, inputs["attention_mask"], span, mode="mask"),
                  "drop": ablate_span(ids, inputs["attention_mask"], span, mode="drop", pad_token_id=pad),
                  # the span of the same-rank response of the next probe sample (another prompt, same image)
                  "counterfactual": ablate_span(ids, inputs["attention_mask"], span, mode="counterfactual",
                                                donor=counterfactual_donors(cluster, "other"), pad_token_id=pad),
                  # drop with the <perception> tags removed too (ablate_span's tags_mask option)
                  "drop_no_tags": ablate_span(ids, inputs["attention_mask"], span, mode="drop", tags_mask=tags,
                                              pad_token_id=pad)}
        roles = torch.zeros_like(ids)
        for b in range(len(pairs)):  # the real parser on each response's tokens
            roles[b] = roles_from_token_ids(ids[b:b + 1], processor.tokenizer, comp[b:b + 1]).roles[0]
        keep = comp
        got = {f"visual_{k}": _per_token(clean, corrupt, ids, keep, k) for k in KINDS}
        for mode, ab in passes.items():
            ablated = _ablated_rows(model, inputs, ab)
            has = keep & ab.valid  # not the span, not the token after a masked span (D180)
            for k in REASONING_KINDS if mode != "drop_no_tags" else ("logratio",):
                full = torch.full(ids.shape, float("nan"))
                if bool(has.any()):
                    full[has] = _per_token(clean, ablated, ids, has, k).float()
                got[f"reasoning_{mode}_{k}"] = full[keep]
        wrong = torch.zeros_like(keep)
        for b, (s, c) in enumerate(pairs):
            pos = torch.nonzero(batch.part[b] == PART_CODES["perception"])[:, 0]
            for cell in range(4):
                wrong[b, pos[2 * cell + 1]] = c[cell] != s.cells[cell]
        row = torch.arange(len(pairs))[:, None].expand_as(ids)
        colour_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(VALUES)))
        colour = span & torch.isin(ids, colour_ids)
        got.update(role=roles[keep], token=ids[keep], part=batch.part[keep], uses_fact=batch.uses_fact[keep],
                   direct=batch.direct[keep],
                   grounded=batch.grounded[:, None].expand_as(ids)[keep], wrong_colour=wrong[keep],
                   colour=colour[keep], cluster=cluster[:, None].expand_as(ids)[keep], response=(row + 2 * start)[keep])
        for key, value in got.items():
            cols.setdefault(key, []).append(value.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def bootstrap_effect(values: np.ndarray, in_a: np.ndarray, in_b: np.ndarray, cluster: np.ndarray, *,
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Difference of token means ``mean(A) − mean(B)`` and Cohen's d (pooled token sd), each with a percentile CI from
    a bootstrap that resamples clusters (samples) with replacement; NaN values are ignored."""
    ok = ~np.isnan(values)
    ids, inv = np.unique(cluster, return_inverse=True)
    stats = np.zeros((len(ids), 6))
    for col, sel in ((0, in_a & ok), (3, in_b & ok)):
        v = np.where(sel, values, 0.0)
        np.add.at(stats[:, col], inv, sel.astype(float))
        np.add.at(stats[:, col + 1], inv, v)
        np.add.at(stats[:, col + 2], inv, v * v)

    def effect(s):
        na, sa, qa, nb, sb, qb = s.sum(0) if s.ndim == 2 else s.sum(1).T
        with np.errstate(invalid="ignore", divide="ignore"):
            ma, mb = sa / na, sb / nb
            va, vb = qa / na - ma ** 2, qb / nb - mb ** 2
            pooled = np.sqrt(np.maximum((na * va + nb * vb) / (na + nb), 0.0))
            return ma - mb, (ma - mb) / pooled, ma, mb, na, nb

    diff, d, ma, mb, na, nb = effect(stats)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    bd, bdd, *_ = effect(stats[pick])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {"mean_a": float(ma), "mean_b": float(mb), "n_a": int(na), "n_b": int(nb), "diff": float(diff),
            "diff_ci": [float(np.nanpercentile(bd, lo)), float(np.nanpercentile(bd, hi))], "d": float(d),
            "d_ci": [float(np.nanpercentile(bdd, lo)), float(np.nanpercentile(bdd, hi))], "clusters": len(ids)}


def analyse(sig: dict, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The comparisons of the issue, per signal kind."""
    role, grounded, cl = sig["role"], sig["grounded"].astype(bool), sig["cluster"]
    per, rea, oth = role == int(Role.PERCEPTION), role == int(Role.REASONING), role == int(Role.OTHER)
    colour = sig["colour"].astype(bool)
    reasoning = rea & (sig["part"] != PART_CODES["perception"])
    fact = sig["uses_fact"].astype(bool)
    out: dict[str, dict] = {}
    for k in KINDS:
        v = sig[f"visual_{k}"].astype(float)
        out[f"visual_{k}"] = {
            "perception_vs_reasoning": bootstrap_effect(v, per & grounded, rea & grounded, cl, n_boot=n_boot,
                                                        seed=seed),
            "perception_vs_other": bootstrap_effect(v, per & grounded, oth & grounded, cl, n_boot=n_boot, seed=seed),
            "grounded_vs_hallucinated_span": bootstrap_effect(v, per & grounded, per & ~grounded, cl, n_boot=n_boot,
                                                              seed=seed),
            "grounded_vs_hallucinated_colour": bootstrap_effect(v, colour & grounded, colour & ~grounded
                                                                & sig["wrong_colour"].astype(bool), cl,
                                                                n_boot=n_boot, seed=seed),
        }
    direct = sig["direct"].astype(bool)
    names = [f"reasoning_{m}_{k}" for m in REASONING_MODES for k in REASONING_KINDS]
    names.append("reasoning_drop_no_tags_logratio")
    for name in names:
        v = sig[name].astype(float)
        out[name] = {
            "fact_vs_nonfact": bootstrap_effect(v, reasoning & fact, reasoning & ~fact, cl, n_boot=n_boot,
                                                seed=seed),
            "direct_vs_nonfact": bootstrap_effect(v, reasoning & direct, reasoning & ~fact, cl, n_boot=n_boot,
                                                  seed=seed),
            "fact_vs_nonfact_grounded": bootstrap_effect(v, reasoning & fact & grounded, reasoning & ~fact & grounded,
                                                         cl, n_boot=n_boot, seed=seed),
        }
    out["counts"] = {"tokens": int(len(role)), "perception": int(per.sum()), "reasoning": int(rea.sum()),
                     "other": int(oth.sum()), "responses": int(len(np.unique(sig["response"])))}
    return out
