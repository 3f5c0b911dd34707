"""Whole TRL training steps at ``num_iterations=1``: GRPO (TRL's own ``GRPOTrainer``) against SRPO
(``SRPOGRPOTrainer``) with the former full passes (``srpo_old``: ``_srpo_pass_runner = False``, D230) and with the
pass runner (``srpo_runner``), issue 24's "SRPO step / GRPO step, before and after".

    python benchmarks/bench_step.py [--steps 5] [--warmup 1] [--json out.json] [--md out.md]
    python benchmarks/bench_step.py --quick      # tiny sizes, about a minute: a smoke test (no pytest test: too slow)

The model is ``benchmarks/bench_passes.py``'s Qwen2-VL (random weights from a config: vocabulary 151,936, untied head,
M-RoPE, a 2-block vision tower), scaled down so that a step takes well under a minute on one thread:
``--hidden`` 256, ``--layers`` 2 (the 151,936-way head is ~10× the decoder's arithmetic at these sizes). The
tokenizer is word-level with the same 151,936 entries, built offline (Qwen's special tokens at Qwen's ids, the role
tags as single tokens). Each step trains on ``--batch`` 8 completions = 4 prompts × ``--generations`` 2, each prompt
one ``--image``-pixel image (392: 196 image tokens) and 40-80 words of text. Generation is scripted (TRL's
``_generate_single_turn`` replaced, nothing else): each completion has ``--completion`` (256) × (0.75-1.0) tokens,
``<perception>`` over the first ``--perception`` share, then ``<think>`` … ``</think> <answer> w </answer>`` and
EOS, its words drawn from the vocabulary (the same completions for every method at a given step); the reward is a
hash of the text. So the step is TRL's: tokenising the prompts and their images, rewards, advantages, (SRPO: roles,
passes, token advantages), the loss forward and backward through the 151,936-way head, the optimizer; sampling,
which would dominate and is the same for every method, is left out (D231).

The three trainers (same weights, data and seeds; ``beta`` 0, TRL's default) run in threads that take turns, one
step each in order ``grpo, srpo_old, srpo_runner, grpo, …``, so that the methods are interleaved within each
``trainer.train()``: only one of them runs at any time (a baton passed at each ``on_step_begin``, D232). A step is timed
from ``on_step_begin`` to ``on_step_end`` (generation, scoring, loss, backward, optimizer); the first ``--warmup``
steps of each method are discarded. Per step it also records the time in ``_generate_and_score_completions``, in
SRPO's passes (``_srpo_passes``, inside the former), in the loss forward (``_compute_loss``) and in the optimizer
step; the rest is the backward, gradient clipping and TRL's bookkeeping. Each column is a median over the kept
steps (so the phases need not add up to the median step exactly); 20/80 % quantiles of the step; host, CPU, ISA
flags and threads in the JSON (``benchmarks/host.py``). Run it on a quiet core:
``OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_step.py --json docs/bench_step.json --md docs/bench_step.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import threading
import time
import warnings
import zlib

import torch

from srpo_core.bench.bench_passes import IMAGE, PAD, V_END, V_START, VIDEO, VOCAB, build_model, quantiles

METHODS = ("grpo", "srpo_old", "srpo_runner")
PHASES = ("gen_score_s", "generate_s", "passes_s", "loss_fwd_s", "optim_s")
# Qwen2's special tokens at Qwen2's ids (bench_passes' model config uses these ids)
QWEN_SPECIAL = {"<|endoftext|>": PAD, "<|im_start|>": 151_644, "<|im_end|>": 151_645, "<|vision_start|>": V_START,
                "<|vision_end|>": V_END, "<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO, "[UNK]": 151_654}
TAGS = ("<perception>", "</perception>", "<think>", "</think>", "<answer>", "</answer>")
ROLE_WORDS = ("user", "assistant", "system")
WORDS = (1000, 150_000)  # filler words w<id> for prompts and completions are drawn from these ids
QUICK = dict(hidden=64, layers=1, batch=4, completion=48, image=56, steps=2, warmup=1)


def build_processor():
    """A ``Qwen2VLProcessor`` around a word-level tokenizer with ``VOCAB`` entries: Qwen's special tokens at their ids,
    the tags and role words at 0-8, ``w<id>`` elsewhere (so ids span the vocabulary like bench_passes' batches)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from srpo_core.experiment.model import CHAT_TEMPLATE, images_only_processor

    named = {**{t: i for i, t in enumerate((*TAGS, *ROLE_WORDS))}, **QWEN_SPECIAL}
    by_id = {i: t for t, i in named.items()}
    vocab = {by_id.get(i, f"w{i}"): i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
                                        # TRL 1.16 pads prompt_ids on the left but takes mm_token_type_ids from the
                                        # processor's own padding: with prompts of different lengths a right-padding
                                        # tokenizer misaligns M-RoPE's image positions (huggingface/trl#5785)
                                        padding_side="left")
    return images_only_processor(tokenizer, CHAT_TEMPLATE)


def build_dataset(n: int, image: int, seed: int = 0):
    """``n`` prompts: ``image``-pixel noise images with 40-80 words of text, a quarter of them before the image."""
    import datasets
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        words = [f"w{int(i)}" for i in torch.randint(*WORDS, (int(torch.randint(40, 81, (1,), generator=g)),),
                                                     generator=g)]
        cut = len(words) // 4
        pixels = torch.randint(0, 256, (image, image, 3), generator=g, dtype=torch.uint8).numpy()
        content = [{"type": "text", "text": " ".join(words[:cut]) + " "}, {"type": "image"},
                   {"type": "text", "text": " " + " ".join(words[cut:]) + " "}]
        rows.append({"prompt": [{"role": "user", "content": content}],
                     "image": Image.fromarray(np.ascontiguousarray(pixels))})
    return datasets.Dataset.from_list(rows)


def hash_reward(completions, **kwargs) -> list[float]:
    """A placeholder reward that varies between completions: a hash of the text in [0, 1)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [zlib.crc32(t.encode()) % 1000 / 1000 for t in texts]


def scripted(base):
    """``base`` (a GRPO trainer class) with TRL's sampling replaced by tagged completions drawn from a seed, the step
    and the row: the same completions for every method at a given step."""

    class Scripted(base):
        _script: dict

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            s = self._script
            step = s.setdefault("calls", 0)
            s["calls"] += 1
            tok = self._tokenizer
            ids = {t: tok.convert_tokens_to_ids(t) for t in (*TAGS, "<|im_end|>")}
            out = []
            for i in range(len(prompt_ids)):
                g = torch.Generator().manual_seed(s["seed"] * 1_000_003 + step * 7919 + i)
                n = int(s["completion"] * (0.75 + 0.25 * float(torch.rand(1, generator=g))))
                p = max(1, round(s["perception"] * n))
                r = max(1, n - p - 8)
                words = torch.randint(*WORDS, (p + r + 1,), generator=g).tolist()
                out.append([ids["<perception>"], *words[:p], ids["</perception>"], ids["<think>"], *words[p:p + r],
                            ids["</think>"], ids["<answer>"], words[-1], ids["</answer>"], ids["<|im_end|>"]])
            return out, None

    return Scripted


class Baton:
    """Turns between threads: ``wait(i)`` until it is thread ``i``'s turn; ``pass_on(i)`` gives it to the next
    thread still running; ``finish(i)`` takes ``i`` out of the rotation."""

    def __init__(self, n: int):
        self.cond, self.turn, self.alive = threading.Condition(), 0, [True] * n

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def _next(self, i: int) -> int:
        n = len(self.alive)
        return next((j % n for j in range(i + 1, i + 1 + n) if self.alive[j % n]), -1)

    def pass_on(self, i: int) -> None:
        with self.cond:
            self.turn = self._next(i)
            self.cond.notify_all()

    def finish(self, i: int) -> None:
        with self.cond:
            self.alive[i] = False
            self.turn = self._next(i)
            self.cond.notify_all()


def _timed(trainer, name: str, bucket: dict, key: str) -> None:
    original = getattr(trainer, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket[key] += time.perf_counter() - t0

    setattr(trainer, name, wrapper)


def make_trainer(method: str, processor, train, a):
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from srpo_core.adapters.trl import SRPOGRPOTrainer, SRPOTrainerOptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="srpo-bench-step-"), per_device_train_batch_size=a.batch,
                          num_generations=a.generations, max_completion_length=a.completion, num_iterations=1,
                          beta=0.0, max_steps=a.warmup + a.steps, learning_rate=1e-6, use_cpu=True, report_to=[],
                          bf16=False, logging_steps=1, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True)
    model = build_model(a.hidden, a.layers).train()
    common = dict(model=model, reward_funcs=hash_reward, args=args, train_dataset=train, processing_class=processor)
    if method == "grpo":
        trainer = scripted(GRPOTrainer)(**common)
    else:
        trainer = scripted(SRPOGRPOTrainer)(**common, srpo_options=SRPOTrainerOptions(ablation_mode=a.mode))
        trainer._srpo_pass_runner = method == "srpo_runner"
    trainer._script = dict(seed=0, completion=a.completion, perception=a.perception)
    bucket = dict.fromkeys(PHASES, 0.0)
    record = {"steps": [], "bucket": bucket, "first": None}
    _timed(trainer, "_generate_and_score_completions", bucket, "gen_score_s")
    _timed(trainer, "_generate_single_turn", bucket, "generate_s")
    _timed(trainer, "_compute_loss", bucket, "loss_fwd_s")
    if method != "grpo":
        _timed(trainer, "_srpo_passes", bucket, "passes_s")

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record["baton"].pass_on(record["index"])
            record["baton"].wait(record["index"])
            bucket.update(dict.fromkeys(PHASES, 0.0))
            record["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            record["t_opt"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            bucket["optim_s"] += time.perf_counter() - record["t_opt"]

        def on_step_end(self, args, state, control, **kwargs):
            row = {"step_s": time.perf_counter() - record["t0"], **bucket}
            row["rest_s"] = row["step_s"] - row["gen_score_s"] - row["loss_fwd_s"] - row["optim_s"]
            record["steps"].append(row)
            last = getattr(trainer, "_srpo_last", None)
            if record["first"] is None and last is not None:  # the first batch: the methods' models are still equal
                roles = last.scored_roles[last.mask]
                record["first"] = {"advantages": last.result.advantages.detach().clone(), "mask": last.mask.clone(),
                                   "roles": last.scored_roles.clone(), "logp": last.logp.clone(),
                                   "logp_corrupt": last.logp_corrupt.clone(), "logp_ablated": last.logp_ablated.clone(),
                                   "perception_tokens": int((roles == 1).sum()),
                                   "reasoning_tokens": int((roles == 2).sum()), "tokens": int(last.mask.sum())}
            print(f"  {record['method']} step {len(record['steps'])}: {row['step_s']:.2f} s", file=sys.__stderr__,
                  flush=True)

    trainer.add_callback(StepTimer())
    record.update(method=method, trainer=trainer)
    return record


def run(a) -> dict:
    from srpo_core.experiment.model import images_only_processor  # noqa: F401 - fail early without the trl extra

    processor = build_processor()
    train = build_dataset(a.batch // a.generations * (a.warmup + a.steps), a.image)
    quiet = io.StringIO()  # TRL prints each log row when its progress bar is off
    threads = torch.get_num_threads()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        records = [make_trainer(m, processor, train, a) for m in METHODS]
        baton, errors = Baton(len(records)), {}
        for i, r in enumerate(records):
            r.update(index=i, baton=baton)

        def body(i: int) -> None:
            torch.set_num_threads(threads)  # a new thread starts with the default count
            records[i]["threads"] = torch.get_num_threads()
            baton.wait(i)
            try:
                records[i]["trainer"].train()
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors[i] = e
            finally:
                baton.finish(i)

        workers = [threading.Thread(target=body, args=(i,), name=r["method"]) for i, r in enumerate(records)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    if errors:
        i = min(errors)
        raise RuntimeError(f"bench_step: {records[i]['method']} failed; TRL's output:\n{quiet.getvalue()[-2000:]}") \
            from errors[i]
    res: dict = {"methods": {}}
    for r in records:
        kept = r["steps"][a.warmup:]
        row = {"step": quantiles([s["step_s"] for s in kept]), "threads": r["threads"],
               **{k: quantiles([s[k] for s in kept])["median_s"] for k in (*PHASES, "rest_s")}}
        logged = [h for h in r["trainer"].state.log_history if "loss" in h]
        row["final_loss"] = logged[-1]["loss"] if logged else None
        if r["first"] is not None:
            row.update({k: v for k, v in r["first"].items() if not isinstance(v, torch.Tensor)})
        res["methods"][r["method"]] = row
    old, new = records[1]["first"], records[2]["first"]
    res["first_batch"] = first_batch_diff(old, new)
    med = {m: res["methods"][m]["step"]["median_s"] for m in METHODS}
    res["ratio"] = {"srpo_old/grpo": med["srpo_old"] / med["grpo"],
                    "srpo_runner/grpo": med["srpo_runner"] / med["grpo"],
                    "srpo_runner/srpo_old": med["srpo_runner"] / med["srpo_old"]}
    return res


def first_batch_diff(old: dict, new: dict) -> dict:
    """Max |full passes − runner| on the first batch (same weights, same completions): ``ℓ`` on the completion tokens,
    ``ℓ̃`` on the perception tokens, ``ℓ°`` on the reasoning tokens that have one, and the token advantages."""
    mask, roles = old["mask"], old["roles"]
    if not (torch.equal(mask, new["mask"]) and torch.equal(roles, new["roles"])):
        raise RuntimeError("bench_step: the full-pass and runner trainers saw different first batches")
    on = {"logp": mask, "logp_corrupt": mask & (roles == 1), "logp_ablated": mask & (roles == 2), "advantages": mask}
    out = {k: float((old[k] - new[k])[m].abs().max()) if bool(m.any()) else 0.0 for k, m in on.items()}
    # the spread of ℓ − ℓ̃ and ℓ − ℓ°: SRPO standardises its signals per role over the batch, so a rounding
    # difference in ℓ̃ or ℓ° moves the advantages more when the contrasts themselves are small (a random model)
    for k in ("logp_corrupt", "logp_ablated"):
        d = (old["logp"] - old[k])[on[k]]
        out[f"{k}_contrast_std"] = float(d.std()) if d.numel() > 1 else 0.0
    return out


def render(res: dict) -> str:
    rows = [("method", "median s", "p20 s", "p80 s", "gen+score s", "of which passes s", "loss fwd s",
             "optimizer s", "bwd+rest s", "/ GRPO")]
    grpo = res["methods"]["grpo"]["step"]["median_s"]
    for m in METHODS:
        r = res["methods"][m]
        rows.append((m, *(f"{r['step'][k]:.2f}" for k in ("median_s", "p20_s", "p80_s")), f"{r['gen_score_s']:.2f}",
                     f"{r['passes_s']:.2f}" if m != "grpo" else "-", f"{r['loss_fwd_s']:.2f}", f"{r['optim_s']:.2f}",
                     f"{r['rest_s']:.2f}",
                     f"{r['step']['median_s'] / grpo:.3f}"))
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows[:1] + [("---",) * len(rows[0])] + rows[1:])
    h, s, ratio = res["host"], res["shape"], res["ratio"]
    g = res["methods"]["grpo"]
    share = {m: res["methods"][m] for m in METHODS}
    dominant = (f"GRPO's step: loss forward {g['loss_fwd_s'] / g['step']['median_s']:.0%}, backward + rest "
                f"{g['rest_s'] / g['step']['median_s']:.0%}, optimizer {g['optim_s'] / g['step']['median_s']:.0%}, "
                f"generation (scripted) + scoring "
                f"{g['gen_score_s'] / g['step']['median_s']:.0%}; SRPO's passes "
                + ", ".join(f"{share[m]['passes_s'] / share[m]['step']['median_s']:.0%} of {m}'s step"
                            for m in METHODS[1:]))
    first = res["methods"]["srpo_runner"]
    return (f"host: {h['cpu_model']} ({h['torch_cpu_capability']}; {', '.join(h['cpu_flags'])}), "
            f"{h['torch_threads']} thread(s), load {h['load_average']}; torch {h['torch']}, trl {h['trl']}\n"
            f"shape: {s['batch']} completions ({s['batch'] // s['generations']} prompts × {s['generations']}), "
            f"image {s['image']} px, completions ≤ {s['completion']} tokens ({s['perception']:.0%} perception), "
            f"vocabulary {VOCAB:,}, hidden {s['hidden']}, {s['layers']} layers, ablation {s['mode']}, "
            f"num_iterations 1, beta 0; {s['steps']} steps per method after {s['warmup']} warm-up, interleaved; "
            f"first batch: {first.get('tokens')} completion tokens, {first.get('perception_tokens')} perception, "
            f"{first.get('reasoning_tokens')} reasoning\n\n{table}\n\n"
            f"SRPO step / GRPO step: before (full passes) {ratio['srpo_old/grpo']:.3f}, after (pass runner) "
            f"{ratio['srpo_runner/grpo']:.3f}; runner / full-pass step {ratio['srpo_runner/srpo_old']:.3f}\n"
            f"{dominant}\nfirst batch (same weights), max |full passes − runner|: "
            + ", ".join(f"{k} {v:.2e}" for k, v in res["first_batch"].items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="completions per step (per_device_train_batch_size)")
    p.add_argument("--generations", type=int, default=2, help="completions per prompt (num_generations)")
    p.add_argument("--image", type=int, default=392, help="image side in pixels (392: 196 image tokens)")
    p.add_argument("--completion", type=int, default=256, help="max completion tokens (each 0.75-1.0 of it)")
    p.add_argument("--perception", type=float, default=0.25)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mode", default="counterfactual", help="SRPO's ablation_mode")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1, help="steps per method discarded first")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test: {QUICK}")
    p.add_argument("--json")
    p.add_argument("--md")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    if a.batch % a.generations or a.steps < 1 or a.warmup < 0:
        p.error(f"--batch ({a.batch}) must be a multiple of --generations ({a.generations}), --steps ≥ 1, "
                f"--warmup ≥ 0")
    from srpo_core.bench.host import environment

    res = {"host": environment("cpu"), "shape": {k: getattr(a, k) for k in (
        "batch", "generations", "image", "completion", "perception", "hidden", "layers", "mode", "steps", "warmup")}}
    res.update(run(a))
    text = render(res)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write("## Whole TRL steps: GRPO vs SRPO with the full passes vs the pass runner\n\nGenerated by "
                    f"`python benchmarks/bench_step.py {' '.join(sys.argv[1:])}`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
