"""``srpo-core``: ``demo`` (the built-in example), ``explain ROLLOUTS.jsonl`` (your rollouts), ``bench``, ``docs``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import sys

from srpo_core._validate import brief
from srpo_core.config import SRPOConfig


def _config(pairs: list[str]) -> SRPOConfig:
    """``["beta_perception=1.0", "weight_map=linear"]`` → an :class:`SRPOConfig` (values typed by the field)."""
    defaults = SRPOConfig()
    names = [f.name for f in dataclasses.fields(SRPOConfig)]
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise ValueError(f"--set takes FIELD=VALUE with FIELD one of {', '.join(names)}; got {brief(pair)}")
        if isinstance(getattr(defaults, key), float):
            try:
                values[key] = float(raw)
            except ValueError:
                raise ValueError(f"--set {pair}: `{key}` takes a number, got {brief(raw)}") from None
        else:
            values[key] = raw.strip()
    return SRPOConfig(**values)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {brief(text)}")
    return n


def _show(records, args) -> int:
    from rich.console import Console

    from srpo_core.render import analyse, print_analysis, to_html
    from srpo_core.rollouts import to_batch

    analysis = analyse(to_batch(records), _config(args.set))
    print_analysis(analysis, Console(width=args.width) if args.width else None, limit=args.limit)
    if args.html:
        path = pathlib.Path(args.html)
        try:
            path.write_text(to_html(analysis, limit=args.limit), encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--html {args.html}: cannot be written ({e.strerror})") from None
        print(f"wrote {path}")
    return 0


def _demo(args) -> int:
    from srpo_core.examples.make_example import FILE
    from srpo_core.rollouts import load

    return _show(load(FILE), args)


def _explain(args) -> int:
    from srpo_core.examples.make_example import FILE
    from srpo_core.rollouts import load

    if args.example == (args.rollouts is not None):
        raise ValueError("give a rollouts file (.jsonl) or --example (the built-in example), not both or neither")
    return _show(load(FILE if args.example else args.rollouts), args)


def docs_dir() -> pathlib.Path:
    """The documentation pages: ``srpo_core/docs`` in an installed wheel, ``docs/`` in a source checkout."""
    package = pathlib.Path(__file__).resolve().parent
    for candidate in (package / "docs", package.parent / "docs"):
        if (candidate / "rollouts.md").is_file():
            return candidate
    raise ValueError(f"no documentation found next to {package} (looked in srpo_core/docs and ../docs)")


def docs_index(root: pathlib.Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """``docs/index.md`` read as ``[(section, [(page, one-line description), ...]), ...]``, in its order; pages on
    disk that it does not list come last, under "Not in the index", so none is hidden."""
    import re

    sections: list[tuple[str, list[tuple[str, str]]]] = []
    entry = re.compile(r"^- \[([\w-]+)\]\([\w-]+\.md\): (.*)$")
    index = root / "index.md"
    for line in (index.read_text(encoding="utf-8") if index.is_file() else "").splitlines():
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif (m := entry.match(line)) and sections:
            sections[-1][1].append((m.group(1), m.group(2).strip()))
        elif line.startswith("  ") and sections and sections[-1][1]:  # a description's continuation line
            page, text = sections[-1][1][-1]
            sections[-1][1][-1] = (page, f"{text} {line.strip()}")
    listed = {page for _, pages in sections for page, _ in pages} | {"index"}
    rest = sorted(p.stem for p in root.glob("*.md") if p.stem not in listed)
    if rest:
        sections.append(("Not in the index", [(page, "") for page in rest]))
    return sections


def _docs(args) -> int:
    import shutil
    import textwrap

    root = docs_dir()
    pages = sorted(p.stem for p in root.glob("*.md"))
    if args.page is None:
        sections = docs_index(root)
        width = min(shutil.get_terminal_size((80, 24)).columns, 100)
        print(f"srpo-core documentation: `srpo-core docs PAGE` prints a page (the files: {root})")
        for title, entries in sections:
            print(f"\n{title}")
            name_w = max(len(page) for page, _ in entries) + 2
            for page, text in entries:
                lead = f"  {page.ljust(name_w)}"
                if not text:
                    print(f"  {page}")
                elif width - len(lead) >= 30:
                    print(textwrap.fill(text, width, initial_indent=lead, subsequent_indent=" " * len(lead)))
                else:  # a narrow terminal: the description under the name
                    print(f"  {page}")
                    print(textwrap.fill(text, max(width, 20), initial_indent="    ", subsequent_indent="    "))
        return 0
    name = args.page.removesuffix(".md")
    if name not in pages:
        raise ValueError(f"no page {brief(args.page)}; the pages are {', '.join(pages)}")
    sys.stdout.write((root / f"{name}.md").read_text(encoding="utf-8"))
    return 0


def _bench(args) -> int:
    from srpo_core.bench import report as bench_report
    from srpo_core.bench import suite

    suite.check_arguments(args.device, args.json, args.plot)  # before a run of minutes, not after it
    preset = "tiny" if args.tiny else ("quick" if args.quick else "full")
    report = suite.run(preset, device=args.device, ops=args.op or None, progress=not args.no_progress)
    bench_report.print_report(report)
    if args.json:
        bench_report.save_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        bench_report.plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


SCHEMA = """\
rollouts: one JSON object per line, one line per response
  prompt_id        str or int, required; the same id = one GRPO group
  tokens           list of str, required; "".join(tokens) is the response
  logp             numbers, one per token (null = -inf), required: the
                   log-prob of each token with the original image,
  logp_corrupt       ... with the corrupted image,
  logp_ablated       ... with the perception span removed
  reward           number (A_i from the group's rewards), or
  advantage        number (A_i as given, when every line has one)
  roles            optional 0/1/2 per token (other/perception/reasoning);
                   without it the roles come from the tags in the text
  perception_signal, reasoning_signal
                   optional per-token signals replacing that contrast
full rules: `srpo-core docs rollouts`; a file: `srpo-core explain --example`
"""
def _experiment(args) -> int:
    import json

    from srpo_core.experiment import FULL, QUICK, report, run

    result = run(QUICK if args.quick else FULL, progress=not args.no_progress, note=args.note)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    report.print_summary(result)
    if args.plot:
        report.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from srpo_core import __version__

    parser = argparse.ArgumentParser(
        prog="srpo-core", description="Role-aware token-level advantages (SRPO): see what SRPO does to your rollouts, "
        "benchmark the ops, read the documentation.",
        epilog="start with `srpo-core demo`; `srpo-core COMMAND --help` for each command's options")
    parser.add_argument("--version", action="version", version=f"srpo-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def show_options(p):
        p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
        p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                       help="override an SRPOConfig field, e.g. --set beta_perception=1.0 (repeatable)")
        p.add_argument("--limit", type=_count, default=24, metavar="N",
                       help="list at most N responses (default 24; 0 = all); the role table covers the whole batch")
        p.add_argument("--width", type=int, default=None, help="terminal width (default: detected)")

    demo = sub.add_parser("demo", help="SRPO on the built-in example (3 prompts × 4 responses)")
    show_options(demo)
    demo.set_defaults(run=_demo)

    explain = sub.add_parser("explain", help="SRPO on your rollouts (JSONL, one response per line)",
                             description="SRPO's token weights on your rollouts.", epilog=SCHEMA,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    explain.add_argument("rollouts", nargs="?", help="a .jsonl file, one response per line (schema below)")
    explain.add_argument("--example", action="store_true",
                         help="the built-in example file instead (what `demo` shows)")
    show_options(explain)
    explain.set_defaults(run=_explain)

    bench = sub.add_parser("bench", help="benchmark every op against the anchors that run here",
                           description="Time and peak memory of every op beside its anchors (naive torch, TRL, "
                           "cut-cross-entropy, ...) on this machine.",
                           epilog="ours/it = srpo-core's median time (or peak memory) divided by that row's: below 1, "
                           "srpo-core is faster (smaller). The bars are srpo-core's CPU targets; they are judged at "
                           "the full sizes only (the default), and shown for information with --quick / --tiny.")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a smoke run at small sizes (minutes on 2 CPU cores); the README's numbers: full sizes")
    size.add_argument("--tiny", action="store_true", help="toy sizes (for tests)")
    from srpo_core.bench.cases import OPS

    bench.add_argument("--op", action="append", choices=OPS, metavar="OP",
                       help=f"only this op (repeatable): {', '.join(OPS)}")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    bench.add_argument("--json", metavar="FILE", help="save the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw time and peak memory (needs matplotlib)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    docs = sub.add_parser("docs", help="list the documentation pages, or print one (they ship with the package)")
    docs.add_argument("page", nargs="?", help="a page name, e.g. rollouts, trl, adapters, math, spec")
    docs.set_defaults(run=_docs)
    exp = sub.add_parser("experiment", help="the miniature grounded-reasoning study (docs/experiment.md)")
    exp.add_argument("--quick", action="store_true",
                     help="one seed of GRPO and SRPO (study v2's settings): about 15 min on one CPU core")
    exp.add_argument("--json", metavar="FILE", help="save the results as JSON")
    exp.add_argument("--plot", metavar="FILE.png", help="draw the summary figure (needs matplotlib)")
    exp.add_argument("--note", default="", help="a line stored with the results (e.g. host conditions)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bars")
    exp.set_defaults(run=_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``srpo-core`` command; returns the exit status (0 ok, 2 bad input, with a one-line message on stderr)."""
    from srpo_core.rollouts import RolloutError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `srpo-core`: the help, not a usage error
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (RolloutError, ValueError, TypeError) as e:
        print(f"srpo-core {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `srpo-core demo | head`: stop quietly; point stdout at devnull so exit's flush is silent
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
