"""The whole study, phase by phase (a progress bar each): data, warm start, signal validity, RL runs, summary.

``run(QUICK)`` is one seed of GRPO and SRPO; ``run(FULL)`` every method over three seeds (issue 23's study v2).
Every random draw comes from the seeds in :class:`StudyConfig`, so a run is reproducible up to floating-point
non-determinism of multi-threaded CPU kernels (``torch.set_num_threads`` is fixed by the config) and to the CPU's
instruction set (the same seeds give different warm starts on AVX-512 and AVX2 hosts, issue 23).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time

import torch

from srpo_core.ablation import DEFAULT_ABLATION_MODE
from srpo_core.experiment import rl, signals
from srpo_core.experiment.evaluate import evaluate
from srpo_core.experiment.model import ModelSize, build_model, build_processor
from srpo_core.experiment.sft import warm_start
from srpo_core.experiment.task import generate

# two-sided 95% Student t quantiles for n − 1 degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Study v2 (issue 23), fixed before it ran: the warm start primes a shortcut (count / compare: the first empty
    cell perceived as the question's colour, p ``prime``) and a silent hallucination (read: a non-queried cell wrong,
    p ``prime``), other responses hallucinate with p ``hallucinated``; RL as :class:`rl.RLBudget`."""

    name: str = "quick"
    train_samples: int = 2048
    test_samples: int = 128
    signal_samples: int = 64
    sft_steps: int = 1500
    sft_batch: int = 16
    sft_lr: float = 3e-3
    hallucinated: float = 0.1
    prime: float = 0.6
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("grpo", "srpo")
    budget: rl.RLBudget = rl.RLBudget()
    size: ModelSize = ModelSize(hidden=128)
    sample_k: int = 4
    n_boot: int = 1000
    threads: int = 1
    data_seed: int = 0


QUICK = StudyConfig()
FULL = StudyConfig(name="full", test_samples=256, signal_samples=256, seeds=(0, 1, 2), methods=rl.METHODS)
# seconds-long smoke version for the tests
SMOKE = StudyConfig(name="smoke", train_samples=64, test_samples=8, signal_samples=4, sft_steps=4, sft_batch=8,
                    methods=("grpo", "srpo"), size=ModelSize(), budget=rl.RLBudget(steps=1, prompts=2, generations=2,
                                                                 max_completion_length=12), sample_k=2, n_boot=50)


def mean_ci(values: list[float]) -> dict:
    """Mean and a 95% t interval across seeds (``None`` bounds with one seed)."""
    xs = [float(v) for v in values if v is not None and v == v]
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci": [None, None], "n": 0, "values": []}
    m = sum(xs) / n
    if n == 1:
        return {"mean": m, "ci": [None, None], "n": 1, "values": xs}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": m, "ci": [m - h, m + h], "n": n, "values": xs}


EVAL_KEYS = ("accuracy", "accuracy_corrupt", "grounding_gap", "perception", "perception_corrupt", "length", "format",
             "halluc_changes_answer", "halluc_keeps_answer", "shortcut_rate", "silent_prime_rate",
             "sampled_accuracy", "sampled_perception", "sampled_halluc_changes_answer", "sampled_halluc_keeps_answer",
             "sampled_shortcut_rate", "sampled_silent_prime_rate")
LOG_KEYS = ("reward", "srpo/perception/w_mean", "srpo/perception/w_min", "srpo/perception/w_max",
            "srpo/reasoning/w_mean", "srpo/reasoning/w_min", "srpo/reasoning/w_max", "srpo/perception/mu",
            "srpo/reasoning/mu", "vppo/alpha_min", "vppo/alpha_max", "vppo/mask_fraction", "papo/kl_prcp",
            "entropy")


def summarise(runs: list[dict], methods) -> dict:
    """Per method: mean ± CI across seeds of the held-out metrics, logged statistics and step time vs GRPO."""
    grpo_step = {r["seed"]: _median(r["step_seconds"]) for r in runs if r["method"] == "grpo"}
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = {k: mean_ci([r["eval"].get(k) for r in rs]) for k in EVAL_KEYS}
        row.update({k: mean_ci([r["logged"].get(k) for r in rs]) for k in LOG_KEYS})
        row["step_seconds"] = mean_ci([_median(r["step_seconds"]) for r in rs])
        row["step_time_vs_grpo"] = mean_ci([_median(r["step_seconds"]) / grpo_step[r["seed"]] for r in rs
                                            if r["seed"] in grpo_step])
        row["accuracy_gain_vs_warm"] = None
        out[m] = row
    return out


