"""``make gpu-check``: everything a lent GPU should validate, in one command, ending in ONE summary line.

On a CUDA machine (docs/kernels.md, "GPU check"), after printing the versions (python, torch, Triton, CUDA,
``nvidia-smi``):

0. ``install``: offline, into ``--site`` (default ``/tmp/srpo-gpu-site``, on ``PYTHONPATH`` for every phase): the
   wheels in ``.whl/`` (``benchmarks/gpu_wheels.sh`` fetches them: the anchors TRL, Liger-Kernel, cut-cross-entropy)
   and, unless the phases would already import this tree's complete package, srpo-core as links into this tree;
1. ``static``: tests/test_gpu_static.py (device guard with real CUDA tensors, int64 address audit);
2. ``parity``: every kernel parity test (the test functions that take the ``device`` fixture, selected by the
   ``pytest_device_only`` plugin from the same files) with ``SRPO_TEST_DEVICE=cuda``, in parallel with pytest-xdist;
   their dtype parameters give fp32/bf16/fp16;
3. ``large``: tests/test_gpu_large.py (N = 32,768, V = 151,936, ignored rows, ``[V, N]ᵀ`` views), serially;
4. ``bench``: benchmarks/gpu_bench.py → ``gpu_bench.json`` and ``gpu_bench.md``, srpo-core's rows first, stopped at
   the budget's end (a partial bench is a partial result, not a failure).

Every phase runs with ``PYTHONSAFEPATH=1``: the package is found through what ``install`` set up, never through the
working directory (the repository root's ``srpo_core/`` has no ``kernels/``: imported from there it is incomplete).

``--rehearse`` (CPU; CI runs it): the same run, as the device would do it, on a bare interpreter built like the GPU
image (a venv holding only torch, Triton 3.6, pytest, pytest-xdist, hypothesis and what they need, linked from this
venv or installed from PyPI: ``build/gpu-rehearse/``), with ``.whl/`` fetched if missing and installed offline, the
kernels under ``TRITON_INTERPRET=1``, tiny shapes (``large`` at ``SRPO_GPU_LARGE_SMOKE=1``, ``bench --smoke``) and
hypothesis's ``smoke`` profile. A change that would break the device run fails here first.

Off CUDA without ``--rehearse`` it says ``no CUDA device: skipping the CUDA part`` and runs ``static`` and ``parity``
on the CPU (Triton's interpreter) in this environment; it exits 0 when they pass. Files go to ``--out`` (default
``$OUT`` when set, else build/gpu-check).

Usage: ``python benchmarks/gpu_check.py [--rehearse] [--dry-run] [--phases static,parity,large,bench] [-k EXPR]
[--out DIR] [--budget SECONDS]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/srpo-gpu-site")
REHEARSAL = ROOT / "build" / "gpu-rehearse"
PHASES = ("static", "parity", "large", "bench")
DTYPE_TAGS = {"fp32": ("fp32", "float32"), "bf16": ("bf16", "bfloat16"), "fp16": ("fp16", "float16", "half")}
# The whole check on one H100 must finish in 8 minutes. Seconds each step may take at most (docs/kernels.md gives the
# estimate of each); the bench gets what is left of BUDGET and stops itself 20 s before it. The caps and the install
# (~10 s) add up to less than BUDGET, so every test phase can use its whole cap and the later ones still start.
BUDGET = 460.0
CAPS = {"prewarm": 60.0, "static": 90.0, "parity": 200.0, "large": 90.0}
# static: compile every kernel family at once first (Triton caches each compile; the tests then hit the cache)
PREWARM = ("token_logprobs", "token_contrast", "role_", "linear_logprobs", "linear_contrast")
# The GPU image's packages this check needs (docs/kernels.md): linked from this venv, or (IMAGE_PINS) installed from
# PyPI at the image's version where this venv has another or none.
IMAGE_DISTS = ("torch", "numpy", "rich", "pytest", "hypothesis", "pip", "transformers", "accelerate")
IMAGE_PINS = ("triton==3.6.0", "pytest-xdist==3.8.0", "execnet==2.1.2", "pytest-timeout==2.4.0")


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_SELECTION = _sibling("pytest_device_only")


def parity_files() -> list[str]:
    """The kernel parity test files (``pytest_device_only.parity_files``: the one list the launch audit checks)."""
    return [f"tests/{f}" for f in _SELECTION.parity_files(ROOT / "tests")]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def plan(mode: str, phases, k: str | None, out: Path) -> list[dict]:
    """The steps ``{phase, cmd, env}`` (``cmd`` a list, run from the repository root) for ``mode``: ``"cuda"`` (the
    device), ``"rehearsal"`` (the device's run on this CPU) or ``"cpu"`` (the interpreter part only)."""
    py = sys.executable
    device_like = mode in ("cuda", "rehearsal")
    profile = {"cuda": "ci", "rehearsal": "smoke", "cpu": "dev"}[mode]
    base_env = {"SRPO_TEST_DEVICE": "cuda" if mode == "cuda" else "cpu", "PYTHONUNBUFFERED": "1",
                "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", profile),
                "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONSAFEPATH": "1"}
    if mode != "cuda":
        base_env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
        base_env["TRITON_INTERPRET"] = "1"
    addopts = "--import-mode=importlib -ra" + (" --benchmark-disable" if has("pytest_benchmark") else "")
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", f"addopts={addopts}"]
    if has("pytest_timeout"):
        pytest += ["--timeout", "300"]
    sel = ["-k", k] if k else []
    xdist = ["-n", "8" if mode == "cuda" else "2"] if device_like and has("xdist") else []
    steps = []
    if "static" in phases:
        steps.append({"phase": "static", "env": base_env,
                      "cmd": [*pytest, *sel, f"--junitxml={out / 'static.xml'}", "tests/test_gpu_static.py"]})
    if "parity" in phases:
        steps.append({"phase": "parity", "env": {**base_env, "PYTHONPATH_PREPEND": str(ROOT / "benchmarks")},
                      "cmd": [*pytest, *xdist, "-p", "pytest_device_only", *sel, f"--junitxml={out / 'parity.xml'}",
                              *parity_files()]})
    if device_like and "large" in phases:
        env = {**base_env, "SRPO_GPU_LARGE_SMOKE": "1"} if mode == "rehearsal" else base_env
        steps.append({"phase": "large", "env": env,
                      "cmd": [*pytest, *sel, f"--junitxml={out / 'large.xml'}", "tests/test_gpu_large.py"]})
    if device_like and "bench" in phases:
        steps.append({"phase": "bench", "env": base_env,
                      "cmd": [py, str(ROOT / "benchmarks" / "gpu_bench.py"), "--json", str(out / "gpu_bench.json"),
                              "--markdown", str(out / "gpu_bench.md"), *(["--smoke"] if mode == "rehearsal" else [])]})
    return steps


