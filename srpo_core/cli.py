"""``srpo-core``: ``demo`` (the built-in example), ``explain ROLLOUTS.jsonl`` (your rollouts), ``bench``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import sys

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
            raise ValueError(f"--set takes FIELD=VALUE with FIELD one of {', '.join(names)}; got {pair!r}")
        if isinstance(getattr(defaults, key), float):
            try:
                values[key] = float(raw)
            except ValueError:
                raise ValueError(f"--set {pair}: `{key}` takes a number, got {raw!r}") from None
        else:
            values[key] = raw.strip()
    return SRPOConfig(**values)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
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
    from srpo_core.rollouts import load

    return _show(load(args.rollouts), args)


def _bench(args) -> int:
    from srpo_core import bench

    preset = "tiny" if args.tiny else ("quick" if args.quick else "full")
    report = bench.run(preset, device=args.device, ops=args.op or None, progress=not args.no_progress)
    bench.print_report(report)
    if args.json:
        bench.save_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


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
    parser = argparse.ArgumentParser(prog="srpo-core", description="Role-aware token-level advantages (SRPO).")
    sub = parser.add_subparsers(dest="command", required=True)

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

    explain = sub.add_parser("explain", help="SRPO on your rollouts (JSONL; schema in docs/rollouts.md)")
    explain.add_argument("rollouts", help="a .jsonl file, one response per line")
    show_options(explain)
    explain.set_defaults(run=_explain)

    bench = sub.add_parser("bench", help="benchmark every op against the anchors that run here")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 CPU cores")
    size.add_argument("--tiny", action="store_true", help="toy sizes (for tests)")
    bench.add_argument("--op", action="append", help="only this op (repeatable)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    bench.add_argument("--json", metavar="FILE", help="save the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw time and peak memory (needs matplotlib)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    exp = sub.add_parser("experiment", help="the miniature grounded-reasoning study (docs/experiment.md)")
    exp.add_argument("--quick", action="store_true", help="one seed, short budget: ≤ 15 min on 2 quiet CPU cores")
    exp.add_argument("--json", metavar="FILE", help="save the results as JSON")
    exp.add_argument("--plot", metavar="FILE.png", help="draw the summary figure (needs matplotlib)")
    exp.add_argument("--note", default="", help="a line stored with the results (e.g. host conditions)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bars")
    exp.set_defaults(run=_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``srpo-core`` command; returns the exit status (0 ok, 2 bad input, with a one-line message on stderr)."""
    from srpo_core.rollouts import RolloutError

    args = build_parser().parse_args(argv)
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
