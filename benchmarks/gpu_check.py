"""``make gpu-check``: everything a lent GPU should validate, in one command, ending in ONE summary line.

On a CUDA machine (docs/kernels.md, "GPU check"):

0. installs what the machine lacks, offline, into ``/tmp/srpo-gpu-site`` (on ``PYTHONPATH`` for every phase): the
   wheels in ``.whl/`` (``benchmarks/gpu_wheels.sh`` fetches them: the anchors TRL, Liger-Kernel, cut-cross-entropy)
   and, unless it is already installed from this tree, srpo-core as links into this tree;
1. ``static``: tests/test_gpu_static.py (device guard with real CUDA tensors, int64 address audit);
2. ``parity``: every kernel parity test (the test functions that take the ``device`` fixture, selected by the
   ``pytest_device_only`` plugin from the same files) with ``SRPO_TEST_DEVICE=cuda``, in parallel when pytest-xdist is
   there; their dtype parameters give fp32/bf16/fp16;
3. ``large``: tests/test_gpu_large.py (N = 32,768, V = 151,936, ignored rows, ``[V, N]ᵀ`` views), serially;
4. ``bench``: benchmarks/gpu_bench.py → ``gpu_bench.json`` and ``gpu_bench.md``.

Off CUDA it says ``no CUDA device: skipping the CUDA part`` and runs ``static`` and ``parity`` on the CPU (Triton's
interpreter); it exits 0 when they pass. Files go to ``--out`` (default ``$OUT`` when set, else build/gpu-check).

Usage: ``python benchmarks/gpu_check.py [--dry-run] [--phases static,parity,large,bench] [-k EXPR] [--out DIR]
[--budget SECONDS]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/srpo-gpu-site")
PHASES = ("static", "parity", "large", "bench")
KERNEL_TEST_FILES = ("test_token_logprobs.py", "test_linear_logprobs.py", "test_token_contrast.py",
                     "test_role_weights_kernel.py")
OWN_FILES = ("test_gpu_static.py", "test_gpu_large.py")
TAKES_DEVICE = re.compile(r"def test_\w+\([^)]*\bdevice\b")
DTYPE_TAGS = {"fp32": ("fp32", "float32"), "bf16": ("bf16", "bfloat16"), "fp16": ("fp16", "float16", "half")}
# share of the budget each phase may use at most (the rest is left to the later phases)
SHARES = {"static": 0.25, "parity": 0.5, "large": 0.6, "bench": 1.0}
# static: compile every kernel family at once first (Triton caches each compile; the tests then hit the cache)
PREWARM = ("token_logprobs", "token_contrast", "role_", "linear_logprobs")


def parity_files() -> list[str]:
    """The kernel parity test files: the four kernels' own, plus any other test file with a test taking ``device``."""
    found = [f for f in KERNEL_TEST_FILES if (ROOT / "tests" / f).exists()]
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name not in found and path.name not in OWN_FILES and TAKES_DEVICE.search(path.read_text()):
            found.append(path.name)
    return [f"tests/{f}" for f in found]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def plan(cuda: bool, phases, k: str | None, out: Path) -> list[dict]:
    """The steps: ``{phase, cmd, env}`` (``cmd`` as a list, run from the repository root)."""
    py = sys.executable
    base_env = {"SRPO_TEST_DEVICE": "cuda" if cuda else "cpu", "PYTHONUNBUFFERED": "1",
                "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci" if cuda else "dev"),
                "TRITON_DEFAULT_FP_FUSION": "1"}
    if not cuda:
        base_env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    addopts = "--import-mode=importlib -ra" + (" --benchmark-disable" if has("pytest_benchmark") else "")
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", f"addopts={addopts}"]
    if has("pytest_timeout"):
        pytest += ["--timeout", "300"]
    sel = ["-k", k] if k else []
    xdist = ["-n", "8"] if cuda and has("xdist") else []
    steps = []
    if "static" in phases:
        steps.append({"phase": "static", "env": base_env,
                      "cmd": [*pytest, *sel, f"--junitxml={out / 'static.xml'}", "tests/test_gpu_static.py"]})
    if "parity" in phases:
        steps.append({"phase": "parity", "env": {**base_env, "PYTHONPATH_PREPEND": str(ROOT / "benchmarks")},
                      "cmd": [*pytest, *xdist, "-p", "pytest_device_only", *sel, f"--junitxml={out / 'parity.xml'}",
                              *parity_files()]})
    if cuda and "large" in phases:
        steps.append({"phase": "large", "env": base_env,
                      "cmd": [*pytest, *sel, f"--junitxml={out / 'large.xml'}", "tests/test_gpu_large.py"]})
    if cuda and "bench" in phases:
        steps.append({"phase": "bench", "env": base_env,
                      "cmd": [py, str(ROOT / "benchmarks" / "gpu_bench.py"), "--json", str(out / "gpu_bench.json"),
                              "--markdown", str(out / "gpu_bench.md")]})
    return steps


