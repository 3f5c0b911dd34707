"""What SRPO does to a batch of rollouts, shown in the terminal (rich) or as a self-contained HTML page.

Each response's tokens are coloured by weight (red above 1, blue below, white at 1; the intensity follows
``|log w|``), perception tokens are underlined and reasoning tokens bold, tags and other tokens dim. Under each
response, the tokens SRPO up- and down-weights most are listed with their role letter and weight, so the output
also reads without colour (piped, or pasted into a README).
"""

from __future__ import annotations

import dataclasses
import html
import math

import torch

from srpo_core.advantages import grpo_advantages
from srpo_core.config import Role, SRPOConfig
from srpo_core.ops.role_aware_advantages import RoleAwareAdvantages, role_aware_advantages
from srpo_core.rollouts import Rollouts

ROLE_NAMES = {Role.OTHER: "other", Role.PERCEPTION: "perception", Role.REASONING: "reasoning"}
ROLE_LETTER = {Role.PERCEPTION: "P", Role.REASONING: "R"}
TITLE = "srpo-core: role-aware token advantages"
NO_ROLES = ("no perception or reasoning tokens, so every weight is 1 (GRPO): tag the text (<perception>…</perception>"
            "<think>…</think>) or give `roles` per token")


@dataclasses.dataclass
class Analysis:
    batch: Rollouts
    config: SRPOConfig
    sequence_advantages: torch.Tensor  # [B]
    result: RoleAwareAdvantages  # packed [N]

    def span(self, i: int) -> slice:
        cu = self.batch.cu_seqlens
        return slice(int(cu[i]), int(cu[i + 1]))

    def changes(self, i: int) -> dict:
        """Response ``i`` under GRPO and SRPO: its advantage, the token-advantage range, and the share of the
        response's total |advantage| that sits on perception and on reasoning tokens (|A_t| = w_t |A_i|, so the
        share is the share of the weight; GRPO's share is the share of the token count)."""
        sl = self.span(i)
        w, r = self.result.weights[sl], self.batch.roles[sl]
        adv = self.result.advantages[sl]
        n = max(w.numel(), 1)
        total = float(w.sum()) or 1.0
        return {
            "A": float(self.sequence_advantages[i]),
            "adv_min": float(adv.min()) if adv.numel() else 0.0,
            "adv_max": float(adv.max()) if adv.numel() else 0.0,
            "grpo_share_p": float((r == Role.PERCEPTION).sum()) / n,
            "srpo_share_p": float(w[r == Role.PERCEPTION].sum()) / total,
            "grpo_share_r": float((r == Role.REASONING).sum()) / n,
            "srpo_share_r": float(w[r == Role.REASONING].sum()) / total,
        }

    def highlights(self, i: int, k: int = 2, tol: float = 0.05) -> tuple[list, list]:
        """The ``k`` role tokens of response ``i`` with the largest weights above ``1 + tol`` and the ``k`` with the
        smallest below ``1 - tol``: lists of ``(token, role, weight)``."""
        sl = self.span(i)
        toks = self.batch.tokens[i]
        w, r = self.result.weights[sl].tolist(), self.batch.roles[sl].tolist()
        role_pos = [t for t in range(len(toks)) if r[t] != Role.OTHER]
        by_weight = sorted(role_pos, key=lambda t: (w[t], t))
        up = [(toks[t], Role(r[t]), w[t]) for t in reversed(by_weight[-k:]) if w[t] > 1 + tol]
        down = [(toks[t], Role(r[t]), w[t]) for t in by_weight[:k] if w[t] < 1 - tol]
        return up, down

    def signal_names(self) -> tuple[str, str]:
        """How each role's signal was obtained, e.g. ``("k3(ℓ, ℓ̃)", "logratio(ℓ, ℓ°)")``."""
        c = self.config
        p = "given in the file" if self.batch.perception_signal is not None else f"{c.perception_contrast}(ℓ, ℓ̃)"
        r = "given in the file" if self.batch.reasoning_signal is not None else f"{c.reasoning_contrast}(ℓ, ℓ°)"
        return p, r


def analyse(batch: Rollouts, config: SRPOConfig) -> Analysis:
    """Run ``grpo_advantages`` (unless the batch carries advantages) and ``role_aware_advantages`` on a batch."""
    adv = batch.advantages if batch.advantages is not None else grpo_advantages(batch.rewards, batch.group_ids)
    result = role_aware_advantages(adv, batch.logp, batch.logp_corrupt, batch.logp_ablated, batch.roles,
                                   cu_seqlens=batch.cu_seqlens, config=config,
                                   perception_signal=batch.perception_signal,
                                   reasoning_signal=batch.reasoning_signal)
    return Analysis(batch, config, adv, result)