def phase_env(step: dict, extra: dict) -> dict:
    env = {**os.environ, **extra, **step["env"]}
    prepend = env.pop("PYTHONPATH_PREPEND", None)
    if prepend:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (prepend, env.get("PYTHONPATH", "")) if p)
    return env


def install(log, site: Path, env: dict) -> dict:
    """Offline installs into ``site`` (device and rehearsal); returns the environment additions (PYTHONPATH).

    The probe imports ``srpo_core.kernels`` and ``srpo_core.bench`` under the phases' own conditions (``env``, the
    repository root as working directory): only when both resolve into this tree is nothing linked."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    site.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site)]
    if wheels:
        r = subprocess.run([*pip, *map(str, wheels)], capture_output=True, text=True)
        log(f"installed {len(wheels)} wheels from .whl/: {[w.name for w in wheels]} (rc {r.returncode})\n{r.stderr}")
    else:
        log("no .whl/ wheels: the anchors that are not installed here will be skipped by gpu_bench.py")
    extra = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    probe = ("import pathlib, srpo_core.kernels as k, srpo_core.bench as b; "
             "print(pathlib.Path(k.__file__).resolve().parent, pathlib.Path(b.__file__).resolve().parent)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **env, **extra})
    if r.returncode != 0 or r.stdout.split() != [str(ROOT / "kernels"), str(ROOT / "benchmarks")]:
        link_package(site)
        log(f"srpo_core as the phases import it is not this tree's ({(r.stdout + r.stderr).strip()[-300:]}): "
            f"linked {ROOT} into {site}/srpo_core (no build needed)")
    return extra


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


def versions() -> str:
    """One line of what the run depends on: python, torch, Triton, CUDA, and nvidia-smi's GPU, driver and memory."""
    import torch

    triton = importlib.metadata.version("triton") if has("triton") else "not installed"
    smi = "not found"
    if shutil.which("nvidia-smi"):
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            smi = (r.stdout.strip() or r.stderr.strip() or f"rc {r.returncode}").replace("\n", "; ")
        except subprocess.TimeoutExpired:
            smi = "timed out after 20 s"
    return (f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"triton {triton}; nvidia-smi: {smi}")


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
    parser.add_argument("--budget", type=float, help=f"seconds for the whole check (default {BUDGET:.0f} on CUDA, "
                        "3600 on CPU)")
    parser.add_argument("--cpu", action="store_true", help="take the no-CUDA path even on a GPU machine")
    parser.add_argument("--rehearse", action="store_true", help="run the device's check here, on a bare interpreter "
                        "built like the GPU image, under Triton's interpreter at tiny shapes")
    parser.add_argument("--site", type=Path, default=SITE, help=argparse.SUPPRESS)
    parser.add_argument("--rehearsal-inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown {unknown}; choose from {PHASES}")
    if args.rehearse and not args.dry_run:
        return rehearse(args)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    mode = "cuda" if cuda else "rehearsal" if (args.rehearsal_inner or args.rehearse) else "cpu"
    args.budget = args.budget or (BUDGET if cuda else 3600.0)
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    if mode == "rehearsal":
        device = "rehearsal on the CPU (no CUDA device)"
    print(f"gpu-check: {versions()}", flush=True)
    if mode == "cpu":
        print("gpu-check: no CUDA device: skipping the CUDA part (large shapes, benchmarks); running the interpreter "
              "part (static audits and kernel parity tests on the CPU)", flush=True)
    steps = plan(mode, phases, args.k, args.out)
    if args.dry_run:
        for s in steps:
            env = " ".join(f"{k}={v}" for k, v in s["env"].items())
            print(f"[{s['phase']}] {env} {' '.join(s['cmd'])}")
        print(f"gpu-check (dry run): {device}: {len(steps)} phases planned: {', '.join(s['phase'] for s in steps)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("gpu_bench.json", "gpu_bench.md", "static.xml", "parity.xml", "large.xml", "gpu_check.json"):
        (args.out / stale).unlink(missing_ok=True)  # what is counted is this run's
    logf = (args.out / "gpu_check.log").open("w")

    def log(msg: str) -> None:
        logf.write(msg.rstrip() + "\n")
        logf.flush()

    log(versions())
    extra = install(log, args.site, steps[0]["env"]) if mode != "cpu" and steps else {}
    print(f"gpu-check: install: {time.monotonic() - t0:.0f} s", flush=True)
    results = {}
    for s in steps:
        if s["phase"] == "static" and cuda:
            prewarm(phase_env(s, extra), log, CAPS["prewarm"])
        left = args.budget - (time.monotonic() - t0)
        if s["phase"] == "bench" and left < 40:  # what is left would not time one row: a partial (empty) bench
            results["bench"] = {"rc": 0, "seconds": 0.0, "not_started": f"{left:.0f} s of the budget left"}
            print(f"gpu-check: bench not started: {left:.0f} s of the budget left", flush=True)
            continue
        # a test phase always gets 30 s (it is the check); the bench gets what is left and stops itself 20 s early
        timeout = max(30.0, min(CAPS.get(s["phase"], left), left)) if cuda and s["phase"] != "bench" else left
        cmd = s["cmd"] + (["--seconds", f"{max(10.0, timeout - 20):.0f}"] if s["phase"] == "bench" else [])
        log(f"\n=== {s['phase']} (timeout {timeout:.0f} s): {' '.join(cmd)}")
        print(f"gpu-check: {s['phase']} (at most {timeout:.0f} s) ...", flush=True)
        ts = time.monotonic()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=phase_env(s, extra), capture_output=True, text=True,
                               timeout=timeout)
            rc, output = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", f"{_text(e.stdout)}{_text(e.stderr)}"
            if s["phase"] == "bench" and (args.out / "gpu_bench.json").exists():
                # a row started before the deadline ran past it: the rows timed so far stand (written after each)
                rc, output = 0, output + "\ngpu-check: bench killed at the budget's end: a partial result"
        log(output)
        tail = [ln for ln in output.splitlines() if ln.strip()][-3:]
        print("\n".join(f"  {ln}" for ln in tail), flush=True)
        results[s["phase"]] = {"rc": rc, "seconds": round(time.monotonic() - ts, 1)}
        print(f"gpu-check: {s['phase']}: {results[s['phase']]['seconds']:.0f} s (elapsed {time.monotonic() - t0:.0f} "
              f"of {args.budget:.0f} s)", flush=True)
        if s["phase"] != "bench":
            results[s["phase"]].update(junit_counts(args.out / f"{s['phase']}.xml"))
    bench = results.get("bench")
    rows = None if not bench else {"timed": 0, "skipped": 0, "failed": 0, "complete": False} \
        if "not_started" in bench else bench_rows(args.out / "gpu_bench.json")
    tests = [v for k, v in results.items() if k != "bench"]
    passed, failed, skipped = (sum(v[k] for v in tests) for k in ("passed", "failed", "skipped"))
    broken = [k for k, v in results.items() if not phase_ok(k, v)]
    dt = {t: sum(v["dtypes"][t] for v in tests) for t in DTYPE_TAGS}
    ok = passed > 0 and failed == 0 and not broken and (rows is None or rows["failed"] == 0)
    summary = {"device": device, "versions": versions(), "tests": {"passed": passed, "failed": failed,
                                                                    "skipped": skipped, "dtypes": dt},
               "bench": rows, "phases": results, "broken_phases": broken, "seconds": round(time.monotonic() - t0, 1),
               "ok": ok, "out": str(args.out)}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    what = "rows ran (not timed)" if mode == "rehearsal" else "rows timed"
    if rows is None:
        bench_txt = "bench skipped (no CUDA)" if mode == "cpu" else "bench not run"
    else:
        partial = "" if rows["complete"] else " (partial: stopped at the deadline)"
        bench_txt = f"bench {rows['timed']} {what}, {rows['skipped']} skipped, {rows['failed']} failed{partial}"
    broken_txt = f"; phases that did not finish cleanly: {broken}" if broken else ""
    print(f"gpu-check: {'PASS' if ok else 'FAIL'}: {device}: tests {passed} passed, {failed} failed, {skipped} skipped "
          f"(fp32 {dt['fp32']}, bf16 {dt['bf16']}, fp16 {dt['fp16']}); {bench_txt}{broken_txt}; "
          f"{summary['seconds']:.0f} s; files in {args.out}")
    return 0 if ok else 1


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def prewarm(env: dict, log, cap: float) -> None:
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
            codes.append(p.wait(timeout=max(1.0, cap - (time.monotonic() - t))))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append("timeout")
    log(f"prewarm: {len(cmds)} compile processes in {time.monotonic() - t:.0f} s, exit codes {codes}")
    print(f"gpu-check: prewarm: {time.monotonic() - t:.0f} s", flush=True)


