"""CPU time and peak memory of ``token_logprobs`` (torch path) against the anchors, forward and forward+backward.

Implementations, on the same logits ``[N, V]`` (``randn · 2``) and ids:

- ``srpo-core``: ``token_logprobs(x, ids)``, ``backend="auto"`` (on CPU: the chunked torch path, compiled chunk
  functions where a C++ compiler works);
- ``srpo-core eager``: the same with compilation switched off (what ``SRPO_NO_COMPILE=1`` runs);
- ``naive``: ``log_softmax(x.float(), -1).gather(-1, ids)``;
- ``trl``: TRL's ``selective_log_softmax`` from ``trl.trainer.utils`` (its CPU path), when TRL imports.

Time: wall-clock median with 20/80 % quantiles over ``--repeats`` calls after one warm-up call (compilation happens
there). Peak memory of one call: on Linux the resident-set high-water mark above the RSS right before the call
(``malloc_trim``, then ``VmHWM`` reset through ``/proc/self/clear_refs`` and read back from ``/proc/self/status``),
i.e. the pages the call touched, whoever allocated them; elsewhere the torch profiler's live allocation bytes. Inputs
exist before the call and are not counted. For forward+backward the gradient ``x.grad`` (``N·V`` in the logits'
dtype, an output every implementation must write) is inside that peak; ``peak_beyond_grad`` subtracts it.

Usage:
- ``python benchmarks/bench_token_logprobs.py [--n 2048] [--v 151936] [--dtypes fp32,bf16] [--modes fwd,fwd+bwd]
  [--repeats 5] [--impls ...] [--interleave] [--json FILE]``: a table with ratios (anchor / ours: > 1 means ours
  is faster or leaner) plus the machine, versions and shapes, also written to ``--json``. ``--interleave`` times the
  implementations round-robin on shared inputs, the only fair comparison on a shared, noisy host.
- ``pytest benchmarks/bench_token_logprobs.py --benchmark-enable``: every implementation × mode × dtype under
  pytest-benchmark at ``SRPO_BENCH_N × SRPO_BENCH_V`` (default 256 × 32,000), peak memory in ``extra_info``. With the
  project's default ``--benchmark-disable`` each case runs once, as a smoke test.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import time

import pytest
import torch

from srpo_core.bench.host import cpu_info
from srpo_core.common import chunked as _chunked
from srpo_core.ops.token_logprobs import token_logprobs
from srpo_core.tuning import TUNING

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")


def trl_selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:  # TRL absent, or an import-time failure of its optional dependencies
        return None
    return selective_log_softmax


def _eager(fn):
    def run():
        old = TUNING.use_compile
        TUNING.use_compile = False
        try:
            return fn()
        finally:
            TUNING.use_compile = old

    return run


def implementations() -> dict:
    impls = {
        "srpo-core": lambda x, ids: token_logprobs(x, ids),
        "srpo-core eager": lambda x, ids: _eager(lambda: token_logprobs(x, ids))(),
        "naive": lambda x, ids: torch.log_softmax(x.float(), -1).gather(-1, ids[:, None]).squeeze(-1),
    }
    trl = trl_selective_log_softmax()
    if trl is not None:
        impls["trl"] = lambda x, ids: trl(x, ids)
    return impls


FLOOR_ROWS_BYTES = 1 << 20  # the exp floor's chunk: ~1 MiB of rows, so its output stays in L2


def floors() -> dict:
    """Forward-only lower bounds on the same logits: reading them once (a row max) and one ``exp`` per element
    (each chunk of rows into a reused, cache-resident buffer). Any exact log-softmax reads every logit and takes one
    exponential of each, so it can go no faster than the slower of the two."""
    def read_once(x, ids):
        return x.amax(-1)

    def exp_each(x, ids):
        rows = max(1, FLOOR_ROWS_BYTES // (x.shape[1] * 4))
        buf = torch.empty(rows, x.shape[1], dtype=torch.float32)
        for r0 in range(0, x.shape[0], rows):
            chunk = x[r0:r0 + rows]
            torch.exp(chunk, out=buf[:chunk.shape[0]])
        return buf

    return {"floor: read once": read_once, "floor: exp": exp_each}


def make_inputs(n: int, v: int, dtype: torch.dtype, requires_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 2).to(dtype)
    ids = torch.randint(0, v, (n,), generator=g)
    return x.requires_grad_(requires_grad), ids


def make_call(impl, mode: str, x, ids):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return impl(x, ids)
    else:
        def call():
            x.grad = None
            impl(x, ids).sum().backward()
    return call


def _hwm_reset() -> int | None:
    """Linux: return freed heap to the OS, reset the peak-RSS mark ``VmHWM``, return the RSS now (None elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except (OSError, AttributeError):
        return None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def peak_bytes(fn) -> tuple[int, str]:
    """Peak extra memory of ``fn()``: on Linux the resident-set high-water mark above the RSS before the call (pages
    actually touched, whoever allocated them); elsewhere the torch profiler's live allocation bytes."""
    rss0 = _hwm_reset()
    if rss0 is not None:
        fn()
        return _status_bytes("VmHWM") - rss0, "peak RSS (VmHWM after clear_refs) above the RSS before the call"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, "torch profiler: peak bytes live in torch allocations"


def time_call(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_s": statistics.median(times), "q20_s": q[0], "q80_s": q[3], "repeats": repeats}


def measure(name, impl, mode, n, v, dtype_name, repeats) -> dict:
    x, ids = make_inputs(n, v, DTYPES[dtype_name], requires_grad=mode != "fwd")
    call = make_call(impl, mode, x, ids)
    call()  # warm-up: compilation, allocator
    x.grad = None
    row = {"impl": name, "mode": mode, "dtype": dtype_name, "N": n, "V": v}
    row["peak_bytes"], row["memory_method"] = peak_bytes(call)
    row.update(time_call(call, repeats))
    if mode != "fwd":
        row["grad_bytes"] = x.numel() * x.element_size()
        row["peak_beyond_grad"] = row["peak_bytes"] - row["grad_bytes"]
    row["logits_gb_per_s"] = x.numel() * x.element_size() / row["median_s"] / 1e9
    return row


def measure_interleaved(impls: dict, mode, n, v, dtype_name, repeats) -> list[dict]:
    """Every implementation on the same inputs, timed round-robin (``repeats`` rounds of one call each), so a noisy
    shared host slows them alike; peak memory is measured once each, before the timing."""
    x, ids = make_inputs(n, v, DTYPES[dtype_name], requires_grad=mode != "fwd")
    calls = {name: make_call(impl, mode, x, ids) for name, impl in impls.items()}
    rows = {}
    for name, call in calls.items():
        call()  # warm-up: compilation, allocator
        x.grad = None
        row = {"impl": name, "mode": mode, "dtype": dtype_name, "N": n, "V": v, "interleaved": True}
        row["peak_bytes"], row["memory_method"] = peak_bytes(call)
        x.grad = None
        rows[name] = (row, [])
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            rows[name][1].append(time.perf_counter() - t0)
    out = []
    for row, times in rows.values():
        q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
        row.update({"median_s": statistics.median(times), "q20_s": q[0], "q80_s": q[3], "repeats": repeats})
        if mode != "fwd":
            row["grad_bytes"] = x.numel() * x.element_size()
            row["peak_beyond_grad"] = row["peak_bytes"] - row["grad_bytes"]
        row["logits_gb_per_s"] = x.numel() * x.element_size() / row["median_s"] / 1e9
        out.append(row)
    return out


def environment() -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "trl": version("trl"),
        "compile": _chunked.compile_wanted(torch.device("cpu")), **cpu_info(),
    }


def ratios(rows: list[dict]) -> list[dict]:
    """anchor / ours for time and peak memory, per (mode, dtype): > 1 means ours is faster / leaner."""
    out = []
    for r in rows:
        if r["impl"] == "srpo-core":
            continue
        ours = next((o for o in rows if o["impl"] == "srpo-core" and o["mode"] == r["mode"]
                     and o["dtype"] == r["dtype"]), None)
        if ours is None:
            continue
        entry = {"anchor": r["impl"], "mode": r["mode"], "dtype": r["dtype"],
                 "speedup": r["median_s"] / ours["median_s"],
                 "memory_ratio": r["peak_bytes"] / max(ours["peak_bytes"], 1)}
        if r["mode"] != "fwd":
            entry["memory_ratio_beyond_grad"] = r["peak_beyond_grad"] / max(ours["peak_beyond_grad"], 1)
        out.append(entry)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--v", type=int, default=151_936)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--impls", default=None, help="comma-separated subset of the implementations")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--interleave", action="store_true",
                        help="time the implementations round-robin on shared inputs (for a noisy, shared host)")
    args = parser.parse_args(argv)
    impls = implementations()
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls.split(",")}
    rows = []
    for dtype_name in args.dtypes.split(","):
        for mode in args.modes.split(","):
            mode_impls = {**impls, **(floors() if mode == "fwd" and not args.impls else {})}
            if args.interleave:
                measured = measure_interleaved(mode_impls, mode, args.n, args.v, dtype_name, args.repeats)
            else:
                measured = (measure(name, impl, mode, args.n, args.v, dtype_name, args.repeats)
                            for name, impl in mode_impls.items())
            for row in measured:
                name = row["impl"]
                rows.append(row)
                beyond = f"  beyond grad {row['peak_beyond_grad'] / 2**20:9.1f} MiB" if mode != "fwd" else ""
                print(f"{dtype_name:5s} {mode:8s} {name:16s} median {row['median_s'] * 1e3:9.1f} ms "
                      f"[{row['q20_s'] * 1e3:.1f}, {row['q80_s'] * 1e3:.1f}]  peak {row['peak_bytes'] / 2**20:9.1f} MiB"
                      f"{beyond}", flush=True)
    report = {"environment": environment(), "shape": {"N": args.n, "V": args.v}, "rows": rows,
              "ratios": ratios(rows)}
    env = report["environment"]
    print(f"host: {env.get('cpu_model')}, torch CPU capability {env.get('torch_cpu_capability')}, "
          f"{env['torch_threads']} torch thread(s); ISA: {' '.join(env.get('cpu_flags') or [])}")
    for r in report["ratios"]:
        extra = f", beyond grad {r['memory_ratio_beyond_grad']:.1f}x" if "memory_ratio_beyond_grad" in r else ""
        print(f"vs {r['anchor']:16s} {r['mode']:8s} {r['dtype']:5s}: {r['speedup']:.2f}x faster, "
              f"peak memory {r['memory_ratio']:.1f}x smaller{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------------------ pytest-benchmark
BENCH_N = int(os.environ.get("SRPO_BENCH_N", "256"))
BENCH_V = int(os.environ.get("SRPO_BENCH_V", "32000"))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["srpo-core", "srpo-core eager", "naive", "trl"])
def test_token_logprobs_cpu(benchmark, name, mode, dtype_name):
    impl = implementations().get(name)
    if impl is None:
        pytest.skip(f"{name} is not importable here")
    x, ids = make_inputs(BENCH_N, BENCH_V, DTYPES[dtype_name], requires_grad=mode != "fwd")
    call = make_call(impl, mode, x, ids)
    call()  # warm-up: compilation
    x.grad = None
    peak, method = peak_bytes(call)
    benchmark.extra_info.update({"N": BENCH_N, "V": BENCH_V, "peak_bytes": peak, "memory_method": method})
    benchmark(call)


if __name__ == "__main__":
    raise SystemExit(main())