def _rgb(w: float) -> tuple[int, int, int]:
    """White at w = 1, towards red above and blue below; saturates at |log w| = 1.2."""
    t = min(abs(math.log(w)) / 1.2, 1.0) if w > 0 else 1.0
    if w >= 1:
        return 255, round(255 - 175 * t), round(255 - 175 * t)
    return round(255 - 175 * t), round(255 - 120 * t), 255


def _num(x: float, fmt: str = ".3f") -> str:
    return "—" if isinstance(x, float) and math.isnan(x) else format(x, fmt)


def _show_token(tok: str) -> str:
    """A token for the highlight list: quoted, whitespace made visible."""
    return '"' + (tok.strip() or tok).replace("\n", "⏎").replace("\t", "⇥") + '"'


def response_labels(records: list[dict]) -> list[str]:
    """``#id`` of each response, the same in ``demo``, ``explain`` and the HTML page: its ``response_id`` when the
    line has one, else its position within its prompt's group (0, 1, …, in file order), as the demo numbers them."""
    seen: dict = {}
    labels = []
    for rec in records:
        key = (type(rec["prompt_id"]).__name__, rec["prompt_id"])
        k = seen.get(key, 0)
        seen[key] = k + 1
        labels.append(str(rec.get("response_id", k)))
    return labels


LEGEND_WEIGHTS = (0.3, 0.5, 0.75, 1.0, 1.33, 2.0, 3.3)  # the colour scale saturates at |log w| = 1.2


_MAPS = {"exp": "exp(β·u)", "linear": "max(1+β·u, w_min)", "sigmoid": "2·sigmoid(β·u)"}


def clamp_note(a: Analysis) -> str | None:
    """Why some weights look flattened: signals at their contrast's clamp (D87), or ``None`` if there are none."""
    stats, c = a.result.stats, a.config
    found = [(role, stats[f"{role}/clamped"]) for role in ("perception", "reasoning") if stats[f"{role}/clamped"]]
    if not found:
        return None
    counts = " and ".join(f"{n} {role}" for role, n in found)
    if c.role_stats == "unclamped":
        return (f"{counts} signal(s) sit at their contrast's bound (|ℓ − ℓ'| ≥ clamp = {c.clamp:g}, e.g. a −inf / "
                "null log-prob, or k3 ≥ k3_max): role_stats=unclamped leaves them out of μ/σ; they are still "
                "standardised and clipped at ±u_max.")
    return (f"{counts} signal(s) sit at their contrast's bound (|ℓ − ℓ'| ≥ clamp = {c.clamp:g}, e.g. a −inf / null "
            "log-prob, or k3 ≥ k3_max): they enter that role's μ/σ (SPEC) and can inflate σ, pulling the other "
            "tokens' weights towards 1; role_stats=unclamped computes the statistics without them.")


def _config_line(a: Analysis) -> str:
    c = a.config
    p, r = a.signal_names()
    return (f"signals P: {p}, R: {r}; weight {_MAPS[c.weight_map]}, β {c.beta_perception:g}/{c.beta_reasoning:g}, "
            f"renorm {c.renorm}")


def _shown(a: Analysis, limit: int | None) -> int:
    n = len(a.batch.records)
    return n if not limit or limit >= n else limit


# ------------------------------------------------------------------------------------------------------ terminal
def print_analysis(a: Analysis, console=None, *, limit: int | None = None) -> None:
    """Print the analysis with rich; ``limit`` caps the number of responses listed (the role table is always over
    the whole batch)."""
    from rich.console import Console

    console = console or Console()
    shown = _shown(a, limit)
    _print_header(a, console)
    labels = response_labels(a.batch.records)
    _print_responses(a, console, shown, labels)
    _print_role_table(a, console)
    _print_changes(a, console, shown, labels)
    _print_notes(a, console)


def _print_header(a: Analysis, console) -> None:
    """The title, the legend and the configuration line."""
    from rich.text import Text

    console.rule(f"[bold]{TITLE}[/]")
    console.print(Text.assemble(
        "Colour = token weight w_t (", ("red", "red"), " > 1 > ", ("blue", "blue"), "); ",
        ("underlined", "underline"), " = perception, ", ("bold", "bold"), " = reasoning, ",
        ("dim", "dim"), " = other. Each response: #id A_i, its tokens, then those SRPO weights most (▲) and "
        "least (▼), with role P/R and weight w_t. A_t = w_t·A_i: where A_i < 0, ▲ tokens are pushed down hardest."))
    console.print(Text(_config_line(a), style="dim"))


