"""Held-out evaluation by greedy decoding: answer accuracy, perception correctness and response length, with the
clean image and with a corrupted one (the grounding gap is the drop in accuracy)."""

from __future__ import annotations

import torch

from srpo_core.corruption import corrupt_images
from srpo_core.experiment.model import prompt_text, suppressed_ids
from srpo_core.experiment.task import CELL, Sample, parse, perception_score

EVAL_CORRUPTION = dict(p=0.5, patch_size=CELL, mode="black")  # one whole cell (one merged visual token) per unit


def corrupted_images(samples: list[Sample], seed: int):
    """Each sample's image with every 28-px cell blacked with p = 0.5 (the same draws for every method)."""
    gen = torch.Generator().manual_seed(int(seed))
    return [corrupt_images(s.image(), generator=gen, **EVAL_CORRUPTION) for s in samples]


@torch.no_grad()
def generate_texts(model, processor, samples: list[Sample], images=None, *, max_new_tokens: int = 32,
                   batch_size: int = 32) -> list[str]:
    """Greedy completions (decoded, special tokens kept) for the samples' prompts and images."""
    tok = processor.tokenizer
    images = [s.image() for s in samples] if images is None else images
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        tok.padding_side = "left"
        enc = processor(text=[prompt_text(processor, s.question) for s in chunk], images=images[i:i + batch_size],
                        padding=True, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             suppress_tokens=suppressed_ids(tok), pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for row in new:
            ids = row.tolist()
            if tok.eos_token_id in ids:
                ids = ids[:ids.index(tok.eos_token_id)]
            out.append(tok.decode(ids, skip_special_tokens=False))
    tok.padding_side = "right"
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


def evaluate(model, processor, samples: list[Sample], *, corruption_seed: int = 12345) -> dict:
    """Clean and corrupted-image metrics; ``grounding_gap`` = clean accuracy − corrupted accuracy."""
    clean = score(samples, generate_texts(model, processor, samples))
    corrupt = score(samples, generate_texts(model, processor, samples, corrupted_images(samples, corruption_seed)))
    return {"accuracy": clean["accuracy"], "perception": clean["perception"], "length": clean["length"],
            "format": clean["format"], "accuracy_corrupt": corrupt["accuracy"],
            "perception_corrupt": corrupt["perception"], "grounding_gap": clean["accuracy"] - corrupt["accuracy"],
            "n": len(samples)}