def phase_ok(phase: str, r: dict) -> bool:
    """Finished cleanly: rc 0; for pytest also 1 with counted failures (those count as failed tests) and 5 (a -k that
    selects nothing). A timeout, a collection error or a crash is not. A bench stopped at its deadline exits 0."""
    if phase == "bench":
        return r["rc"] == 0
    return r["rc"] == 0 or r["rc"] == 5 or (r["rc"] == 1 and r["failed"] > 0)


def bench_rows(path: Path) -> dict:
    if not path.exists():
        return {"timed": 0, "skipped": 0, "failed": 1, "complete": False}
    data = json.loads(path.read_text())
    res = data["results"]
    return {"timed": sum("median_ms" in r or "ran" in r for r in res), "skipped": sum("skipped" in r for r in res),
            "failed": sum("error" in r for r in res), "complete": bool(data.get("complete"))}


# ---------------------------------------------------------------------------------------------------------------------
# The rehearsal: the device's run, here


def _requirements(dist: importlib.metadata.Distribution) -> list[str]:
    from packaging.requirements import Requirement

    names = []
    for line in dist.requires or ():
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def _closure(roots) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``roots`` need, recursively (missing optional ones are left out)."""
    seen, todo, out = set(), list(roots), []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        out.append(dist)
        todo += _requirements(dist)
    return out


def _top_level(dist: importlib.metadata.Distribution) -> set[Path]:
    """The top-level entries a distribution put into its site-packages (packages, modules, its .dist-info)."""
    base = Path(dist.locate_file(""))
    tops = set()
    for f in dist.files or ():
        first = Path(f).parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".pth"):
            tops.add(base / first)
    return tops


def build_image(log) -> Path:
    """``build/gpu-rehearse/image``: a venv without this venv's site-packages, holding links to the image's packages
    (``IMAGE_DISTS`` and what they need, from here) and ``IMAGE_PINS`` (from PyPI, once, into ``pkgs/``); returns its
    python. Nothing of srpo-core is in it: the check's own ``install`` must provide the package, as on the device."""
    image, pkgs = REHEARSAL / "image", REHEARSAL / "pkgs"
    stamp = pkgs / ".pins"
    if not stamp.exists() or stamp.read_text() != "\n".join(IMAGE_PINS):
        shutil.rmtree(pkgs, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(pkgs), *IMAGE_PINS],
                       check=True)
        stamp.write_text("\n".join(IMAGE_PINS))
    shutil.rmtree(image, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image)], check=True)
    py = image / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    pinned = {p.name for p in pkgs.iterdir()}
    pinned_names = {re.split(r"[=<>]", p)[0].lower().replace("-", "_") for p in IMAGE_PINS}
    for dist in _closure(IMAGE_DISTS):
        if dist.metadata["Name"].lower().replace("-", "_") in pinned_names:
            continue
        for top in _top_level(dist):
            if top.exists() and top.name not in pinned and not (site / top.name).exists():
                (site / top.name).symlink_to(top)
    for entry in pkgs.iterdir():
        if entry.name not in ("bin", "__pycache__", ".pins") and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry.resolve())
    log(f"rehearsal image: {py} ({len(list(site.iterdir()))} entries in {site}; this venv's purelib is "
        f"{sysconfig.get_paths()['purelib']})")
    return py


def rehearse(args) -> int:
    """Build the image, fetch ``.whl/`` if missing, then run this script in it as the device would."""
    REHEARSAL.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    py = build_image(lambda m: print(f"gpu-check --rehearse: {m}", flush=True))
    if not list((ROOT / ".whl").glob("*.whl")):
        subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_wheels.sh")], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    print(f"gpu-check --rehearse: image and wheels ready in {time.monotonic() - t0:.0f} s", flush=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH", "SRPO_TEST_DEVICE")}
    env["TRITON_INTERPRET"] = "1"
    site = REHEARSAL / "site"
    shutil.rmtree(site, ignore_errors=True)
    cmd = [str(py), str(Path(__file__).resolve()), "--rehearsal-inner", "--out", str(args.out), "--site", str(site),
           "--phases", args.phases, *(["-k", args.k] if args.k else []),
           *(["--budget", str(args.budget)] if args.budget else [])]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