def _print_responses(a: Analysis, console, shown: int, labels: list[str]) -> None:
    """The first ``shown`` responses, each under its prompt's heading, then how many were left out."""
    from rich.text import Text

    last_prompt = object()
    for i, rec in enumerate(a.batch.records[:shown]):
        if rec["prompt_id"] != last_prompt:
            last_prompt = rec["prompt_id"]
            console.print()
            console.print(Text.assemble((str(rec["prompt_id"]), "bold cyan"),
                                        (f": {rec['prompt']}" if rec.get("prompt") else "")))
        console.print(_response_grid(a, i, labels[i]))
    if shown < len(a.batch.records):
        console.print(f"\n[dim]… {len(a.batch.records) - shown} more responses (--limit 0 shows all)[/]")


def _response_grid(a: Analysis, i: int, label: str):
    """Response ``i`` as a rich grid: its id and A_i, its tokens coloured by weight, then its ▲/▼ highlights."""
    from rich.table import Table
    from rich.text import Text

    sl = a.span(i)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    text = Text()
    for tok, w, r in zip(a.batch.tokens[i], a.result.weights[sl].tolist(), a.batch.roles[sl].tolist(),
                         strict=True):
        if r == Role.OTHER:
            text.append(tok, style="dim")
        else:
            style = "black on rgb({},{},{})".format(*_rgb(w))
            text.append(tok, style=style + (" underline" if r == Role.PERCEPTION else " bold"))
    grid.add_row(Text(f"#{label} {a.sequence_advantages[i]:+.2f}", style="bold"), text)
    up, down = a.highlights(i)
    marks = Text(style="dim")
    for arrow, items in (("▲", up), ("▼", down)):
        if items:
            marks.append(("   " if marks else "") + arrow)
            for tok, role, w in items:
                marks.append(f" {_show_token(tok)} {ROLE_LETTER[role]}×{w:.2f}")
    if not up and not down and any(a.batch.roles[sl].tolist()):
        marks.append("all weights within 5% of 1")
    if marks:
        grid.add_row("", marks)
    return grid


def _print_role_table(a: Analysis, console) -> None:
    """The per-role statistics over the whole batch."""
    from rich.table import Table

    stats = a.result.stats
    table = Table(title="per role (whole batch)", title_justify="left")
    for col in ("role", "tokens", "μ(signal)", "σ(signal)", "w min", "w mean", "w max"):
        table.add_column(col, justify="left" if col == "role" else "right")
    for role in ("perception", "reasoning"):
        table.add_row(role, str(stats[f"{role}/count"]),
                      *(_num(stats[f"{role}/{k}"]) for k in ("mu", "sigma", "w_min", "w_mean", "w_max")))
    console.print()
    console.print(table)


def _print_changes(a: Analysis, console, shown: int, labels: list[str]) -> None:
    """What SRPO changed against GRPO for each shown response, and how to read the shares."""
    from rich.table import Table
    from rich.text import Text

    changes = Table(title="what SRPO changed vs GRPO (GRPO gives every token A_i)", title_justify="left")
    for col in ("response", "reward", "A_i", "SRPO A_t range", "P share", "R share"):
        changes.add_column(col, justify="left" if col == "response" else "right")
    for i, rec in enumerate(a.batch.records[:shown]):
        c = a.changes(i)
        reward = "" if rec.get("reward") is None else f"{rec['reward']:g}"
        changes.add_row(Text(f"{rec['prompt_id']} #{labels[i]}"), reward, f"{c['A']:+.3f}",
                        f"{c['adv_min']:+.2f} … {c['adv_max']:+.2f}",
                        f"{c['grpo_share_p']:.0%} → {c['srpo_share_p']:.0%}",
                        f"{c['grpo_share_r']:.0%} → {c['srpo_share_r']:.0%}")
    console.print(changes)
    console.print(Text("P/R share: the part of the response's total |advantage| on perception/reasoning tokens, "
                       "GRPO → SRPO. Every token keeps the sign of A_i; each response's mean weight is 1.",
                       style="dim"))


def _print_notes(a: Analysis, console) -> None:
    """The warnings: malformed tags, clamped signals, no role tokens."""
    from rich.text import Text

    stats = a.result.stats
    if a.batch.malformed:
        console.print(f"[yellow]{a.batch.malformed} response(s) had malformed tags (roles derived anyway)[/]")
    if note := clamp_note(a):
        console.print(Text(note, style="yellow"))
    if not stats["perception/count"] and not stats["reasoning/count"]:
        console.print(f"[yellow]{NO_ROLES}[/]")


