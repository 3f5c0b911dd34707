"""SRPO's extra passes (corrupted image ``ℓ̃``, ablated span ``ℓ°``) in the TRL adapter: the former full passes
through TRL's ``_get_per_token_logps_and_entropies`` (``old``) against :mod:`srpo_core.passes` (``new``: each pass
cut after the last token its signal reads, the LM head only there), issue 24's bar (new ≤ 0.6× old time and
≤ 1/4 of old peak memory).

    python benchmarks/bench_passes.py [--batch 8] [--rounds 5] [--json out.json] [--md out.md]
    python benchmarks/bench_passes.py --mem old|new [shape options]   # one call in a fresh process (internal)

The model is Qwen2-VL-shaped, scaled for a CPU and built from a config with random weights: vocabulary 151,936
(Qwen2-VL's, untied head), ``--hidden`` 512, ``--layers`` 4, 8 heads / 2 KV heads, M-RoPE; a 2-block vision tower.
Each prompt is one ``--image``-pixel square image (392: 196 image tokens) plus 40-80 text tokens (left padded,
~256 in all); each of its two responses has ``--completion`` × (0.75-1.0) tokens (right padded), the first
``--perception`` share of them (after one tag token) perception, the rest reasoning but the last 4 tokens. Both
ways run the trainer's own code (``SRPOPasses._srpo_passes`` with ``ℓ`` given, as with TRL's
``old_per_token_logps``, or with ``--with-clean`` computed too, as at ``num_iterations=1``; ``ablation_mode``
``--mode``, default the trainer's ``counterfactual``).

Time: ``--rounds`` interleaved rounds (old, new, old, new …) in this process after one warm-up of each; medians and
20/80 % quantiles. Memory: each way once in a fresh process, the peak RSS above the RSS right before the call
(``VmHWM`` reset through ``/proc/self/clear_refs`` after the model, the batch and a small warm-up call exist), as
``benchmarks/_mem.py``. ``prefix_s`` is the forward of the prompts alone (what reusing the prompt's keys/values in
the ablated pass could save at most). Host, ISA and load average go in the JSON (``benchmarks/host.py``). Run it on
a quiet core: ``OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_passes.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types

import torch

from srpo_core.bench.measure import _status_bytes

VOCAB = 151_936
IMAGE, VIDEO, V_START, V_END, PAD = 151_655, 151_656, 151_652, 151_653, 151_643


def build_model(hidden: int, layers: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    half = hidden // 8 // 2  # head_dim / 2 with 8 heads
    section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                         bos_token_id=PAD, eos_token_id=151_645, pad_token_id=PAD, tie_word_embeddings=False),
        vision_config=dict(depth=2, embed_dim=256, hidden_size=hidden, num_heads=4, mlp_ratio=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def build_batch(batch: int, image: int, completion: int, perception: float, seed: int = 0) -> dict:
    """``batch`` rows = ``batch // 2`` prompts × 2 responses, in the layout the trainer's passes take."""
    g = torch.Generator().manual_seed(seed)
    side = image // 14  # patches per side; 2×2 merged into one token
    n_img = (side // 2) ** 2
    prompts, pixel_values, grids = [], [], []
    for _ in range(batch // 2):
        text = torch.randint(1000, 150_000, (int(torch.randint(40, 81, (1,), generator=g)),), generator=g)
        cut = len(text) // 4
        prompt = torch.cat([text[:cut], torch.tensor([V_START]), torch.full((n_img,), IMAGE), torch.tensor([V_END]),
                            text[cut:]])
        px = torch.randn(side * side, 3 * 2 * 14 * 14, generator=g)
        for _ in range(2):
            prompts.append(prompt)
            pixel_values.append(px)
            grids.append(torch.tensor([1, side, side]))
    width_p = max(len(p) for p in prompts)
    prompt_ids = torch.full((batch, width_p), PAD)
    prompt_mask = torch.zeros(batch, width_p, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        prompt_ids[i, width_p - len(p):], prompt_mask[i, width_p - len(p):] = p, 1
    lengths = [int(completion * (0.75 + 0.25 * float(torch.rand(1, generator=g)))) for _ in range(batch)]
    completion_ids = torch.full((batch, completion), PAD)
    mask = torch.zeros(batch, completion, dtype=torch.bool)
    roles = torch.zeros(batch, completion, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_ids[i, :n] = torch.randint(1000, 150_000, (n,), generator=g)
        mask[i, :n] = True
        span = max(1, round(perception * n))
        roles[i, 1:1 + span] = 1  # perception after one tag token
        roles[i, 1 + span:n - 4] = 2  # reasoning, then a few closing tokens
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    out = {"pixel_values": torch.cat(pixel_values), "image_grid_thw": torch.stack(grids), "num_images": [1] * batch,
           "mm_token_type_ids": (input_ids == IMAGE).long()}
    return dict(out=out, input_ids=input_ids, attention_mask=attention_mask, width_p=width_p, roles=roles, mask=mask,
                group_ids=torch.arange(batch) // 2)


def make_host(model, runner: bool, mode: str):
    from srpo_core.adapters._trl_passes import pass_host
    from srpo_core.adapters.trl import SRPOTrainerOptions

    processing = types.SimpleNamespace(pad_token_id=PAD)  # no image_processor: Qwen-VL's defaults
    return pass_host(model, processing, srpo_options=SRPOTrainerOptions(ablation_mode=mode), pass_runner=runner)


def call(host, b: dict, logp: torch.Tensor, batch_size: int):
    with torch.no_grad():
        return host._srpo_passes(b["out"], b["input_ids"], b["attention_mask"], b["width_p"], b["roles"], b["mask"],
                                 b["group_ids"], batch_size, logp=logp)



def setup(a):
    model = build_model(a.hidden, a.layers)
    b = build_batch(a.batch, a.image, a.completion, a.perception)
    # ℓ as TRL's old_per_token_logps would give it (not read by the passes); --with-clean: the adapter computes it
    logp = None if a.with_clean else torch.zeros(b["mask"].shape)
    small = build_batch(2, 56, 16, a.perception, seed=1)
    return model, b, logp, small


def mem(a) -> dict:
    import psutil

    model, b, logp, small = setup(a)
    host = make_host(model, a.mem == "new", a.mode)
    call(host, small, None, a.batch_size)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = psutil.Process().memory_info().rss
    call(host, b, logp, a.batch_size)
    return {"way": a.mem, "peak_mb": (_status_bytes("VmHWM:") - rss0) / 2 ** 20}


def quantiles(xs):
    q = statistics.quantiles(xs, n=5) if len(xs) > 1 else [xs[0]] * 4
    return {"median_s": statistics.median(xs), "p20_s": q[0], "p80_s": q[3], "rounds": xs}


def timing(a) -> dict:
    model, b, logp, small = setup(a)
    hosts = {way: make_host(model, way == "new", a.mode) for way in ("old", "new")}
    for host in hosts.values():
        call(host, small, None, a.batch_size)
    times = {"old": [], "new": []}
    results = {}
    for _ in range(a.rounds):
        for way, host in hosts.items():
            t0 = time.perf_counter()
            results[way] = call(host, b, logp, a.batch_size)
            times[way].append(time.perf_counter() - t0)
    old, new = results["old"], results["new"]
    per, rea = b["roles"] == 1, (b["roles"] == 2) & old.has_value
    diff = max(float((old.logp - new.logp)[b["mask"]].abs().max()),
               float((old.logp_corrupt - new.logp_corrupt)[per].abs().max()),
               float((old.logp_ablated - new.logp_ablated)[rea].abs().max()))
    from srpo_core import passes

    prompt_only = b["attention_mask"][:, :b["width_p"]]
    needed = torch.zeros_like(prompt_only, dtype=torch.bool)
    needed[:, -1] = True
    t0 = time.perf_counter()
    with torch.no_grad():
        passes.hidden_states(model, b["input_ids"][:, :b["width_p"]], prompt_only, needed,
                             model_kwargs=b["out"] | {"mm_token_type_ids": b["out"]["mm_token_type_ids"][
                                 :, :b["width_p"]]}, batch_size=a.batch_size, num_images=b["out"]["num_images"])
    prefix = time.perf_counter() - t0
    return {"old": quantiles(times["old"]), "new": quantiles(times["new"]), "max_abs_diff": diff,
            "prefix_s": prefix, "tokens": {"prompt": b["width_p"], "completion": b["mask"].shape[1],
                                           "perception": int(per.sum()), "reasoning": int((b["roles"] == 2).sum()),
                                           "valid_completion": int(b["mask"].sum())}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward (TRL's per-device batch size)")
    p.add_argument("--image", type=int, default=392)
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--perception", type=float, default=0.25)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mode", default="counterfactual")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--with-clean", action="store_true", help="also the clean pass ℓ (TRL at num_iterations=1)")
    p.add_argument("--no-mem", action="store_true")
    p.add_argument("--mem", choices=("old", "new"))
    p.add_argument("--json")
    p.add_argument("--md")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    if a.mem:
        print(json.dumps(mem(a)))
        return
    from srpo_core.bench.host import environment

    res = {"host": environment("cpu"), "shape": {k: getattr(a, k) for k in ("batch", "batch_size", "image",
                                                                            "completion", "perception", "hidden",
                                                                            "layers", "mode", "with_clean", "rounds")}}
    res.update(timing(a))
    if not a.no_mem:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in res["shape"].items()
                 if v is not None and k not in ("rounds", "with_clean")] + ["--with-clean"] * a.with_clean
        for way in ("old", "new"):
            line = subprocess.run([sys.executable, __file__, "--mem", way, *flags], check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
            res[way]["peak_mb"] = json.loads(line)["peak_mb"]
    res["time_ratio"] = res["new"]["median_s"] / res["old"]["median_s"]
    if "peak_mb" in res["new"]:
        res["mem_ratio"] = res["new"]["peak_mb"] / res["old"]["peak_mb"]
    res["command"] = "python benchmarks/bench_passes.py " + " ".join(sys.argv[1:])
    text = render(res)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")


def render(res: dict) -> str:
    """The markdown record of one run: command, host (CPU, ISA flags, threads, load), the table, the ratios."""
    rows = [("way", "median s", "p20 s", "p80 s", "peak MiB")]
    for way in ("old", "new"):
        r = res[way]
        rows.append((way, f"{r['median_s']:.2f}", f"{r['p20_s']:.2f}", f"{r['p80_s']:.2f}",
                     f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"))
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows[:1] + [("---",) * 5] + rows[1:])
    h = res["host"]
    return (f"## SRPO's extra passes: TRL's full passes (old) vs the pass runner (new)\n\n"
            f"Generated by `{res.get('command', 'python benchmarks/bench_passes.py')}`. Host: {h['cpu_model']} "
            f"(torch capability {h['torch_cpu_capability']}; flags {', '.join(h.get('cpu_flags') or []) or '-'}), "
            f"{h['torch_threads']} thread(s), load average {h['load_average']}. Tokens: {res['tokens']}.\n\n"
            f"{table}\n\nnew/old time {res['time_ratio']:.3f}"
            + (f", peak memory {res['mem_ratio']:.3f}" if "mem_ratio" in res else "")
            + f"; prompt-only forward (KV-reuse bound) {res['prefix_s']:.2f} s; max |old − new| "
            f"{res['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
