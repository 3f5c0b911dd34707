"""Generate ``geometry_demo.jsonl``, the built-in example of ``srpo-core demo`` (deterministic).

    python -m srpo_core.examples.make_example                 # prints the example's JSONL to stdout
    python -m srpo_core.examples.make_example -o my.jsonl     # writes it to a file of your choice
    python -m srpo_core.examples.make_example --check         # does the shipped file match the generator?

It never rewrites the shipped file by default (in an installed package that file lies in site-packages); a
developer regenerating it in a source checkout passes ``-o srpo_core/examples/geometry_demo.jsonl``.

The story. Three visual questions (a triangle's area, a bar chart, counting shapes), four sampled responses each, in
the tagged format SRPO trains for: ``<perception> … </perception> <think> … </think> <answer> … </answer>``.
Per question: two correct responses that read the figure and use what they read; one wrong response whose
perception is hallucinated (generic words, no figure-specific facts); one wrong response that reads the figure right
but whose reasoning contradicts what it read.

Tokenisation, deliberately simple (no model download): the text is split on spaces and every word becomes one token
carrying its leading space, so ``"".join(tokens)`` is the response text. Each tag is one token, opening tags with
their leading space and closing tags without one (``" C"``, ``"</perception>"``), so that no tag token holds a
character of a span and ``roles_from_text`` gives every tag token the role OTHER; ``\\boxed{…}`` is one token
(REASONING).

The three log-probs of each token come from one seeded ``random.Random(2026)``, drawn in file order:
- ``logp`` (original image): ``−Exp(mean 0.625) − 0.02`` for an ordinary token; a visual fact read off the figure
  (a number, colour, shape or label, marked ``[x]`` in QUESTIONS) is likely: ``−U(0.02, 0.4)``.
- ``logp_corrupt`` (image patches blacked out): in a response that reads the figure, a visual fact loses
  ``U(1.5, 4)`` nats and other perception words ``U(0, 0.6)``; in the hallucinated response perception words lose only
  ``U(0, 0.2)`` (they never depended on the image); reasoning and tag tokens move by ``N(0, 0.05)`` noise.
- ``logp_ablated`` (perception span removed): a reasoning token that reuses a perceived fact (``{x}``) loses
  ``U(1, 3)`` nats; a reasoning token that contradicts the perception (``!x!``) gains ``U(0.5, 1.5)`` nats without it;
  every other token moves by ``N(0, 0.08)`` noise.
All log-probs are capped at 0 and rounded to 4 decimals. Rewards: 1 for a correct boxed answer, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import sys

FILE = pathlib.Path(__file__).with_name("geometry_demo.jsonl")
SEED = 2026

# (prompt_id, prompt, responses); a response is (perception words, reasoning words, answer, correct, grounded).
# Words wrapped in [] are visual facts; words wrapped in {} reuse a perceived fact; words wrapped in !! contradict it.
QUESTIONS = [
    ("triangle-area", "What is the area of the triangle in the figure?", [
        ("a right triangle with legs [3] cm and [4] cm , the right angle at [C]",
         "area is half the product of the legs : 1/2 * {3} * {4} = 6", "6", True, True),
        ("a [right] triangle , base [4] cm and height [3] cm",
         "half base times height gives 1/2 * {4} * {3} = 6", "6", True, True),
        ("a triangle with sides 5 cm and 4 cm",
         "using the legs 5 and 4 the area is 1/2 * 5 * 4 = 10", "10", False, False),
        ("a right triangle with legs [3] cm and [4] cm",
         "the hypotenuse is 5 so the area is !5! * {4} / 2 = 10", "10", False, True),
    ]),
    ("bar-chart", "Which month had the highest sales in the bar chart?", [
        ("the [tallest] bar is [blue] and labelled [March] , reaching [42]",
         "the highest bar is {March} with {42} units", "March", True, True),
        ("bars for January , February , [March] ; [March] is the [tallest]",
         "so the maximum is in {March}", "March", True, True),
        ("the chart shows sales rising every month until May",
         "May is the last and highest month", "May", False, False),
        ("the [blue] bar for [March] reaches [42] , [February] reaches [35]",
         "{February} is higher than {March} because !35! is more", "February", False, True),
    ]),
    ("circle-count", "How many red circles are in the image?", [
        ("[three] [red] circles on the left and [two] [blue] squares on the right",
         "counting only the {red} circles gives {three}", "3", True, True),
        ("[red] circles : one at the top , [two] at the bottom",
         "one plus {two} makes 3 {red} circles", "3", True, True),
        ("several red circles scattered across the image",
         "there seem to be about five", "5", False, False),
        ("[three] [red] circles and [two] [blue] squares",
         "adding circles and squares gives !5! shapes", "5", False, True),
    ]),
]


def _words(spec: str) -> list[tuple[str, str]]:
    """``"a [3] {4} !5!"`` → ``[("a", ""), ("3", "fact"), ("4", "uses"), ("5", "contradicts")]``."""
    out = []
    for w in spec.split():
        if w.startswith("[") and w.endswith("]"):
            out.append((w[1:-1], "fact"))
        elif w.startswith("{") and w.endswith("}"):
            out.append((w[1:-1], "uses"))
        elif w.startswith("!") and w.endswith("!") and len(w) > 2:
            out.append((w[1:-1], "contradicts"))
        else:
            out.append((w, ""))
    return out


def _response(rng: random.Random, perception: str, reasoning: str, answer: str, grounded: bool):
    tokens, logp, logp_corrupt, logp_ablated = [], [], [], []

    def emit(token: str, part: str, kind: str = "") -> None:
        base = -rng.expovariate(1.6) - 0.02
        if kind == "fact":
            base = -rng.uniform(0.02, 0.4)
        corrupt = base + rng.gauss(0, 0.05)
        ablated = base + rng.gauss(0, 0.08)
        if part == "perception":
            if kind == "fact":
                corrupt = base - (rng.uniform(1.5, 4.0) if grounded else rng.uniform(0.0, 0.4))
            else:
                corrupt = base - (rng.uniform(0.0, 0.6) if grounded else rng.uniform(0.0, 0.2))
        if part == "reasoning":
            if kind == "uses":
                ablated = base - rng.uniform(1.0, 3.0)
            elif kind == "contradicts":
                ablated = min(base + rng.uniform(0.5, 1.5), -0.01)
        tokens.append(token)
        logp.append(round(base, 4))
        logp_corrupt.append(round(min(corrupt, 0.0), 4))
        logp_ablated.append(round(min(ablated, 0.0), 4))

    emit("<perception>", "tag")
    for w, kind in _words(perception):
        emit(" " + w, "perception", kind)
    emit("</perception>", "tag")
    emit(" <think>", "tag")
    for w, kind in _words(reasoning):
        emit(" " + w, "reasoning", kind)
    emit("</think>", "tag")
    emit(" <answer>", "tag")
    emit(" \\boxed{" + answer + "}", "reasoning")
    emit("</answer>", "tag")
    return tokens, logp, logp_corrupt, logp_ablated


def generate(seed: int = SEED) -> list[dict]:
    """The example's records, in the JSONL schema of ``srpo-core explain`` (see docs/rollouts.md)."""
    rng = random.Random(seed)
    records = []
    for prompt_id, prompt, responses in QUESTIONS:
        for k, (perception, reasoning, answer, correct, grounded) in enumerate(responses):
            tokens, logp, logp_corrupt, logp_ablated = _response(rng, perception, reasoning, answer, grounded)
            assert all(math.isfinite(x) for x in logp + logp_corrupt + logp_ablated)
            records.append({"prompt_id": prompt_id, "prompt": prompt, "response_id": k, "tokens": tokens,
                            "reward": 1.0 if correct else 0.0, "logp": logp, "logp_corrupt": logp_corrupt,
                            "logp_ablated": logp_ablated})
    return records


def dumps(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m srpo_core.examples.make_example",
                                     description="Generate the built-in example's rollouts (JSONL, deterministic).")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: print to stdout)")
    what.add_argument("--check", action="store_true",
                      help=f"exit 1 unless the shipped {FILE.name} equals the generator's output")
    args = parser.parse_args(argv)
    text = dumps(generate())
    if args.check:
        same = FILE.read_text(encoding="utf-8") == text
        print(f"{FILE}: {'matches' if same else 'differs from'} the generator")
        return 0 if same else 1
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        pathlib.Path(args.output).write_text(text, encoding="utf-8")
    except OSError as e:
        parser.error(f"--output {args.output}: cannot be written ({e.strerror})")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