def sampled_gain(warm: dict, runs: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Held-out sampled accuracy after RL minus the warm start's: mean over runs, and a 95% CI from a bootstrap that
    resamples the held-out prompts (paired: the same prompts for both) and, with several runs, the runs too."""
    import numpy as np

    base = warm.get("per_sample_sampled_accuracy")
    per = [r["eval"].get("per_sample_sampled_accuracy") for r in runs]
    if base is None or not per or any(p is None for p in per):
        return {"mean": None, "ci": [None, None], "n": 0, "values": []}
    d = np.array([np.asarray(p) - np.asarray(base) for p in per])  # [runs, prompts]
    rng = np.random.default_rng(seed)
    runs_pick = rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))
    prompts_pick = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))
    boots = np.array([d[runs_pick[i]][:, prompts_pick[i]].mean() for i in range(n_boot)])
    return {"mean": float(d.mean()), "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "n": int(d.shape[0]), "values": d.mean(1).tolist()}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def environment(cfg: StudyConfig) -> dict:
    import transformers
    import trl

    cpu, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else ""
    return {"cpu": cpu, "isa": isa, "node": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def run(cfg: StudyConfig = QUICK, *, progress: bool = True, note: str = "") -> dict:
    """Run the study; returns the JSON-ready result dict."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    threads = int(os.environ.get("OMP_NUM_THREADS", cfg.threads))  # a shared host may ask for fewer
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress)
    phases = {}
    with bar:
        task = bar.add_task("data + model", total=1)
        processor = build_processor()
        train = generate(cfg.train_samples, cfg.data_seed)
        test = generate(cfg.test_samples, cfg.data_seed + 1000)
        probe = generate(cfg.signal_samples, cfg.data_seed + 2000)
        torch.manual_seed(cfg.data_seed)
        model = build_model(processor.tokenizer, cfg.size, seed=cfg.data_seed)
        bar.advance(task)

        task = bar.add_task("warm start (SFT)", total=cfg.sft_steps)
        t = time.perf_counter()
        sft = warm_start(model, processor, train, steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr,
                         hallucinated=cfg.hallucinated, prime=cfg.prime, seed=cfg.data_seed,
                         progress=lambda: bar.advance(task))
        sft["eval"] = evaluate(model, processor, test, sample_k=cfg.sample_k)
        phases["warm_start"] = time.perf_counter() - t

        task = bar.add_task("signal validity", total=2)
        t = time.perf_counter()
        sig = signals.token_signals(model, processor, probe, seed=cfg.data_seed)
        bar.advance(task)
        validity = signals.analyse(sig, n_boot=cfg.n_boot, seed=cfg.data_seed)
        bar.advance(task)
        phases["signals"] = time.perf_counter() - t

        task = bar.add_task("RL runs", total=len(cfg.seeds) * len(cfg.methods))
        t = time.perf_counter()
        runs = []
        for seed in cfg.seeds:  # methods interleaved inside each seed, so host load drifts hit them alike
            for method in cfg.methods:
                bar.update(task, description=f"RL {method} seed {seed}")
                runs.append(rl.run_method(method, model, processor, train, test, seed=seed, budget=cfg.budget,
                                          sample_k=cfg.sample_k))
                bar.advance(task)
        phases["rl"] = time.perf_counter() - t
    summary = summarise(runs, cfg.methods)
    for m in summary:
        summary[m]["accuracy_gain_vs_warm"] = mean_ci([r["eval"]["accuracy"] - sft["eval"]["accuracy"]
                                                       for r in runs if r["method"] == m])
        summary[m]["sampled_gain_vs_warm"] = sampled_gain(sft["eval"], [r for r in runs if r["method"] == m])
    return {"config": _jsonable(dataclasses.asdict(cfg)), "environment": environment(cfg), "note": note,
            "srpo_ablation_mode": DEFAULT_ABLATION_MODE,  # the mode the "srpo" method ran with
            "warm_start": sft, "signals": validity, "rl": {"runs": runs, "summary": summary},
            "phase_seconds": phases, "wall_seconds": time.perf_counter() - t0,
            "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
