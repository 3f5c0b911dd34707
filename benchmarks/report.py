"""What `srpo-core bench` prints and writes: the header, one table per op and dtype, the bars, the plot, the JSON."""

from __future__ import annotations

import json


def _num(x: float) -> str:
    """At most 4 significant digits and no exponent from 1e-3 up: the unit is in the column's header (D193)."""
    return f"{x:,.0f}" if x >= 1000 else f"{x:.4g}"


# Units live in the headers, numbers in the cells: a narrow terminal or a pipe can no longer cut "894.14 ms" to
# "894.14 …". A table that does not fit the width is printed as one folded line per row instead (nothing cut).
COLUMNS = ("mode", "implementation", "median\nms", "peak mem\nMiB", "ours/it\ntime", "ours/it\nmem")


def _cells(r: dict, ours: dict) -> tuple[str, ...]:
    if r["status"] != "ok":
        return (r["mode"], r["impl"], r["status"], "", "", "")
    o = ours.get((r["op"], r["mode"], r["shape"], r["dtype"]))
    t_ratio = m_ratio = ""
    if o is not None and r["impl"] != "srpo-core":
        t_ratio = f"{o['median_s'] / r['median_s']:.3g}"
        m_ratio = f"{o['peak_bytes'] / r['peak_bytes']:.3g}" if r["peak_bytes"] else "—"
    mem = "—" if r["peak_bytes"] is None else _num(r["peak_bytes"] / 2**20)
    return (r["mode"], r["impl"], _num(r["median_s"] * 1e3), mem, t_ratio, m_ratio)


RATIO_NOTE = ("ours/it: srpo-core's median time (peak memory) divided by this row's; below 1, srpo-core is faster "
              "(smaller). peak mem: the most extra memory one call takes above its inputs.")


def header_lines(report: dict) -> list[str]:
    """The run's identity, one fact per line: what ran, where (CPU model, ISA flags, torch's CPU capability or the
    GPU), with which versions, and when. Lines are short; a long flag list wraps on its own."""
    env = report["environment"]
    lines = [f"srpo-core bench ({report['preset']} sizes) on {env['device']} · {env['date']}",
             f"torch {env['torch']} · triton {env.get('triton') or 'not installed'} · python {env['python']}"]
    if env.get("gpu"):
        lines.append(f"GPU: {env['gpu']}")
    lines.append(f"CPU: {env.get('cpu_model') or env.get('processor') or env['machine']} · {env['cpu_count']} cores, "
                 f"{env['torch_threads']} torch threads")
    lines.append(f"ISA: {' '.join(env.get('cpu_flags') or []) or 'unknown'} · torch CPU capability "
                 f"{env.get('torch_cpu_capability') or 'unknown'}")
    return lines


def print_report(report: dict, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    console = console or Console()
    for i, line in enumerate(header_lines(report)):
        console.print(f"[bold]{line}[/]" if i == 0 else line, overflow="fold", highlight=False)
    console.print(f"[dim]{RATIO_NOTE}[/]", highlight=False)
    ours = {(r["op"], r["mode"], r["shape"], r["dtype"]): r for r in report["results"]
            if r["impl"] == "srpo-core" and r["status"] == "ok"}
    groups = dict.fromkeys((r["op"], r["dtype"]) for r in report["results"])
    for op, dtype in groups:
        rows = [r for r in report["results"] if (r["op"], r["dtype"]) == (op, dtype)]
        cells = [_cells(r, ours) for r in rows]
        title = f"{op} · {dtype} · {rows[0]['shape']}"
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for col in COLUMNS:
            table.add_column(col, justify="left" if col in ("mode", "implementation") else "right", no_wrap=True)
        for r, c in zip(rows, cells, strict=True):
            if r["status"] != "ok":
                table.add_row(c[0], c[1], f"[dim]{c[2]}[/]", "", "", "")
            elif r["impl"] == "srpo-core":
                table.add_row(c[0], f"[bold]{c[1]}[/]", *c[2:])
            else:
                table.add_row(*c)
        if Measurement.get(console, console.options.update_width(1 << 16), table).maximum <= console.width:
            console.print(table)
            continue
        console.print(title, style="italic", overflow="fold", highlight=False)
        for r, c in zip(rows, cells, strict=True):
            ratios = f" · ours/it time {c[4]}, mem {c[5]}" if c[4] else ""
            what = f"median {c[2]} ms · peak mem {c[3]} MiB{ratios}" if r["status"] == "ok" else c[2]
            console.print(f"  {c[0]} {c[1]}: {what}", overflow="fold", highlight=False)
        console.print()
    skipped = [r for r in report["results"] if r["status"] != "ok"]
    for r in skipped:
        console.print(f"[dim]{r['op']} {r['mode']} {r['impl']}: {r['status']} ({r['reason']})[/]", overflow="fold")
    if report["bars"]:
        applies = all(b.get("applies", True) for b in report["bars"])
        console.print("[bold]bars[/]: srpo-core's CPU targets, " + (
            "held or missed at these (full) sizes" if applies else
            "for information only: they are stated at the full sizes (`srpo-core bench`), so nothing is judged here"),
            overflow="fold", highlight=False)
        for b in report["bars"]:
            if not b.get("applies", True):
                verdict = "[dim]info  [/]"
            else:
                verdict = "[green]held  [/]" if b["held"] else "[red]missed[/]"
            value = "—" if b["ratio"] is None else f"{b['ratio']:.3f} (target ≤ {b['max_ratio']:.3f})"
            console.print(f"  {verdict} {b['op']} {b['mode']} {b['dtype']}: {b['bar']}, ours/anchor {value}",
                          overflow="fold", highlight=False)


def plot(report: dict, path: str) -> None:
    """Median time and peak memory per implementation, one panel pair per (op, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    groups = sorted({(r["op"], r["mode"], r["dtype"]) for r in ok})
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 2.2 * len(groups) + 0.5), squeeze=False)
    for (op, mode, dtype), (ax_t, ax_m) in zip(groups, axes, strict=True):
        rows = [r for r in ok if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        names = [r["impl"] for r in rows]
        colors = ["tab:red" if n == "srpo-core" else "tab:gray" for n in names]
        ax_t.barh(names, [r["median_s"] * 1e3 for r in rows], color=colors)
        ax_t.set_xlabel("median time (ms)")
        ax_t.set_title(f"{op} {mode} {dtype} · {rows[0]['shape']}", fontsize=8)
        ax_m.barh(names, [r["peak_bytes"] / 2**20 for r in rows], color=colors)
        ax_m.set_xlabel("peak extra memory (MiB)")
        for ax in (ax_t, ax_m):
            ax.tick_params(labelsize=7)
    env = report["environment"]
    fig.suptitle(f"srpo-core bench ({report['preset']}) · {env['device']} · torch {env['torch']} · {env['date']}\n"
                 f"CPU {env.get('cpu_model')} · torch CPU capability {env.get('torch_cpu_capability')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