# ---------------------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
.tok{white-space:pre-wrap;border-radius:3px;padding:1px 0}
.r1{text-decoration:underline}.r2{font-weight:600}.r0{color:#999}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.q{margin-top:1.4em}
.resp{display:grid;grid-template-columns:6em 1fr;gap:0 .6em;margin:.5em 0;line-height:1.8}
.id{font-weight:600;white-space:nowrap}.marks{color:#666;font-size:.9em;line-height:1.3}.dim{color:#666}
.legend{display:flex;gap:0;margin:.6em 0;font-size:.85em}.legend span{padding:2px 10px;border:1px solid #eee}
.note{color:#666;font-size:.9em}
"""


def to_html(a: Analysis, *, limit: int | None = None) -> str:
    """A self-contained page (inline CSS, no scripts, no external assets) with the content of
    :func:`print_analysis`; hovering a token shows its role, weight, z and A_t."""
    esc = html.escape
    shown = _shown(a, limit)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}</title>",
             f"<style>{_CSS}</style></head><body><h1>{TITLE}</h1>",
             "<p>Token colour = weight w<sub>t</sub> (red &gt; 1 &gt; blue); <span class='r1'>underlined</span> = "
             "perception, <span class='r2'>bold</span> = reasoning, <span class='r0'>grey</span> = other. "
             "Each response: #id and A<sub>i</sub>, then the tokens SRPO weights most (▲) and least (▼), with role "
             "P/R and weight w<sub>t</sub>. "
             "A<sub>t</sub> = w<sub>t</sub>·A<sub>i</sub>: where A<sub>i</sub> &lt; 0, ▲ tokens are pushed down "
             "hardest. "
             "Hover a token for its numbers.</p>",
             "<div class='legend' aria-label='colour scale of the token weight'><span>w<sub>t</sub>:</span>"
             + "".join("<span style='background:rgb({},{},{})'>{:g}</span>".format(*_rgb(w), w) for w in LEGEND_WEIGHTS)
             + "<span class='r1'>perception</span><span class='r2'>reasoning</span>"
             "<span class='r0'>other (not weighted)</span></div>",
             f"<p class='dim'>{esc(_config_line(a))}</p>"]
    labels = response_labels(a.batch.records)
    last_prompt = object()
    for i, rec in enumerate(a.batch.records[:shown]):
        if rec["prompt_id"] != last_prompt:
            last_prompt = rec["prompt_id"]
            parts.append(f"<h3 class='q'>{esc(str(rec['prompt_id']))}"
                         + (f": {esc(str(rec['prompt']))}" if rec.get("prompt") else "") + "</h3>")
        sl = a.span(i)
        spans = []
        for tok, w, r, z, adv in zip(a.batch.tokens[i], a.result.weights[sl].tolist(), a.batch.roles[sl].tolist(),
                                     a.result.signals[sl].tolist(), a.result.advantages[sl].tolist(), strict=True):
            bg = "" if r == Role.OTHER else "background:rgb({},{},{})".format(*_rgb(w))
            title = f"{ROLE_NAMES[Role(r)]}  w={w:.3f}  z={z:+.3f}  A_t={adv:+.3f}"
            spans.append(f"<span class='tok r{r}' style='{bg}' title='{esc(title)}'>{esc(tok)}</span>")
        up, down = a.highlights(i)
        marks = "   ".join(arrow + "".join(f" {esc(_show_token(t))} {ROLE_LETTER[r]}×{w:.2f}" for t, r, w in items)
                           for arrow, items in (("▲", up), ("▼", down)) if items)
        if not up and not down and any(a.batch.roles[sl].tolist()):
            marks = "all weights within 5% of 1"
        parts.append(f"<div class='resp'><span class='id'>#{esc(labels[i])} {a.sequence_advantages[i]:+.2f}</span>"
                     f"<span>{''.join(spans)}</span><span></span><span class='marks'>{marks}</span></div>")
    if shown < len(a.batch.records):
        parts.append(f"<p class='dim'>… {len(a.batch.records) - shown} more responses (--limit 0 shows all)</p>")
    stats = a.result.stats
    parts.append("<h2>Per role (whole batch)</h2><table><tr><th>role</th><th>tokens</th><th>μ(signal)</th>"
                 "<th>σ(signal)</th><th>w min</th><th>w mean</th><th>w max</th></tr>")
    for role in ("perception", "reasoning"):
        cells = "".join(f"<td>{_num(stats[f'{role}/{k}'])}</td>" for k in ("mu", "sigma", "w_min", "w_mean", "w_max"))
        parts.append(f"<tr><td>{role}</td><td>{stats[f'{role}/count']}</td>{cells}</tr>")
    parts.append("</table><h2>What SRPO changed vs GRPO</h2><table><tr><th>response</th><th>reward</th>"
                 "<th>A<sub>i</sub> (GRPO, every token)</th><th>SRPO A<sub>t</sub> range</th>"
                 "<th>perception share</th><th>reasoning share</th></tr>")
    for i, rec in enumerate(a.batch.records[:shown]):
        c = a.changes(i)
        reward = "" if rec.get("reward") is None else f"{rec['reward']:g}"
        parts.append(f"<tr><td>{esc(str(rec['prompt_id']))} #{esc(labels[i])}</td><td>{reward}</td>"
                     f"<td>{c['A']:+.3f}</td><td>{c['adv_min']:+.3f} … {c['adv_max']:+.3f}</td>"
                     f"<td>{c['grpo_share_p']:.0%} → {c['srpo_share_p']:.0%}</td>"
                     f"<td>{c['grpo_share_r']:.0%} → {c['srpo_share_r']:.0%}</td></tr>")
    parts.append("</table><p class='note'>share = the part of the response's total |advantage| carried by that "
                 "role's tokens, GRPO → SRPO; every token keeps the sign of A<sub>i</sub>, and each response's mean "
                 "weight is 1.</p>")
    if not stats["perception/count"] and not stats["reasoning/count"]:
        parts.append(f"<p>{esc(NO_ROLES)}</p>")
    if a.batch.malformed:
        parts.append(f"<p>{a.batch.malformed} response(s) had malformed tags (roles derived anyway).</p>")
    if note := clamp_note(a):
        parts.append(f"<p>{esc(note)}</p>")
    parts.append(f"<p><small>config: {esc(repr(a.config))}</small></p></body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ markdown
def _md_cell(text: str) -> str:
    """Text for a markdown table cell: pipes, backslashes, markup characters and line breaks made inert."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("\r", "")
    for ch in "*_`<>[]":
        text = text.replace(ch, "\\" + ch)
    return text


def to_markdown(a: Analysis, *, limit: int | None = None, title: str = "SRPO token weights") -> str:
    """The analysis as markdown for a logger that renders no colour (TensorBoard's text tab): one table row per
    response with its id, ``A_i`` and its tokens, each role token followed by ``⟨P 1.32⟩`` / ``⟨R 0.81⟩`` (role
    letter and weight ``w_t``; other tokens carry no weight), then the per-role statistics of the batch."""
    shown = _shown(a, limit)
    labels = response_labels(a.batch.records)
    lines = [f"**{title}**: each perception (P) or reasoning (R) token is followed by ⟨role wₜ⟩; Aₜ = wₜ·Aᵢ. "
             f"{_md_cell(_config_line(a))}", "",
             "| response | A_i | tokens | ▲ / ▼ |", "|---|---:|---|---|"]
    for i, rec in enumerate(a.batch.records[:shown]):
        sl = a.span(i)
        toks = []
        for tok, w, r in zip(a.batch.tokens[i], a.result.weights[sl].tolist(), a.batch.roles[sl].tolist(),
                             strict=True):
            toks.append(_md_cell(tok) + (f"⟨{ROLE_LETTER[Role(r)]} {w:.2f}⟩" if r != Role.OTHER else ""))
        up, down = a.highlights(i)
        marks = "   ".join(arrow + "".join(f" {_md_cell(_show_token(t))} {ROLE_LETTER[r]}×{w:.2f}" for t, r, w in items)
                           for arrow, items in (("▲", up), ("▼", down)) if items)
        lines.append(f"| {_md_cell(str(rec['prompt_id']))} #{_md_cell(labels[i])} | {a.sequence_advantages[i]:+.3f} "
                     f"| {''.join(toks)} | {marks} |")
    if shown < len(a.batch.records):
        lines.append(f"\n… {len(a.batch.records) - shown} more responses")
    stats = a.result.stats
    lines += ["", "| role | tokens | μ(signal) | σ(signal) | w min | w mean | w max |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for role in ("perception", "reasoning"):
        cells = " | ".join(_num(stats[f"{role}/{k}"], ".3g") for k in ("mu", "sigma", "w_min", "w_mean", "w_max"))
        lines.append(f"| {role} | {stats[f'{role}/count']:g} | {cells} |")
    return "\n".join(lines)
