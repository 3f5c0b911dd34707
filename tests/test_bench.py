"""`srpo-core bench`: a tiny run end to end (JSON schema, ratios, bars, plot), the generated docs, and the
pytest-benchmark suite as a smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from srpo_core.bench import cases, host, suite
from srpo_core.bench import report as bench_report
from srpo_core.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = {"token_logprobs", "token_contrast", "linear_token_logprobs", "role_aware_advantages", "linear_policy_loss"}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--tiny", "--no-progress", "--json", str(out / "b.json")]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        args += ["--plot", str(out / "b.png")]
    assert main(args) == 0
    return out, json.loads((out / "b.json").read_text()), has_mpl


def test_json_schema(tiny_report):
    _, report, _ = tiny_report
    assert report["schema"] == suite.SCHEMA_VERSION and report["preset"] == "tiny"
    env = report["environment"]
    for key in ("date", "device", "machine", "cpu_count", "torch_threads", "python", "torch", "triton", "trl",
                "memory_method", "load_average", "load_average_after", "wall_s"):
        assert key in env, key
    assert env["device"] == "cpu"
    for r in report["results"]:
        assert {"op", "mode", "impl", "shape", "dtype", "status"} <= r.keys()
        assert r["status"] in ("ok", "skipped", "failed")
        if r["status"] == "ok":
            assert r["median_s"] > 0 and r["q20_s"] <= r["median_s"] <= r["q80_s"] and r["rounds"] >= 3
            assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0
        else:
            assert r["reason"]
    assert not [r for r in report["results"] if r["status"] == "failed"]


def test_every_op_has_ours_and_an_anchor(tiny_report):
    _, report, _ = tiny_report
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["op"] for r in ok} == OPS
    for op in OPS:
        impls = {r["impl"] for r in ok if r["op"] == op}
        assert "srpo-core" in impls and len(impls) >= 2, (op, impls)


def test_ratios_are_the_medians_quotient(tiny_report):
    _, report, _ = tiny_report
    rows = {(r["op"], r["mode"], r["shape"], r["dtype"], r["impl"]): r for r in report["results"]}
    assert report["ratios"]
    for q in report["ratios"]:
        key = (q["op"], q["mode"], q["shape"], q["dtype"])
        ours, anchor = rows[(*key, "srpo-core")], rows[(*key, q["anchor"])]
        assert math.isclose(q["time_ratio"], ours["median_s"] / anchor["median_s"], rel_tol=1e-12)
        if anchor["peak_bytes"]:
            assert math.isclose(q["memory_ratio"], ours["peak_bytes"] / anchor["peak_bytes"], rel_tol=1e-12)


def test_bars_are_reported_and_marked_not_applicable_off_the_full_sizes(tiny_report):
    _, report, _ = tiny_report
    assert {(b["op"], b["mode"], b["metric"]) for b in report["bars"]} == {
        (b.op, b.mode, b.metric) for b in suite.CPU_BARS}
    for b in report["bars"]:
        assert b["applies"] is False
        assert b["held"] == (b["ratio"] is not None and b["ratio"] <= b["max_ratio"])


def test_plot_is_a_png(tiny_report):
    out, _, has_mpl = tiny_report
    if not has_mpl:
        pytest.skip("matplotlib is not installed (the `bench` extra)")
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _linear_run(command: str, fwd_ours: float) -> dict:
    """A linear_table.py JSON with made-up times: only its rendering is under test."""
    t = {"gemm": [1.0, 1.0, 1.0], "three_gemms": [3.0, 3.0, 3.0], "naive/fwd": [1.2, 1.2, 1.2],
         "naive/fwdbwd": [3.6, 3.6, 3.6], "ours/fwd": [fwd_ours] * 3, "ours/fwdbwd": [4.0, 4.0, 4.0]}
    mem = {f"{m}/{mode}": {"method": m, "mode": mode, "peak_mb": 8.0, "extra_mb": 4.0}
           for m in ("naive", "ours") for mode in ("fwd", "fwdbwd")}
    meta = {"command": command, "date": "2026-01-01T00:00:00", "cpu": "cpu", "cores": 2, "threads": 2,
            "torch": "t", "python": "p", "load_before": "0 0 0", "load_after": "0 0 0"}
    return {"meta": meta, "results": [{"shape": [16, 32, 300, "float32"], "methods": ["naive", "ours"],
                                       "times": t, "memory": mem}]}


def test_write_docs_from_the_json(tiny_report, tmp_path):
    out, report, _ = tiny_report
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nafter\n")
    runs = [tmp_path / "lin_a.json", tmp_path / "lin_b.json"]
    runs[0].write_text(json.dumps(_linear_run("linear_table.py --run-a", 0.9)))
    runs[1].write_text(json.dumps(_linear_run("linear_table.py --run-b", 1.1)))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "write_docs.py"), str(out / "b.json"),
           "--out", str(tmp_path / "benchmarks.md"), "--readme", str(readme)]
    proc = subprocess.run(cmd + ["--linear", str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert proc.returncode != 0 and "no such file" in proc.stderr and "missing.json" in proc.stderr
    proc = subprocess.run(cmd + ["--linear", str(runs[0]), "--linear", str(runs[1])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "benchmarks.md").read_text()
    # both linear runs, in the order given, each with its own command and its own fwd/GEMM ratio
    a = page.index("--run-a")
    b = page.index("--run-b", a)
    assert "| 0.90 |" in page[a:b] and "| 1.10 |" in page[b:] and "| 0.90 |" not in page[b:]
    assert report["environment"]["date"] in page and "No GPU was available" in page
    ours = next(r for r in report["results"] if r["impl"] == "srpo-core" and r["status"] == "ok")
    assert f"| {ours['mode']} | {ours['dtype']} | **srpo-core** |" in page
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- bench:begin -->\n") and text.endswith("<!-- bench:end -->\nafter\n")
    assert "old" not in text and "docs/benchmarks.md" in text


def test_pytest_benchmark_suite_smoke():
    """The pytest-benchmark view of the same cases runs (once each, benchmarking disabled) at the tiny sizes."""
    env = {**os.environ, "SRPO_BENCH_PRESET": "tiny"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "benchmarks" / "test_bench_ops.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_header_records_the_cpu(tiny_report):
    import torch

    _, report, _ = tiny_report
    env = report["environment"]
    for key in ("cpu_model", "cpu_flags", "torch_cpu_capability"):
        assert key in env, key
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(env["cpu_flags"]) <= set(host.ISA_FLAGS)
    if pathlib.Path("/proc/cpuinfo").exists():
        assert env["cpu_model"] and env["cpu_flags"], env  # Linux: the model name and some SIMD flag are read
    text = "\n".join(bench_report.header_lines(report))
    assert f"torch CPU capability {env['torch_cpu_capability']}" in text and str(env["cpu_model"]) in text


def _render(report, width=80) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    bench_report.print_report(report, console)
    return console.export_text()


def _with_times(report: dict, seconds: float, peak_bytes: int) -> dict:
    """The same report with every measured time and peak set: the layout must not depend on what was measured."""
    results = [{**r, "median_s": seconds, "peak_bytes": peak_bytes} if r["status"] == "ok" else r
               for r in report["results"]]
    return {**report, "results": results}


@pytest.mark.parametrize("width", [80, 60, 40, 120])
@pytest.mark.parametrize(("seconds", "peak_bytes"), [(None, None), (3e-7, 0), (4321.5, 7 * 2**40), (0.89414, 3 << 20)],
                         ids=["measured", "tiny", "huge", "ms"])
def test_report_never_cuts_headers_units_or_names(tiny_report, width, seconds, peak_bytes):
    """Whatever was measured and however wide the terminal (a pipe is 80): nothing cut, every unit shown."""
    _, report, _ = tiny_report
    if seconds is not None:
        report = _with_times(report, seconds, peak_bytes)
    text = _render(report, width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text  # rich's mark for a cut cell
    flat = " ".join(text.split())
    assert "ms" in flat and "MiB" in flat and "ours/it" in flat
    for r in report["results"]:
        assert r["impl"] in flat and r["mode"] in flat, (r["impl"], r["mode"])


def test_piped_report_is_80_columns_and_whole(tiny_report):
    import io

    from rich.console import Console

    _, report, _ = tiny_report
    out = io.StringIO()  # not a terminal: rich's default width, 80
    bench_report.print_report(_with_times(report, 0.89414, 3 << 20), Console(file=out))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "894.1" in text and "median" in text and "ms" in text  # was "894.14 …"


def test_report_explains_ratios_and_labels_information(tiny_report):
    _, report, _ = tiny_report
    text = _render(report)
    assert "ours/it: srpo-core's median time (peak memory) divided by this row's" in " ".join(text.split())
    bars = text[text.index("bars: "):]
    assert "for information only" in bars and " info " in bars
    assert "held" not in bars.replace("held or missed", "") and "missed" not in bars
    # at the full sizes the same rows are judged
    judged = {**report, "bars": [{**b, "applies": True} for b in report["bars"]]}
    bars = _render(judged)
    bars = bars[bars.index("bars: "):]
    assert "held or missed" in bars and " info " not in bars
    verdicts = [line.split()[0] for line in bars.splitlines() if line.startswith("  ") and line.split()]
    assert len(verdicts) == len(report["bars"]) and set(verdicts) <= {"held", "missed"}, verdicts


# Public ops with a backend that the bench table leaves out, and the script that measures each instead.
MEASURED_ELSEWHERE = {"linear_token_contrast": "benchmarks/bench_linear_contrast.py"}


def test_ops_list_is_the_cases(tiny_report):
    """``--op`` names exactly the ops the table has cases of; they are the public ops that take a ``backend`` (less
    those measured by their own script), and the tiny run measured each one."""
    import inspect

    import srpo_core

    public_ops = {name for name in srpo_core.__all__ if inspect.isfunction(getattr(srpo_core, name))
                  and "backend" in inspect.signature(getattr(srpo_core, name)).parameters}
    assert set(cases.OPS) == {c.op for c in cases.build_cases("tiny", "cpu")}
    assert set(cases.OPS) == public_ops - set(MEASURED_ELSEWHERE), (cases.OPS, public_ops)
    assert all((ROOT / script).is_file() for script in MEASURED_ELSEWHERE.values())
    _, report, _ = tiny_report
    assert {r["op"] for r in report["results"] if r["status"] == "ok"} == set(cases.OPS)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--json", "/nonexistent/x.json"], "--json /nonexistent/x.json: the folder /nonexistent does not",
                     id="json-folder"),
        pytest.param(["--plot", "/nonexistent/x.png"], "--plot /nonexistent/x.png: the folder", id="plot-folder"),
        pytest.param(["--json", "/"], "is a directory", id="json-dir"),
    ],
)
def test_bench_arguments_are_checked_before_the_run(monkeypatch, capsys, argv, expected):
    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("the run must not start"))
    assert main(["bench", "--tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_bench_unknown_op_and_missing_matplotlib_and_absent_cuda(monkeypatch, capsys, tmp_path):
    import importlib.util

    import torch

    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("the run must not start"))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--tiny", "--op", "nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "--tiny", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib, which is not installed" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--tiny", "--device", "cuda"]) == 2
        assert "--device cuda: " in capsys.readouterr().err
