"""What SRPO does to a batch of rollouts, shown in the terminal (rich) or as a self-contained HTML page.

Each response's tokens are coloured by weight (red above 1, blue below, white at 1; the intensity follows
``|log w|``), perception tokens are underlined and reasoning tokens bold, tags and other tokens dim.
"""

from __future__ import annotations

import dataclasses
import html
import math

import torch

from srpo_core.advantages import RoleAwareAdvantages, grpo_advantages, role_aware_advantages
from srpo_core.config import Role, SRPOConfig
from srpo_core.rollouts import Rollouts

ROLE_NAMES = {Role.OTHER: "other", Role.PERCEPTION: "perception", Role.REASONING: "reasoning"}


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
        response's total |advantage| that sits on perception and on reasoning tokens."""
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


def analyse(batch: Rollouts, config: SRPOConfig) -> Analysis:
    adv = batch.advantages if batch.advantages is not None else grpo_advantages(batch.rewards, batch.group_ids)
    result = role_aware_advantages(adv, batch.logp, batch.logp_corrupt, batch.logp_ablated, batch.roles,
                                   cu_seqlens=batch.cu_seqlens, config=config)
    return Analysis(batch, config, adv, result)


def _rgb(w: float) -> tuple[int, int, int]:
    """White at w = 1, towards red above and blue below; saturates at |log w| = 1.2."""
    t = min(abs(math.log(w)) / 1.2, 1.0) if w > 0 else 1.0
    if w >= 1:
        return 255, round(255 - 175 * t), round(255 - 175 * t)
    return round(255 - 175 * t), round(255 - 120 * t), 255


def _label(a: Analysis, i: int) -> str:
    rec = a.batch.records[i]
    rid = rec.get("response_id", i)
    reward = f" reward {rec['reward']:g}" if rec.get("reward") is not None else ""
    return f"{rec['prompt_id']} #{rid}{reward}"