def install(log) -> dict:
    """Offline installs into SITE (CUDA machine only); returns the environment additions (PYTHONPATH)."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    SITE.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(SITE)]
    if wheels:
        r = subprocess.run([*pip, *map(str, wheels)], capture_output=True, text=True)
        log(f"installed {len(wheels)} wheels from .whl/: {[w.name for w in wheels]} (rc {r.returncode})\n{r.stderr}")
    else:
        log("no .whl/ wheels: the anchors that are not installed here will be skipped by gpu_bench.py")
    probe = subprocess.run([sys.executable, "-c", "import srpo_core, pathlib; print(pathlib.Path(srpo_core.__file__)"
                            ".resolve())"], capture_output=True, text=True, cwd="/")
    if probe.returncode != 0 or str(ROOT) not in probe.stdout:
        link_package(SITE)
        log(f"srpo_core is not installed from this tree: linked {ROOT} into {SITE}/srpo_core (no build needed)")
    return {"PYTHONPATH": os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def link_package(site: Path) -> None:
    """``site/srpo_core``: links to this tree's ``srpo_core/*`` plus ``kernels`` as ``srpo_core/kernels`` and
    ``benchmarks`` as ``srpo_core/bench``, the layout pyproject.toml installs (``srpo_core.kernels = kernels/``,
    ``srpo_core.bench = benchmarks/``), with no build step and no setuptools."""
    pkg = site / "srpo_core"
    if pkg.is_symlink() or pkg.is_file():
        pkg.unlink()
    elif pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (ROOT / "srpo_core").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "kernels").symlink_to(ROOT / "kernels")
    (pkg / "bench").symlink_to(ROOT / "benchmarks")


def junit_counts(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "dtypes": dict.fromkeys(DTYPE_TAGS, 0)}
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        kids = {c.tag for c in case}
        if kids & {"failure", "error"}:
            counts["failed"] += 1
        elif "skipped" in kids:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
            name = case.get("name", "").lower()
            for tag, words in DTYPE_TAGS.items():
                if any(re.search(rf"(?<![a-z]){w}(?![0-9])", name) for w in words):
                    counts["dtypes"][tag] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    parser.add_argument("-k", help="pytest -k expression for every test phase (a quick subset)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "build" / "gpu-check"))
    parser.add_argument("--budget", type=float, help="seconds for all phases (default 450 on CUDA, 3600 on CPU)")
    parser.add_argument("--cpu", action="store_true", help="take the no-CUDA path even on a GPU machine")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown {unknown}; choose from {PHASES}")
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    args.budget = args.budget or (450.0 if cuda else 3600.0)
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    if not cuda:
        print("gpu-check: no CUDA device: skipping the CUDA part (large shapes, benchmarks); running the interpreter "
              "part (static audits and kernel parity tests on the CPU)", flush=True)
    steps = plan(cuda, phases, args.k, args.out)
    if args.dry_run:
        for s in steps:
            env = " ".join(f"{k}={v}" for k, v in s["env"].items())
            print(f"[{s['phase']}] {env} {' '.join(s['cmd'])}")
        print(f"gpu-check (dry run): {device}: {len(steps)} phases planned: {', '.join(s['phase'] for s in steps)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    logf = (args.out / "gpu_check.log").open("w")

    def log(msg: str) -> None:
        logf.write(msg.rstrip() + "\n")
        logf.flush()

    extra = install(log) if cuda else {}
    results = {}
    for s in steps:
        if s["phase"] == "static" and cuda:
            prewarm({**os.environ, **extra, **s["env"]}, log)
        left = args.budget - (time.monotonic() - t0)
        timeout = max(30.0, left * SHARES[s["phase"]])
        env = {**os.environ, **extra, **s["env"]}
        prepend = env.pop("PYTHONPATH_PREPEND", None)
        if prepend:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (prepend, env.get("PYTHONPATH", "")) if p)
        log(f"\n=== {s['phase']} (timeout {timeout:.0f} s): {' '.join(s['cmd'])}")
        print(f"gpu-check: {s['phase']} (at most {timeout:.0f} s) ...", flush=True)
        ts = time.monotonic()
        try:
            r = subprocess.run(s["cmd"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, output = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", f"{(e.stdout or b'').decode(errors='replace')}{(e.stderr or b'').decode()}"
        log(output)
        tail = [ln for ln in output.splitlines() if ln.strip()][-3:]
        print("\n".join(f"  {ln}" for ln in tail), flush=True)
        results[s["phase"]] = {"rc": rc, "seconds": round(time.monotonic() - ts, 1)}
        if s["phase"] != "bench":
            results[s["phase"]].update(junit_counts(args.out / f"{s['phase']}.xml"))
    bench = results.get("bench")
    rows = bench_rows(args.out / "gpu_bench.json") if bench else None
    tests = [v for k, v in results.items() if k != "bench"]
    passed, failed, skipped = (sum(v[k] for v in tests) for k in ("passed", "failed", "skipped"))
    broken = [k for k, v in results.items() if not phase_ok(k, v)]
    dt = {t: sum(v["dtypes"][t] for v in tests) for t in DTYPE_TAGS}
    ok = passed > 0 and failed == 0 and not broken and (rows is None or rows["failed"] == 0)
    summary = {"device": device, "tests": {"passed": passed, "failed": failed, "skipped": skipped, "dtypes": dt},
               "bench": rows, "phases": results, "broken_phases": broken, "seconds": round(time.monotonic() - t0, 1),
               "ok": ok, "out": str(args.out)}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    bench_txt = "bench skipped (no CUDA)" if rows is None else f"bench {rows['timed']} rows timed, " \
        f"{rows['skipped']} skipped, {rows['failed']} failed{'' if rows['complete'] else ' (stopped early)'}"
    broken_txt = f"; phases that did not finish cleanly: {broken}" if broken else ""
    print(f"gpu-check: {'PASS' if ok else 'FAIL'}: {device}: tests {passed} passed, {failed} failed, {skipped} skipped "
          f"(fp32 {dt['fp32']}, bf16 {dt['bf16']}, fp16 {dt['fp16']}); {bench_txt}{broken_txt}; "
          f"{summary['seconds']:.0f} s; files in {args.out}")
    return 0 if ok else 1


def prewarm(env: dict, log) -> None:
    """Compile the kernels in parallel processes (gpu_report.py per family, addr_audit.py) to fill Triton's cache."""
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    bench = ROOT / "benchmarks"
    cmds = [[sys.executable, str(bench / "gpu_report.py"), "--only", fam] for fam in PREWARM]
    cmds.append([sys.executable, str(bench / "addr_audit.py")])
    t = time.monotonic()
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, 240 - (time.monotonic() - t))))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append("timeout")
    log(f"prewarm: {len(cmds)} compile processes in {time.monotonic() - t:.0f} s, exit codes {codes}")


def phase_ok(phase: str, r: dict) -> bool:
    """Finished cleanly: rc 0; for pytest also 1 with counted failures (those count as failed tests) and 5 (a -k that
    selects nothing). A timeout, a collection error or a crash is not."""
    if phase == "bench":
        return r["rc"] == 0
    return r["rc"] == 0 or r["rc"] == 5 or (r["rc"] == 1 and r["failed"] > 0)


def bench_rows(path: Path) -> dict:
    if not path.exists():
        return {"timed": 0, "skipped": 0, "failed": 1, "complete": False}
    data = json.loads(path.read_text())
    res = data["results"]
    return {"timed": sum("median_ms" in r for r in res), "skipped": sum("skipped" in r for r in res),
            "failed": sum("error" in r for r in res), "complete": bool(data.get("complete"))}


if __name__ == "__main__":
    sys.exit(main())
