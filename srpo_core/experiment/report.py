"""``docs/experiment.md`` and its figure, generated from a study's JSON (never from numbers typed by hand)."""

from __future__ import annotations


def _fmt(cell, digits: int = 3) -> str:
    if cell is None or cell.get("mean") is None:
        return "—"
    m, (lo, hi) = cell["mean"], cell["ci"]
    if lo is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def print_summary(result: dict, console=None) -> None:
    """A terminal table of the RL summary (held-out metrics per method)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"srpo-core experiment ({result['config']['name']}), wall {result['wall_seconds']:.0f} s")
    cols = ("accuracy", "accuracy_corrupt", "grounding_gap", "perception", "length", "step_time_vs_grpo")
    table.add_column("method")
    for c in cols:
        table.add_column(c, justify="right")
    for method, row in result["rl"]["summary"].items():
        table.add_row(method, *(_fmt(row[c]) for c in cols))
    console.print(table)


SIGNAL_CLAIMS = (
    # (signal, comparison, claim in words, expected sign of diff)
    ("visual_k3", "perception_vs_reasoning", "k3 visual dependency is higher on perception than on reasoning tokens",
     1),
    ("visual_k3", "perception_vs_other", "k3 visual dependency is higher on perception than on OTHER tokens", 1),
    ("visual_kl", "perception_vs_reasoning", "KL visual dependency is higher on perception than on reasoning tokens",
     1),
    ("visual_js", "perception_vs_reasoning", "JS visual dependency is higher on perception than on reasoning tokens",
     1),
    ("visual_k3", "grounded_vs_hallucinated_span", "k3 is higher on grounded than on hallucinated perception spans", 1),
    ("visual_k3", "grounded_vs_hallucinated_colour", "k3 is higher on grounded than on hallucinated colour words", 1),
    ("visual_kl", "grounded_vs_hallucinated_colour", "KL is higher on grounded than on hallucinated colour words", 1),
    ("visual_js", "grounded_vs_hallucinated_colour", "JS is higher on grounded than on hallucinated colour words", 1),
    ("visual_logratio", "grounded_vs_hallucinated_colour",
     "the signed ℓ − ℓ̃ is higher on grounded than on hallucinated colour words", 1),
    *((f"reasoning_{m}_logratio", "fact_vs_nonfact",
       f"ℓ − ℓ° ({m}) is higher on reasoning tokens that use a perceived fact", 1) for m in ("mask", "drop",
                                                                                           "counterfactual")),
    *((f"reasoning_{m}_logratio", "direct_vs_nonfact",
       f"ℓ − ℓ° ({m}) is higher on reasoning tokens read directly off the span", 1) for m in ("mask", "drop",
                                                                                             "counterfactual")),
    ("reasoning_drop_no_tags_logratio", "fact_vs_nonfact", "the same with the span and its tags dropped", 1),
    ("reasoning_mask_kl", "fact_vs_nonfact", "KL(clean ‖ masked) is higher on reasoning tokens that use a perceived "
     "fact", 1),
)
MODES = ("drop", "mask", "counterfactual")


def verdict_of(effect: dict, sign: int) -> str:
    lo, hi = effect["diff_ci"]
    if lo is None or hi is None or lo != lo or hi != hi:
        return "not measurable"
    low, high = sorted((sign * lo, sign * hi))  # the interval of sign · diff
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "not resolved (CI spans 0)"


def _num(x, digits=3):
    return "—" if x is None or x != x else f"{x:.{digits}g}"


def _ci(pair, digits=3):
    return f"[{_num(pair[0], digits)}, {_num(pair[1], digits)}]"


def signal_rows(result: dict) -> list[tuple]:
    rows = []
    sig = result["signals"]
    for name, comp, claim, sign in SIGNAL_CLAIMS:
        e = sig.get(name, {}).get(comp)
        if e is None:
            continue
        rows.append((claim, name, comp, e, verdict_of(e, sign)))
    return rows


def _rl_comparison(result: dict, method: str, metric: str) -> dict | None:
    """Paired per-seed difference ``method − grpo`` of a held-out metric, mean and t CI (None with < 2 seeds)."""
    from srpo_core.experiment.study import mean_ci

    runs = result["rl"]["runs"]
    base = {r["seed"]: r["eval"][metric] for r in runs if r["method"] == "grpo"}
    diffs = [r["eval"][metric] - base[r["seed"]] for r in runs if r["method"] == method and r["seed"] in base]
    return mean_ci(diffs) if diffs else None


# (JSON key, column title, +1 if higher is better, -1 if lower is better) of the method − GRPO table
VS_GRPO = (("sampled_accuracy", "sampled acc.", 1), ("accuracy", "greedy acc.", 1),
           ("sampled_perception", "cell acc. (sampled)", 1),
           ("sampled_halluc_changes_answer", "halluc. changes answer", -1),
           ("sampled_halluc_keeps_answer", "halluc. keeps answer", -1), ("grounding_gap", "grounding gap", 1))


def _direction(c: dict) -> str | None:
    """``"higher"`` / ``"lower"`` when the interval excludes 0, else ``None`` (also with one seed: no interval)."""
    lo, hi = c["ci"]
    if lo is None or hi is None:
        return None
    return "higher" if lo > 0 else "lower" if hi < 0 else None


def vs_grpo_table(result: dict) -> list[str]:
    """Markdown rows: each method's paired per-seed difference to GRPO on the held-out metrics of ``VS_GRPO``."""
    methods = [m for m in result["rl"]["summary"] if m != "grpo"]
    lines = ["| method − grpo | " + " | ".join(t for _, t, _ in VS_GRPO) + " |",
             "|---|" + "---:|" * len(VS_GRPO)]
    for m in methods:
        cells = []
        for key, _, _ in VS_GRPO:
            c = _rl_comparison(result, m, key)
            cells.append("—" if c is None or c["mean"] is None else
                         f"{c['mean']:+.3f}" + ("" if c["ci"][0] is None else
                                                f" [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _method_sentence(result: dict, method: str) -> str:
    """One sentence per method from the ``VS_GRPO`` differences: which intervals exclude 0, better or worse."""
    seeds = len(result["config"]["seeds"])
    if seeds < 2:
        c = _rl_comparison(result, method, "sampled_accuracy")
        shown = "—" if c is None or c["mean"] is None else f"{c['mean']:+.3f}"
        return (f"{method} − grpo held-out sampled accuracy: {shown} from one seed — no interval, so no claim "
                "either way.")
    better, worse = [], []
    for key, title, sign in VS_GRPO:
        c = _rl_comparison(result, method, key)
        d = None if c is None or c["mean"] is None else _direction(c)
        if d is not None:
            (better if (d == "higher") == (sign > 0) else worse).append(f"{title} {c['mean']:+.3f}")
    if not better and not worse:
        return (f"{method} vs grpo: no held-out metric of the table differs ({seeds} seeds, every 95% t interval "
                "spans 0).")
    parts = []
    if better:
        parts.append("better than GRPO on " + ", ".join(better))
    if worse:
        parts.append("worse on " + ", ".join(worse))
    return f"{method} vs grpo ({seeds} seeds, 95% t interval excludes 0): " + "; ".join(parts) + "."


def verdict(result: dict) -> list[str]:
    """Plain sentences, each derived from the JSON by a fixed rule (no hand-typed numbers)."""
    out = []
    rows = signal_rows(result)
    sup = [r[0] for r in rows if r[4] == "supported"]
    con = [r[0] for r in rows if r[4] == "contradicted"]
    unr = [r[0] for r in rows if r[4].startswith("not")]
    if sup:
        out.append("Supported by the signal-validity data (95% bootstrap CI of the difference excludes 0): "
                   + "; ".join(sup) + ".")
    if con:
        out.append("Contradicted (the CI excludes 0 on the other side): " + "; ".join(con) + ".")
    if unr:
        out.append("Not resolved at this sample size: " + "; ".join(unr) + ".")
    verdicts = {(r[1], r[2]): r[4] for r in rows}
    sig = result["signals"]
    ds = {m: sig.get(f"reasoning_{m}_logratio", {}).get("fact_vs_nonfact", {}).get("d") for m in MODES}
    ds = {m: d for m, d in ds.items() if d is not None and d == d}
    if ds:
        best = max(ds, key=ds.get)
        used = result.get("srpo_ablation_mode", "mask")  # runs before the key existed used `mask`
        out.append("Reasoning contrast modes (Cohen's d, fact-using vs other reasoning tokens): "
                   + ", ".join(f"{m} {d:+.2f}" for m, d in ds.items()) + f". The largest here is `{best}`. "
                   f"The `srpo` method of this run used `{used}`; each other mode runs as `srpo_<mode>`. The "
                   "trainer's default mode is chosen from this table by the rule of docs/decisions.md D235 (a "
                   "toy-scale finding).")
    if verdicts.get(("reasoning_drop_logratio", "fact_vs_nonfact")) == "contradicted":
        shift = {m: sig[f"reasoning_{m}_logratio"]["fact_vs_nonfact"]["mean_b"] for m in MODES
                 if f"reasoning_{m}_logratio" in sig}
        out.append("With the span dropped, the words that use no fact lose more probability than the fact words "
                   "(mean `ℓ − ℓ°` on them: " + ", ".join(f"{m} {v:.2f}" for m, v in shift.items())
                   + " nats): `drop` renumbers every later token, so its contrast mostly measures how far the "
                   "shortened context is from the training distribution.")
    signed = result["signals"].get("visual_logratio", {}).get("grounded_vs_hallucinated_colour", {})
    if verdicts.get(("visual_logratio", "grounded_vs_hallucinated_colour")) == "supported" and \
            signed.get("mean_b", 0) < 0 and any(
            verdicts.get((f"visual_{k}", "grounded_vs_hallucinated_colour")) != "supported" for k in ("k3", "kl")):
        out.append("A reading, not a measurement: k3/KL/JS are magnitudes, so a hallucinated colour word that "
                   f"gains probability under corruption (their mean `ℓ − ℓ̃` is {signed['mean_b']:.2f} here) counts "
                   "like a grounded word that loses it; only the signed `ℓ − ℓ̃` separates the two in these data.")
    summary = result["rl"]["summary"]
    g = summary.get("grpo", {}).get("sampled_gain_vs_warm")
    if g and g.get("mean") is not None:
        lo, hi = g["ci"]
        ok = lo is not None and lo > 0
        out.append(f"Can the study tell methods apart? GRPO's held-out sampled accuracy after RL minus the warm "
                   f"start's: {g['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] (95% bootstrap over held-out prompts"
                   + (" and seeds" if g["n"] > 1 else ", one seed") + "): "
                   + ("the interval excludes 0, so RL moves the policy here." if ok else
                      "the interval does not exclude 0, so this run cannot show RL moving the policy."))
    gains = {m: row["accuracy_gain_vs_warm"]["mean"] for m, row in summary.items()
             if row["accuracy_gain_vs_warm"]["mean"] is not None}
    if gains and all(g < 0 for g in gains.values()):
        out.append("Every method, GRPO included, ended below the warm start on held-out accuracy: at this budget "
                   "and learning rate the RL phase degraded the policy, so the method differences below are "
                   "differences in how much it degraded.")
    faster = [m for m, row in summary.items() if m != "grpo" and row["step_time_vs_grpo"]["mean"] is not None
              and row["step_time_vs_grpo"]["mean"] < 1.0]
    if faster:
        out.append(f"Step times are noisy here: {', '.join(faster)} ran faster than GRPO per step although each "
                   "does strictly more work (an extra corrupted-image pass), so read the step-time column as "
                   "indicative only.")
    methods = [m for m in summary if m != "grpo"]
    silent = _rl_comparison(result, "srpo", "sampled_halluc_keeps_answer") if "srpo" in summary else None
    if silent is not None and silent["mean"] is not None and silent["ci"][0] is not None:
        lo, hi = silent["ci"]
        reading = ("SRPO reduces it here" if hi < 0 else "SRPO increases it here" if lo > 0 else
                   "no reduction shown" + ("; the point estimate goes the other way" if silent["mean"] > 0 else ""))
        out.append("The question study v2 was built to ask: does SRPO's role-aware credit reduce the hallucination "
                   "that the answer reward cannot see (a wrong perceived cell that keeps the answer)? srpo − grpo: "
                   f"{silent['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] over {silent['n']} seeds: {reading}.")
    for method in methods:
        out.append(_method_sentence(result, method))
    if len(result["config"]["seeds"]) > 1 and methods:
        comps = [c for m in methods for key, _, _ in VS_GRPO
                 if (c := _rl_comparison(result, m, key)) is not None and c["mean"] is not None]
        hits = sum(_direction(c) is not None for c in comps)
        out.append(f"Multiplicity: the method − GRPO table holds {len(comps)} intervals at 95% each; with no real "
                   f"difference anywhere about {0.05 * len(comps):.1f} would exclude 0 by chance, and {hits} do. "
                   "Read a single excluded interval as a lead to re-test, not a finding.")
    return out


def plot(result: dict, path: str) -> None:
    """Three panels: signal effect sizes (Cohen's d, bootstrap CI), held-out metrics per method, reward curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    rows = signal_rows(result)
    ax = axes[0]
    for i, (_claim, _name, _comp, e, _v) in enumerate(rows):
        lo, hi = e["d_ci"]
        ax.errorbar(e["d"], i, xerr=[[e["d"] - lo], [hi - e["d"]]], fmt="o", color="C0" if e["d"] > 0 else "C3")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{n.replace('visual_', 'V:').replace('reasoning_', 'R:')} {c}"
                                     for _, n, c, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Cohen's d (A − B), 95% cluster-bootstrap CI")
    ax.set_title("signal validity (warm-started model)")

    ax = axes[1]
    summary = result["rl"]["summary"]
    methods = list(summary)
    metrics = ("accuracy", "sampled_accuracy", "sampled_perception")
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        means = [summary[m][metric]["mean"] or 0.0 for m in methods]
        errs = [[(summary[m][metric]["mean"] - summary[m][metric]["ci"][0]) if summary[m][metric]["ci"][0]
                 is not None else 0 for m in methods],
                [(summary[m][metric]["ci"][1] - summary[m][metric]["mean"]) if summary[m][metric]["ci"][1]
                 is not None else 0 for m in methods]]
        ax.bar([i + k * width for i in range(len(methods))], means, width, yerr=errs, label=metric)
    warm = result["warm_start"]["eval"].get("sampled_accuracy", result["warm_start"]["eval"]["accuracy"])
    ax.axhline(warm, color="k", ls="--", lw=0.8, label="warm-start sampled accuracy")
    ax.set_xticks([i + width for i in range(len(methods))], methods, rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(f"held-out after RL ({len(result['config']['seeds'])} seed(s))")

    ax = axes[2]
    for i, m in enumerate(methods):
        curves = [r["reward_curve"] for r in result["rl"]["runs"] if r["method"] == m]
        if curves:
            n = min(len(c) for c in curves)
            mean = [sum(c[j] for c in curves) / len(curves) for j in range(n)]
            ax.plot(range(1, n + 1), mean, label=m, color=f"C{i}")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward (answer correct)")
    ax.legend(fontsize=7)
    ax.set_title("training reward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMPARISON_WORDS = {
    "perception_vs_reasoning": ("perception", "reasoning"),
    "perception_vs_other": ("perception", "OTHER"),
    "grounded_vs_hallucinated_span": ("grounded spans", "hallucinated spans"),
    "grounded_vs_hallucinated_colour": ("grounded colour words", "hallucinated (changed) colour words"),
    "fact_vs_nonfact": ("uses a fact", "does not"),
    "direct_vs_nonfact": ("read off the span", "uses no fact"),
    "fact_vs_nonfact_grounded": ("uses a fact (grounded rows)", "does not"),
}


def _pct(x):
    return "—" if x is None else f"{x:.3f}"


def signal_table(result: dict) -> list[str]:
    """Drop, mask and counterfactual side by side: Cohen's d [95% CI] of each reasoning comparison, and the mean
    ``ℓ − ℓ°`` on reasoning tokens that use no fact (how far the ablated context moves the template words)."""
    sig = result["signals"]
    lines = ["| ℓ − ℓ° (logratio) | " + " | ".join(f"`{m}`" for m in MODES) + " |",
             "|---|" + "---:|" * len(MODES)]
    for comp, words in (("fact_vs_nonfact", "d: uses a fact vs not"),
                        ("direct_vs_nonfact", "d: read directly off the span vs no fact"),
                        ("fact_vs_nonfact_grounded", "d: uses a fact vs not, grounded rows")):
        cells = []
        for m in MODES:
            e = sig.get(f"reasoning_{m}_logratio", {}).get(comp)
            cells.append("—" if e is None else f"{_num(e['d'], 2)} {_ci(e['d_ci'], 2)}")
        lines.append(f"| {words} | " + " | ".join(cells) + " |")
    for key, words in (("mean_a", "mean on fact-using tokens (nats)"), ("mean_b", "mean on no-fact tokens (nats)")):
        cells = [_num(sig.get(f"reasoning_{m}_logratio", {}).get("fact_vs_nonfact", {}).get(key)) for m in MODES]
        lines.append(f"| {words} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict, png_name: str | None = "experiment.png", source: str = "docs/experiment_full.json") -> str:
    cfg, env = result["config"], result["environment"]
    quick = cfg["name"] != "full"
    sft = result["warm_start"]
    b = cfg["budget"]
    lines = ["# The miniature grounded-reasoning study, v2 (issues 13 and 23)", "",
             "Generated by `python -m srpo_core.experiment.report` from "
             f"`{source}` — edit the code, not this page.", ""]
    if quick:
        lines += ["> **This page shows a `--quick` run (one seed of GRPO and SRPO).** The full study "
                  "(`srpo-core experiment --json docs/experiment_full.json --plot docs/experiment.png`, every "
                  "method, three seeds) has not been run on this code yet; nothing below is from it.", ""]
    host = f"{env.get('cpu') or env.get('processor') or env['machine']}"
    lines += [f"- Run: `{cfg['name']}`, finished {result['finished_utc']} UTC, wall {result['wall_seconds']:.0f} s "
              f"(warm start {result['phase_seconds']['warm_start']:.0f} s, signals "
              f"{result['phase_seconds']['signals']:.0f} s, RL {result['phase_seconds']['rl']:.0f} s).",
              f"- Host: {host} ({env.get('isa') or 'ISA not recorded'}), {env['cpu_count']} CPUs, {env['threads']} "
              f"torch thread(s), torch {env['torch']}, transformers {env['transformers']}, TRL {env['trl']}. "
              f"{result.get('note') or ''}".rstrip(),
              "- **The numbers move across CPUs**: the same code and seeds gave a warm-start accuracy of 0.758 on an "
              "AVX-512 host and 0.531 on an AVX2 one (issue 23); compare runs from one host only.",
              f"- Task: 56×56 images, 2×2 cells (one merged visual token each), colours red/green/blue/none; "
              f"questions count / compare / read; {cfg['train_samples']} train, {cfg['test_samples']} held-out, "
              f"{cfg['signal_samples']} signal-probe samples.",
              f"- Model: tiny Qwen2-VL from a config (hidden {cfg['size']['hidden']}, {cfg['size']['layers']} layers, "
              f"vision depth {cfg['size']['vision_depth']}), random init, word-level tokenizer built locally.",
              f"- Warm start: {cfg['sft_steps']} AdamW steps × {cfg['sft_batch']} responses, lr {cfg['sft_lr']}. "
              f"Two primes (issue 23): count / compare questions perceive the first empty cell as the question's "
              f"colour with p {cfg.get('prime', 0)} (the *shortcut*, it changes the answer); read questions perceive "
              f"one non-queried cell wrong with p {cfg.get('prime', 0)} (the *silent* prime, the answer and so the "
              f"reward cannot see it); other responses have 1-2 wrong cells with p {cfg['hallucinated']}.",
              f"- RL: {b['steps']} steps × {b['prompts']} prompts × {b['generations']} generations, lr {b['lr']} "
              f"({b.get('lr_scheduler', 'linear')}), KL β {b.get('beta', 0)} to the warm start, temperature "
              f"{b['temperature']}, reward = answer correct; seeds {cfg['seeds']}. Same data, budget and seeds for "
              "every method; fixed before the run, no method tuned.",
              f"- Evaluation on the held-out prompts: greedy, and {cfg.get('sample_k', 0)} samples per prompt at "
              "temperature 1 (*sampled*).", ""]
    if png_name:
        lines += [f"![summary]({png_name})", ""]
    ev = sft["eval"]
    lines += ["## Warm start", "",
              f"SFT loss {sft['loss'][0]:.3f} → {sft['loss'][-1]:.3f}. Held-out greedy: accuracy "
              f"{ev['accuracy']:.3f}, with a corrupted image {ev['accuracy_corrupt']:.3f} (gap "
              f"{ev['grounding_gap']:+.3f}), cell accuracy {ev['perception']:.3f}, {ev['length']:.1f} words. "
              f"Sampled: accuracy {_pct(ev.get('sampled_accuracy'))}, cell accuracy "
              f"{_pct(ev.get('sampled_perception'))}; hallucination that changes the answer "
              f"{_pct(ev.get('sampled_halluc_changes_answer'))}, that keeps it "
              f"{_pct(ev.get('sampled_halluc_keeps_answer'))}; shortcut rate {_pct(ev.get('sampled_shortcut_rate'))}, "
              f"silent-prime rate {_pct(ev.get('sampled_silent_prime_rate'))}.", "",
              "## Signal validity (before RL, warm-started model)", "",
              "Teacher-forced grounded and hallucinated responses of each probe sample; corrupted image = the SRPO "
              "trainer's default (each merged 28×28 token blacked with p = 0.5, one mask per sample). The reasoning "
              "contrast `ℓ − ℓ°` in the three modes of `ablate_span`: `drop` (span removed, later tokens renumbered), "
              "`mask` (span hidden, original M-RoPE positions; the token after the span gets no value, D180) and "
              "`counterfactual` (span replaced by the same-rank response's span of the next probe sample, realigned "
              "by the offset from the span's end). *Fact-using* tokens: reasoning words whose value the perceived "
              "cells decide (the `so` that closes a count's cell list included); *read directly*: the cells listed, "
              "the counts and the colour read, not the answers derived from them. "
              f"Cohen's d with 95% CIs from a bootstrap over samples ({cfg['n_boot']} resamples). Counts: "
              f"{result['signals']['counts']}.", "",
              *signal_table(result), "",
              "Every comparison:", "",
              "| claim | signal | A | B | mean A | mean B | A − B [95% CI] | d [95% CI] | verdict |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for claim, name, comp, e, v in signal_rows(result):
        a, bb = COMPARISON_WORDS.get(comp, (comp, ""))
        lines.append(f"| {claim} | `{name}` | {a} | {bb} | {_num(e['mean_a'])} | {_num(e['mean_b'])} | "
                     f"{_num(e['diff'])} {_ci(e['diff_ci'])} | {_num(e['d'])} {_ci(e['d_ci'])} | {v} |")
    summary = result["rl"]["summary"]
    lines += ["", "## RL", "",
              "Held-out metrics after RL (mean [95% t CI] across seeds; one seed gives no interval). Δ sampled vs "
              "warm: paired difference over the same held-out prompts, 95% bootstrap over prompts (and seeds). "
              "Hallucination: share of sampled responses with a wrong perception that changes the answer / keeps "
              "it. Step time: median seconds per step relative to GRPO's in the same seed (shared host: "
              "indicative).", "",
              "| method | greedy acc. | sampled acc. | Δ sampled vs warm | cell acc. (sampled) | halluc. changes "
              "answer | halluc. keeps answer | shortcut | silent prime | grounding gap | step time / GRPO |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    wrow = ["warm start", _pct(ev["accuracy"]), _pct(ev.get("sampled_accuracy")), "—",
            _pct(ev.get("sampled_perception")), _pct(ev.get("sampled_halluc_changes_answer")),
            _pct(ev.get("sampled_halluc_keeps_answer")), _pct(ev.get("sampled_shortcut_rate")),
            _pct(ev.get("sampled_silent_prime_rate")), f"{ev['grounding_gap']:+.3f}", "—"]
    lines.append("| " + " | ".join(wrow) + " |")
    for m, row in summary.items():
        lines.append(f"| {m} | {_fmt(row['accuracy'])} | {_fmt(row['sampled_accuracy'])} | "
                     f"{_fmt(row.get('sampled_gain_vs_warm'))} | {_fmt(row['sampled_perception'])} | "
                     f"{_fmt(row['sampled_halluc_changes_answer'])} | {_fmt(row['sampled_halluc_keeps_answer'])} | "
                     f"{_fmt(row['sampled_shortcut_rate'])} | {_fmt(row['sampled_silent_prime_rate'])} | "
                     f"{_fmt(row['grounding_gap'])} | {_fmt(row['step_time_vs_grpo'], 2)} |")
    lines += ["", "Token weights per role, averaged over RL steps (SRPO variants; each trajectory's weights have "
              "mean 1), and the presets' own statistics:", "",
              "| method | perception w mean (min–max) | reasoning w mean (min–max) | train reward | other |",
              "|---|---:|---:|---:|---|"]
    for m, row in summary.items():
        def wm(role, row=row):
            if row[f"srpo/{role}/w_mean"]["mean"] is None:
                return "—"
            return (f"{row[f'srpo/{role}/w_mean']['mean']:.3f} ({row[f'srpo/{role}/w_min']['mean']:.3f}–"
                    f"{row[f'srpo/{role}/w_max']['mean']:.3f})")
        other = ", ".join(f"{k} {row[k]['mean']:.3g}" for k in ("vppo/alpha_min", "vppo/alpha_max",
                                                                 "vppo/mask_fraction", "papo/kl_prcp")
                          if row[k]["mean"] is not None)
        lines.append(f"| {m} | {wm('perception')} | {wm('reasoning')} | {_fmt(row['reward'])} | {other} |")
    lines += ["", "Each method minus GRPO on the same seed (mean [95% t CI] across seeds; lower is better for the "
              "hallucination columns):", "", *vs_grpo_table(result), "", "## Verdict", ""]
    lines += [f"- {s}" for s in verdict(result)]
    lines += [f"- Scale: a hidden-{cfg['size']['hidden']} two-layer model, a synthetic 4-cell task, "
              f"{len(cfg['seeds'])} seed(s) and {b['steps']} RL steps. Whatever holds here is evidence "
              "about the signals' mechanics, not about SRPO on real VLMs.", ""]
    return "\n".join(lines)


def write_docs(result: dict, md_path: str, png_path: str | None, source: str = "docs/experiment_full.json") -> None:
    import pathlib

    if png_path:
        plot(result, png_path)
    text = markdown(result, pathlib.Path(png_path).name if png_path else None, source)
    pathlib.Path(md_path).write_text(text + "\n", encoding="utf-8")


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m srpo_core.experiment.report",
                                     description="docs/experiment.md and its figure from a study's JSON")
    parser.add_argument("json")
    parser.add_argument("--md", default="docs/experiment.md")
    parser.add_argument("--png", default="docs/experiment.png")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        result = json.load(f)
    write_docs(result, args.md, args.png, source=args.json)
    print(f"wrote {args.md} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
