"""Timing and peak memory of one case of `srpo-core bench`.

Time: the median with 20/80 quantiles; on CUDA through ``triton.testing.do_bench``, which synchronises.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs. On CPU the peak resident set size above
the RSS right before the call: the kernel's high-water mark is reset (``/proc/self/clear_refs`` ← 5) and read back
(``VmHWM`` in ``/proc/self/status``). That counts every allocation (torch, inductor's C++ buffers, anchors' own
code), not only torch's. For freed memory to leave the RSS, glibc's mmap threshold is pinned at 128 KiB (it would
otherwise grow after the first large free and keep later buffers in the heap) and the heap is trimmed before each
call. Where ``/proc`` is missing (not Linux) the torch profiler's allocation events are replayed instead; the JSON says
which (``environment.memory_method``).
"""

from __future__ import annotations

import statistics
import time

import torch

from srpo_core.bench.cases import Case


def _time_cpu(fn, min_time: float, min_rounds: int, max_rounds: int) -> list[float]:
    fn()  # warm-up (compilation, allocator)
    times, start = [], time.perf_counter()
    while len(times) < max_rounds and (len(times) < min_rounds or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


_LIBC = None


def _rss_method_available() -> bool:
    """Linux with a writable ``/proc/self/clear_refs`` and glibc (``mallopt``, ``malloc_trim``)."""
    global _LIBC
    if _LIBC is not None:
        return bool(_LIBC)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB, and no more dynamic growth of it
        _LIBC = libc
    except (OSError, AttributeError):
        _LIBC = False
    return bool(_LIBC)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _peak_cpu(fn) -> int:
    if _rss_method_available():
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS:")
        out = fn()
        peak = _status_bytes("VmHWM:")
        del out
        return max(0, peak - before)
    return _peak_cpu_profiler(fn)


def _peak_cpu_profiler(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are attributed to the op that made them, frees come as "[memory]" events: replay both in time order.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _peak_cuda(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(case: Case, device: str, *, min_time: float, min_rounds: int = 3, max_rounds: int = 50) -> dict:
    row = {"op": case.op, "mode": case.mode, "impl": case.impl, "shape": case.shape, "dtype": case.dtype}
    try:
        fn = case.setup()
    except ImportError as e:
        return {**row, "status": "skipped", "reason": f"not installed: {e.name or e}"}
    except Exception as e:  # an anchor that cannot run here (e.g. a CUDA-only path) is reported, not fatal
        return {**row, "status": "skipped", "reason": f"{type(e).__name__}: {e}"[:200]}
    try:
        if device == "cuda":
            import triton.testing

            med, q20, q80 = (x / 1e3 for x in triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
            rounds = None
            peak = _peak_cuda(fn)
        else:
            times = _time_cpu(fn, min_time, min_rounds, max_rounds)
            qs = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
            med, q20, q80, rounds = statistics.median(times), qs[0], qs[3], len(times)
            peak = _peak_cpu(fn)
    except Exception as e:
        return {**row, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:200]}
    return {**row, "status": "ok", "median_s": med, "q20_s": q20, "q80_s": q80, "rounds": rounds,
            "peak_bytes": peak}
