"""The synthetic grounded-reasoning task: coloured squares on a 2×2 grid and questions that need the image.

Everything is deterministic from a seed and needs no download. An image is ``SIDE × SIDE`` pixels (56: a 2×2 grid of
28-px cells, so that each cell is exactly one merged Qwen2-VL visual token); each cell holds a filled square of one of
:data:`COLOURS` or is empty (``none``). Three question kinds:

- ``count X``: how many cells are colour ``X`` (answer a digit);
- ``compare X Y``: which of two colours has more cells (answer ``X``, ``Y`` or ``same``);
- ``read cK``: the colour of cell ``K`` (answer a colour or ``none``).

A response is ``<perception> c1 red c2 none … </perception> <think> … </think> <answer> … </answer>``. The
perception facts are the four cell colours (:attr:`Sample.cells`), so perception correctness is scored separately from
the answer. :func:`response` builds a response from any list of perceived colours — the true ones (grounded) or
corrupted ones (hallucinated) — with reasoning that is consistent with what was perceived, and labels every reasoning
word as *using a perceived fact* (its value is determined by the perception span) or not (template words and words
copied from the question).
"""

from __future__ import annotations

import dataclasses
import random

COLOURS = ("red", "green", "blue")
EMPTY = "none"
VALUES = (*COLOURS, EMPTY)
RGB = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230)}
CELLS = ("c1", "c2", "c3", "c4")
SIDE = 56
CELL = SIDE // 2
SQUARE = 20  # side of the filled square inside a 28-px cell
KINDS = ("count", "compare", "read")
# Every word the task can produce (the tokenizer's vocabulary, besides tags and special tokens).
WORDS = (*VALUES, *CELLS, "count", "compare", "read", "at", "so", "is", "same", "0", "1", "2", "3", "4")
TAGS = ("<perception>", "</perception>", "<think>", "</think>", "<answer>", "</answer>")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One task instance: ``cells`` the four true colours (row-major), the question's words and its answer."""

    cells: tuple[str, ...]
    kind: str
    args: tuple[str, ...]
    answer: str

    @property
    def question(self) -> str:
        return " ".join((self.kind, *self.args))

    def image(self):
        """The 56×56 RGB PIL image (black background, one centred square per non-empty cell)."""
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (SIDE, SIDE), (0, 0, 0))
        draw = ImageDraw.Draw(img)
        pad = (CELL - SQUARE) // 2
        for k, colour in enumerate(self.cells):
            if colour == EMPTY:
                continue
            x0, y0 = (k % 2) * CELL + pad, (k // 2) * CELL + pad
            draw.rectangle([x0, y0, x0 + SQUARE - 1, y0 + SQUARE - 1], fill=RGB[colour])
        return img


def solve(kind: str, args: tuple[str, ...], cells) -> str:
    """The answer to a question given (true or perceived) cell colours."""
    if kind == "count":
        return str(sum(c == args[0] for c in cells))
    if kind == "compare":
        a, b = (sum(c == x for c in cells) for x in args)
        return args[0] if a > b else args[1] if b > a else "same"
    if kind == "read":
        return cells[CELLS.index(args[0])]
    raise ValueError(f"solve: unknown question kind {kind!r}; expected one of {KINDS}")


def make_sample(rng: random.Random, uniform: bool = False) -> Sample:
    cells = (rng.choice(COLOURS),) * len(CELLS) if uniform else tuple(rng.choice(VALUES) for _ in CELLS)
    kind = rng.choice(KINDS)
    if kind == "count":
        args = (rng.choice(COLOURS),)
    elif kind == "compare":
        args = tuple(rng.sample(COLOURS, 2))
    else:
        args = (rng.choice(CELLS),)
    return Sample(cells, kind, args, solve(kind, args, cells))


def generate(n: int, seed: int, *, uniform: bool = False) -> list[Sample]:
    """``n`` samples, deterministic from ``seed`` (different seeds give independent splits). ``uniform=True`` is
    the easy variant the tests warm-start on in seconds: all four cells share one colour."""
    if n < 0:
        raise ValueError(f"generate: `n` must be >= 0, got {n!r}")
    rng = random.Random(f"srpo-task-{seed}")
    return [make_sample(rng, uniform) for _ in range(n)]


def hallucinate(cells, rng: random.Random, n_wrong: int | None = None) -> tuple[str, ...]:
    """The cell colours with ``n_wrong`` (default 1 or 2, random) cells replaced by a different value."""
    n_wrong = rng.choice((1, 2)) if n_wrong is None else n_wrong
    out = list(cells)
    for k in rng.sample(range(len(out)), n_wrong):
        out[k] = rng.choice([v for v in VALUES if v != out[k]])
    return tuple(out)


def shortcut(sample: Sample) -> tuple[str, ...] | None:
    """The study's answer-changing prime (issue 23): for a count / compare question, the first empty cell perceived
    as the question's (first) colour; ``None`` when it does not apply (a read question, or no empty cell)."""
    if sample.kind not in ("count", "compare") or EMPTY not in sample.cells:
        return None
    out = list(sample.cells)
    out[out.index(EMPTY)] = sample.args[0]
    return tuple(out)


def silent_prime(sample: Sample, rng: random.Random) -> tuple[str, ...] | None:
    """The study's answer-keeping prime: for a read question, one non-queried cell perceived wrong (the answer and so
    the reward cannot see it); ``None`` for other questions."""
    if sample.kind != "read":
        return None
    out = list(sample.cells)
    k = rng.choice([i for i in range(len(CELLS)) if CELLS[i] != sample.args[0]])
    out[k] = rng.choice([v for v in VALUES if v != out[k]])
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Response:
    """A response's words (tags included) and, per word, its part (``perception`` / ``think`` / ``answer`` / ``tag``)
    and whether a reasoning word uses a perceived fact (``uses_fact``; False outside ``think`` / ``answer``) and
    whether it is read *directly* off the span (``direct``: the cells listed, the counts, the colour read, and the
    ``so`` that closes a cell list; not the answers derived from them or repeated in ``<answer>``)."""

    words: tuple[str, ...]
    part: tuple[str, ...]
    uses_fact: tuple[bool, ...]
    direct: tuple[bool, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(self.words)


def response(sample: Sample, perceived) -> Response:
    """The structured response of ``sample`` when the cells are perceived as ``perceived``; the reasoning and the
    answer follow from the perception (so a hallucinated perception gives a possibly wrong answer)."""
    words, part, fact, direct = [], [], [], []

    def add(ws, p, f=False, d=False):
        for w in ws.split() if isinstance(ws, str) else ws:
            words.append(w)
            part.append(p)
            fact.append(f or d)
            direct.append(d)

    add("<perception>", "tag")
    for name, colour in zip(CELLS, perceived, strict=True):
        add(name, "perception")
        add(colour, "perception")
    add("</perception>", "tag")
    add("<think>", "tag")
    kind, args = sample.kind, sample.args
    answer = solve(kind, args, perceived)
    if kind == "count":
        at = [name for name, c in zip(CELLS, perceived, strict=True) if c == args[0]] or [EMPTY]
        add(args[0], "think")
        add("at", "think")
        add(at, "think", d=True)
        add("so", "think", d=True)  # where the list ends depends on the perceived cells (issue 23)
        add(answer, "think", True)
    elif kind == "compare":
        for x in args:
            add(x, "think")
            add(str(sum(c == x for c in perceived)), "think", d=True)
        add("so", "think")  # after a fixed-length list: no fact decides it
        add(answer, "think", True)
    else:
        add(args[0], "think")
        add("is", "think")
        add(answer, "think", d=True)
    add("</think>", "tag")
    add("<answer>", "tag")
    add(answer, "answer", True)
    add("</answer>", "tag")
    return Response(tuple(words), tuple(part), tuple(fact), tuple(direct))


def parse(text: str) -> tuple[tuple[str, ...] | None, str | None]:
    """``(perceived cell colours or None, answer or None)`` from a generated response's text."""
    words = text.replace("<", " <").replace(">", "> ").split()

    def between(a, b):
        if a in words and b in words[words.index(a):]:
            i = words.index(a)
            return words[i + 1:words.index(b, i)]
        return None

    span, ans = between("<perception>", "</perception>"), between("<answer>", "</answer>")
    perceived = None
    if span is not None:
        seen = {span[i]: span[i + 1] for i in range(len(span) - 1) if span[i] in CELLS}
        perceived = tuple(seen.get(name, "?") for name in CELLS)
    return perceived, (" ".join(ans) if ans else None)


def perception_score(sample: Sample, perceived) -> float:
    """Fraction of the four cells whose colour the perception span states correctly (0 without a span)."""
    if perceived is None:
        return 0.0
    return sum(p == c for p, c in zip(perceived, sample.cells, strict=True)) / len(CELLS)
