"""Teacher-forced batches of structured responses, and the supervised warm start.

The warm start trains on ``<perception>…</perception><think>…</think><answer>…</answer>`` responses of which a
fraction ``hallucinated`` has a perception span with one or two wrong cell colours (and reasoning consistent with the
wrong perception), so that the warm-started policy sometimes hallucinates and RL has room to make it more grounded.
"""

from __future__ import annotations

import dataclasses
import random
import time

import torch

from srpo_core.experiment.model import padding_side, prompt_text
from srpo_core.experiment.task import Response, Sample, hallucinate, response, shortcut, silent_prime

PART_CODES = {"tag": 0, "perception": 1, "think": 2, "answer": 3}


@dataclasses.dataclass
class Batch:
    """Model inputs for ``B`` prompt+response rows (right padded) and per-position labels.

    ``completion: bool [B, L]`` marks response tokens (the closing ``<|im_end|>`` included); ``part: int [B, L]``
    holds :data:`PART_CODES` (−1 off the response); ``uses_fact``, ``direct``: ``bool [B, L]`` (see
    :class:`~srpo_core.experiment.task.Response`); ``grounded: bool [B]`` whether the
    row's perception span is the truth.
    """

    inputs: dict
    completion: torch.Tensor
    part: torch.Tensor
    uses_fact: torch.Tensor
    grounded: torch.Tensor
    direct: torch.Tensor | None = None


def encode(processor, samples: list[Sample], responses: list[Response], images=None) -> Batch:
    """Tokenise ``prompt + response + <|im_end|>`` rows with their images (default: each sample's own image)."""
    tok = processor.tokenizer
    prompts = [prompt_text(processor, s.question) for s in samples]
    texts = [p + " " + r.text + " " + tok.eos_token for p, r in zip(prompts, responses, strict=True)]
    images = [s.image() for s in samples] if images is None else images
    with padding_side(processor, "right"):  # the prompt starts every row: completion positions below
        inputs = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    B, L = inputs["input_ids"].shape
    completion = torch.zeros(B, L, dtype=torch.bool)
    part = torch.full((B, L), -1, dtype=torch.int64)
    fact = torch.zeros(B, L, dtype=torch.bool)
    direct = torch.zeros(B, L, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n_prompt = len(processor(text=[p], images=[images[b]], return_tensors="pt")["input_ids"][0])
        n = len(r.words)
        completion[b, n_prompt:n_prompt + n + 1] = True
        part[b, n_prompt:n_prompt + n] = torch.tensor([PART_CODES[x] for x in r.part])
        part[b, n_prompt + n] = PART_CODES["tag"]
        fact[b, n_prompt:n_prompt + n] = torch.tensor(r.uses_fact)
        if r.direct:
            direct[b, n_prompt:n_prompt + n] = torch.tensor(r.direct)
    grounded = torch.tensor([r.words[2::2][:4] == tuple(s.cells) for s, r in zip(samples, responses, strict=True)])
    return Batch(inputs, completion, part, fact, grounded, direct)


def primed_cells(sample: Sample, rng: random.Random, hallucinated: float, prime: float) -> tuple[str, ...]:
    """The perceived cells of one warm-start response. With ``prime > 0`` (study v2, issue 23): the shortcut
    (:func:`~srpo_core.experiment.task.shortcut`, changes the answer) or the silent prime
    (:func:`~srpo_core.experiment.task.silent_prime`, keeps it) with probability ``prime`` where one applies;
    otherwise 1-2 random wrong cells with probability ``hallucinated``, else the truth."""
    if prime > 0:
        primed = shortcut(sample) if sample.kind != "read" else silent_prime(sample, rng)
        if primed is not None and rng.random() < prime:
            return primed
    return hallucinate(sample.cells, rng) if rng.random() < hallucinated else sample.cells


def mixed_responses(samples: list[Sample], hallucinated: float, seed: int, prime: float = 0.0) -> list[Response]:
    """Warm-start responses (drawn from ``seed``), see :func:`primed_cells`."""
    rng = random.Random(f"srpo-sft-{seed}")
    return [response(s, primed_cells(s, rng, hallucinated, prime)) for s in samples]


def token_nll(model, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (the supervised loss)."""
    out = model(**batch.inputs)
    logits = out.logits[:, :-1].float()
    targets = batch.inputs["input_ids"][:, 1:]
    keep = batch.completion[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    return nll


def warm_start(model, processor, samples: list[Sample], *, steps: int, batch_size: int = 16, lr: float = 3e-3,
               hallucinated: float = 0.3, seed: int = 0, prime: float = 0.0, progress=None) -> dict:
    """Supervised pass over ``samples`` (cycled, reshuffled per epoch from ``seed``); returns the loss curve."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"warm_start: need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    rng = random.Random(f"srpo-sft-order-{seed}")
    responses = mixed_responses(samples, hallucinated, seed, prime)
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    model.train()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(samples)), len(samples))
        idx, order = order[:batch_size], order[batch_size:]
        batch = encode(processor, [samples[i] for i in idx], [responses[i] for i in idx])
        loss = token_nll(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress()
    model.eval()
    return {"loss": losses, "seconds": time.perf_counter() - start, "steps": steps, "batch_size": batch_size,
            "lr": lr, "hallucinated": hallucinated, "prime": prime, "samples": len(samples)}
