"""Held-out evaluation: answer accuracy, perception (cell) correctness and response length by greedy decoding, with
the clean image and with a corrupted one (the grounding gap is the drop in accuracy); and, from ``k`` samples per
prompt at temperature 1, sampled accuracy, cell accuracy and the hallucination rates split by whether the wrong
perception changes the answer, with the two primes of the study's warm start (issue 23) counted apart."""

from __future__ import annotations

import torch

from srpo_core.corruption import corrupt_images
from srpo_core.experiment.model import padding_side, prompt_text, suppressed_ids
from srpo_core.experiment.task import CELL, Sample, parse, perception_score, shortcut, solve

EVAL_CORRUPTION = dict(p=0.5, patch_size=CELL, mode="black")  # one whole cell (one merged visual token) per unit


def corrupted_images(samples: list[Sample], seed: int):
    """Each sample's image with every 28-px cell blacked with p = 0.5 (the same draws for every method)."""
    gen = torch.Generator().manual_seed(int(seed))
    return [corrupt_images(s.image(), generator=gen, **EVAL_CORRUPTION) for s in samples]


@torch.no_grad()
def generate_texts(model, processor, samples: list[Sample], images=None, *, max_new_tokens: int = 32,
                   batch_size: int = 32, sample_k: int = 0, seed: int = 0) -> list[str]:
    """Greedy completions (decoded, special tokens kept) for the samples' prompts and images; with ``sample_k > 0``,
    ``sample_k`` completions per sample at temperature 1 (sample-major order), drawn from ``seed``."""
    tok = processor.tokenizer
    images = [s.image() for s in samples] if images is None else images
    was_training = model.training
    model.eval()
    out = []
    with padding_side(processor, "left"):  # restored after: SFT pads right, RL left
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            enc = processor(text=[prompt_text(processor, s.question) for s in chunk], images=images[i:i + batch_size],
                            padding=True, return_tensors="pt")
            sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=sample_k) \
                if sample_k else dict(do_sample=False)
            if sample_k:
                torch.manual_seed(int(seed) * 1_000_003 + i)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, suppress_tokens=suppressed_ids(tok),
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row in new:
                ids = row.tolist()
                if tok.eos_token_id in ids:
                    ids = ids[:ids.index(tok.eos_token_id)]
                out.append(tok.decode(ids, skip_special_tokens=False))
    model.train(was_training)
    return out


def score(samples: list[Sample], texts: list[str]) -> dict:
    acc, prc, length, fmt = [], [], [], []
    for s, t in zip(samples, texts, strict=True):
        perceived, answer = parse(t)
        acc.append(float(answer == s.answer))
        prc.append(perception_score(s, perceived))
        length.append(len(t.split()))
        fmt.append(float(perceived is not None and answer is not None))
    n = max(len(samples), 1)
    return {"accuracy": sum(acc) / n, "perception": sum(prc) / n, "length": sum(length) / n,
            "format": sum(fmt) / n, "per_sample_accuracy": acc, "per_sample_perception": prc}


def hallucination(samples: list[Sample], texts: list[str]) -> dict:
    """Rates over responses: a wrong perception that changes the answer (``changes_answer``, the answer solved from
    the perceived cells differs from the truth) or not (``keeps_answer``); the shortcut prime (count / compare: the
    first empty cell perceived as the question's colour, over the responses where it applies) and the silent prime
    (read: a non-queried cell wrong, over read responses)."""
    changes = keeps = short = short_n = silent = silent_n = 0
    for s, t in zip(samples, texts, strict=True):
        perceived, _ = parse(t)
        wrong = perceived is not None and tuple(perceived) != s.cells
        if wrong:
            same = "?" not in perceived and solve(s.kind, s.args, perceived) == s.answer
            changes += not same
            keeps += same
        cut = shortcut(s)
        if cut is not None and perceived is not None:
            short_n += 1
            k = s.cells.index("none")
            short += perceived[k] == cut[k]
        if s.kind == "read" and perceived is not None:
            silent_n += 1
            q = int(s.args[0][1:]) - 1
            silent += any(p != c for i, (p, c) in enumerate(zip(perceived, s.cells, strict=True)) if i != q)
    n = max(len(samples), 1)
    return {"halluc_changes_answer": changes / n, "halluc_keeps_answer": keeps / n,
            "shortcut_rate": short / short_n if short_n else None,
            "silent_prime_rate": silent / silent_n if silent_n else None}


def evaluate(model, processor, samples: list[Sample], *, corruption_seed: int = 12345, sample_k: int = 0,
             sample_seed: int = 777) -> dict:
    """Clean and corrupted-image greedy metrics (``grounding_gap`` = clean accuracy − corrupted accuracy), the
    greedy hallucination rates, and with ``sample_k > 0`` the ``sampled_*`` metrics of ``sample_k`` completions per
    sample at temperature 1. ``per_sample_sampled_accuracy`` (mean over the k) is kept for paired comparisons."""
    texts = generate_texts(model, processor, samples)
    clean = score(samples, texts)
    corrupt = score(samples, generate_texts(model, processor, samples, corrupted_images(samples, corruption_seed)))
    out = {"accuracy": clean["accuracy"], "perception": clean["perception"], "length": clean["length"],
           "format": clean["format"], "accuracy_corrupt": corrupt["accuracy"],
           "perception_corrupt": corrupt["perception"], "grounding_gap": clean["accuracy"] - corrupt["accuracy"],
           "n": len(samples), **hallucination(samples, texts)}
    if sample_k:
        rep = [s for s in samples for _ in range(sample_k)]
        stexts = generate_texts(model, processor, samples, sample_k=sample_k, seed=sample_seed)
        sampled = score(rep, stexts)
        out.update({"sampled_accuracy": sampled["accuracy"], "sampled_perception": sampled["perception"],
                    "sampled_k": sample_k,
                    **{f"sampled_{k}": v for k, v in hallucination(rep, stexts).items()},
                    "per_sample_sampled_accuracy": [sum(sampled["per_sample_accuracy"][i * sample_k:(i + 1) * sample_k])
                                                    / sample_k for i in range(len(samples))]})
    return out
