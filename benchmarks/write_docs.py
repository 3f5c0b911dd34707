"""Write ``docs/benchmarks.md`` and the README's performance block from the JSON of real runs. No number is typed by
hand: every number on the page comes from the JSON files named on the page.

    python benchmarks/write_docs.py docs/benchmarks.json [--linear docs/benchmarks_linear.json ...]
                                    [--out docs/benchmarks.md] [--readme README.md] [--plot benchmarks.png]

``docs/benchmarks.json`` comes from ``srpo-core bench --json`` (``make bench-docs``); each
``docs/benchmarks_linear*.json`` from one ``python benchmarks/linear_table.py`` run (issue 4's table over N, H, V and
dtypes; decision D64). The README block between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced; the
rest of the README is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:.1f}"


def _env_line(env: dict) -> str:
    anchors = ", ".join(f"{k} {env[k]}" for k in ("trl", "cut_cross_entropy", "liger_kernel") if env.get(k))
    cpu = env.get("processor") or env.get("machine")
    return (f"{env['date']} · {env['device']} ({cpu}, {env['cpu_count']} cores, {env['torch_threads']} torch "
            f"threads) · Python {env['python']} · torch {env['torch']} · triton {env.get('triton')} · {anchors} · "
            f"load average before {env.get('load_average')}, after {env.get('load_average_after')}")


def bench_section(report: dict, source: str) -> str:
    env = report["environment"]
    lines = [f"## `srpo-core bench` ({report['preset']} sizes)", "",
             f"From `{source}`, written by `srpo-core bench --json` ({env.get('wall_s', '?')} s): "
             f"{_env_line(env)}.", "",
             f"Times: median over the rounds, 20th-80th percentile in brackets, ms. Memory: "
             f"{env.get('memory_method', 'see benchmarks/measure.py')}, MiB.", ""]
    results = report["results"]
    for op in dict.fromkeys(r["op"] for r in results):
        rows = [r for r in results if r["op"] == op]
        lines += [f"### {op} · {rows[0]['shape']}", "",
                  "| mode | dtype | implementation | median ms | [q20–q80] | peak MiB | ours / it (time) "
                  "| ours / it (memory) |",
                  "|---|---|---|---|---|---|---|---|"]
        ours = {(r["mode"], r["dtype"]): r for r in rows if r["impl"] == "srpo-core" and r["status"] == "ok"}
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['mode']} | {r['dtype']} | {r['impl']} | {r['status']}: {r['reason']} | | | | |")
                continue
            o = ours.get((r["mode"], r["dtype"]))
            tr = mr = ""
            if o is not None and r["impl"] != "srpo-core":
                tr = f"{o['median_s'] / r['median_s']:.3f}"
                mr = f"{o['peak_bytes'] / r['peak_bytes']:.3g}" if r["peak_bytes"] else "—"
            name = f"**{r['impl']}**" if r["impl"] == "srpo-core" else r["impl"]
            lines.append(f"| {r['mode']} | {r['dtype']} | {name} | {_ms(r['median_s'])} | "
                         f"[{_ms(r['q20_s'])}–{_ms(r['q80_s'])}] | {_mib(r['peak_bytes'])} | {tr} | {mr} |")
        lines.append("")
    if report["bars"]:
        applies = all(b["applies"] for b in report["bars"])
        lines += ["### Bars (issue 7, CPU)", ""]
        if not applies:
            lines += ["These sizes are not the ones the bars are stated at (`full`): shown for information.", ""]
        lines += ["| op | mode | dtype | bar | ours / anchor | held |", "|---|---|---|---|---|---|"]
        for b in report["bars"]:
            ratio = "—" if b["ratio"] is None else f"{b['ratio']:.3f} (≤ {b['max_ratio']:.3f})"
            lines.append(f"| {b['op']} | {b['mode']} | {b['dtype']} | {b['bar']} | {ratio} | "
                         f"{'yes' if b['held'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def linear_section(runs: list[tuple[dict, str]]) -> str:
    from srpo_core.bench.linear_table import render

    parts = ["## `linear_token_logprobs` over shapes (issue 4)", "",
             "One table per run, each with its own machine line: compare ratios within a table, not times across "
             "tables (docs/decisions.md D64 says why the bf16 rows come from another host).", ""]
    for data, source in runs:
        parts.append(render(data["results"], data["meta"], heading=f"### `{source}`"))
    return "\n".join(parts)


def readme_block(report: dict) -> str:
    env = report["environment"]
    cpu = env.get("cpu_model") or env.get("processor") or env["machine"]
    isa = (f", torch CPU capability {env['torch_cpu_capability']}" if env.get("torch_cpu_capability") else "")
    threads = f", {env['torch_threads']} torch threads" if env.get("torch_threads") else ""
    lines = [BEGIN, f"Measured on {env['device']} ({cpu}, {env['cpu_count']} cores{isa}{threads}), "
             f"torch {env['torch']}, {env['date'][:10]}, `srpo-core bench` ({report['preset']} sizes); "
             f"all numbers in [docs/benchmarks.md](docs/benchmarks.md).", "",
             "| op | mode | dtype | vs | ours / anchor (time) | ours / anchor (memory) |", "|---|---|---|---|---|---|"]
    for r in report["ratios"]:
        if r["anchor"] in ("GEMM floor",) or r["op"] == "role_aware_advantages" and r["anchor"].startswith("vppo"):
            continue
        mem = "—" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3g}"
        lines.append(f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['anchor']} | {r['time_ratio']:.3f} | {mem} |")
    lines += ["", "Below 1 is better (ours / anchor). No GPU was available: no GPU number is reported.", END]
    return "\n".join(lines)


def write(bench_json: Path, linear_jsons: list[Path], out: Path, readme: Path | None, plot: str | None) -> None:
    report = json.loads(bench_json.read_text())
    parts = ["# Benchmarks", "",
             "Generated by `benchmarks/write_docs.py` from the JSON of real runs; regenerate with `make bench-docs` "
             "(and `python benchmarks/linear_table.py --full` for the linear tables). Do not edit by hand.", ""]
    if report["environment"]["device"] == "cpu":
        parts += ["No GPU was available where these ran: every number is a CPU number. `benchmarks/gpu_bench.py` "
                  "times the kernels on a CUDA device; `benchmarks/gpu_report.py` reports what they compile to.", ""]
    if plot:
        parts += [f"![time and peak memory per implementation]({plot})", ""]
    parts.append(bench_section(report, _rel(bench_json)))
    if linear_jsons:
        parts.append(linear_section([(json.loads(p.read_text()), _rel(p)) for p in linear_jsons]))
    out.write_text("\n".join(parts).rstrip() + "\n")
    if readme is not None:
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{readme}: no {BEGIN} … {END} block to replace")
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(head + readme_block(report) + tail)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("--linear", type=Path, action="append", default=None,
                    help="linear_table.py JSON (repeatable; default: every docs/benchmarks_linear*.json)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="'' to leave the README alone")
    ap.add_argument("--plot", default="benchmarks.png", help="image path relative to --out ('' for none)")
    args = ap.parse_args(argv)
    linear = args.linear if args.linear is not None else sorted((ROOT / "docs").glob("benchmarks_linear*.json"))
    if missing := [str(p) for p in linear if not p.is_file()]:
        ap.error(f"--linear: no such file: {', '.join(missing)}")
    write(args.bench_json, linear, args.out, Path(args.readme) if args.readme else None, args.plot or None)
    print(f"wrote {args.out}" + (f" and the block in {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
