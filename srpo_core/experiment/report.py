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