# ------------------------------------------------------------------------------------------------------ terminal
def print_analysis(a: Analysis, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    console.rule("[bold]srpo-core[/]: role-aware token advantages")
    console.print("Token colour = weight w_t (red > 1 > blue); [underline]underlined[/] = perception, "
                  "[bold]bold[/] = reasoning, [dim]dim[/] = other (tags, format).")
    last_prompt = None
    for i, rec in enumerate(a.batch.records):
        if rec["prompt_id"] != last_prompt:
            last_prompt = rec["prompt_id"]
            console.print()
            console.print(f"[bold cyan]{rec['prompt_id']}[/]" + (f": {rec['prompt']}" if rec.get("prompt") else ""))
        sl = a.span(i)
        c = a.changes(i)
        text = Text(f"  #{rec.get('response_id', i)} A={c['A']:+.2f} ")
        for tok, w, r in zip(a.batch.tokens[i], a.result.weights[sl].tolist(), a.batch.roles[sl].tolist(), strict=True):
            style = "rgb({},{},{})".format(*_rgb(w)) if r != Role.OTHER else "dim"
            style = ("black on " + style) if r != Role.OTHER else style
            if r == Role.PERCEPTION:
                style += " underline"
            elif r == Role.REASONING:
                style += " bold"
            text.append(tok, style=style)
        console.print(text)

    stats = a.result.stats
    table = Table(title="per role (whole batch)", title_justify="left")
    for col in ("role", "tokens", "μ(signal)", "σ(signal)", "w min", "w mean", "w max"):
        table.add_column(col, justify="left" if col == "role" else "right")
    for role in ("perception", "reasoning"):
        table.add_row(role, str(stats[f"{role}/count"]),
                      *(f"{stats[f'{role}/{k}']:.3f}" for k in ("mu", "sigma", "w_min", "w_mean", "w_max")))
    console.print()
    console.print(table)

    changes = Table(title="what SRPO changed vs GRPO (GRPO gives every token A_i)", title_justify="left")
    for col in ("response", "reward", "A_i", "SRPO A_t range", "P share", "R share"):
        changes.add_column(col, justify="left" if col == "response" else "right")
    for i, rec in enumerate(a.batch.records):
        c = a.changes(i)
        reward = "" if rec.get("reward") is None else f"{rec['reward']:g}"
        changes.add_row(f"{rec['prompt_id']} #{rec.get('response_id', i)}", reward, f"{c['A']:+.3f}",
                        f"{c['adv_min']:+.2f} … {c['adv_max']:+.2f}",
                        f"{c['grpo_share_p']:.0%} → {c['srpo_share_p']:.0%}",
                        f"{c['grpo_share_r']:.0%} → {c['srpo_share_r']:.0%}")
    console.print(changes)
    console.print("[dim]P/R share: the part of the response's total |advantage| on perception/reasoning tokens, "
                  "GRPO → SRPO. Every token keeps the sign of A_i; each response's mean weight is 1.[/]")
    if a.batch.malformed:
        console.print(f"[yellow]{a.batch.malformed} response(s) had malformed tags[/]")


# ---------------------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
.tok{white-space:pre;border-radius:3px;padding:1px 0}
.r1{text-decoration:underline}.r2{font-weight:600}.r0{color:#999}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.resp{margin:.4em 0;line-height:1.8}.q{margin-top:1.4em}
"""


def to_html(a: Analysis) -> str:
    """A self-contained page (inline CSS, no external assets) with the same content as :func:`print_analysis`."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>srpo-core: role-aware advantages</title>",
             f"<style>{_CSS}</style></head><body><h1>srpo-core: role-aware token advantages</h1>",
             "<p>Token colour = weight w<sub>t</sub> (red &gt; 1 &gt; blue); <span class='r1'>underlined</span> = "
             "perception, <span class='r2'>bold</span> = reasoning, <span class='r0'>grey</span> = other. "
             "Hover a token for its numbers.</p>"]
    last_prompt = None
    for i, rec in enumerate(a.batch.records):
        if rec["prompt_id"] != last_prompt:
            last_prompt = rec["prompt_id"]
            parts.append(f"<h3 class='q'>{esc(str(rec['prompt_id']))}"
                         + (f": {esc(rec['prompt'])}" if rec.get("prompt") else "") + "</h3>")
        sl = a.span(i)
        c = a.changes(i)
        spans = []
        for tok, w, r, z, adv in zip(a.batch.tokens[i], a.result.weights[sl].tolist(), a.batch.roles[sl].tolist(),
                                     a.result.signals[sl].tolist(), a.result.advantages[sl].tolist(), strict=True):
            bg = "" if r == Role.OTHER else "background:rgb({},{},{})".format(*_rgb(w))
            title = f"{ROLE_NAMES[Role(r)]}  w={w:.3f}  z={z:+.3f}  A_t={adv:+.3f}"
            spans.append(f"<span class='tok r{r}' style='{bg}' title='{esc(title)}'>{esc(tok)}</span>")
        parts.append(f"<div class='resp'><b>#{esc(str(rec.get('response_id', i)))}</b> A={c['A']:+.2f} "
                     + "".join(spans) + "</div>")
    stats = a.result.stats
    parts.append("<h2>Per role (whole batch)</h2><table><tr><th>role</th><th>tokens</th><th>μ(signal)</th>"
                 "<th>σ(signal)</th><th>w min</th><th>w mean</th><th>w max</th></tr>")
    for role in ("perception", "reasoning"):
        cells = "".join(f"<td>{stats[f'{role}/{k}']:.3f}</td>" for k in ("mu", "sigma", "w_min", "w_mean", "w_max"))
        parts.append(f"<tr><td>{role}</td><td>{stats[f'{role}/count']}</td>{cells}</tr>")
    parts.append("</table><h2>What SRPO changed vs GRPO</h2><table><tr><th>response</th><th>A<sub>i</sub> "
                 "(GRPO, every token)</th><th>SRPO token range</th><th>perception share</th>"
                 "<th>reasoning share</th></tr>")
    for i in range(len(a.batch.records)):
        c = a.changes(i)
        parts.append(f"<tr><td>{esc(_label(a, i))}</td><td>{c['A']:+.3f}</td>"
                     f"<td>{c['adv_min']:+.3f} … {c['adv_max']:+.3f}</td>"
                     f"<td>{c['grpo_share_p']:.0%} → {c['srpo_share_p']:.0%}</td>"
                     f"<td>{c['grpo_share_r']:.0%} → {c['srpo_share_r']:.0%}</td></tr>")
    parts.append("</table><p>share = the part of the response's total |advantage| carried by that role's tokens; "
                 "every token keeps the sign of A<sub>i</sub>, and each response's mean weight is 1.</p>")
    parts.append(f"<p><small>config: {esc(repr(a.config))}</small></p></body></html>")
    return "\n".join(parts)
