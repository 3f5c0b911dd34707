"""CPU forward of ``linear_token_contrast`` against naive (materialise both ``[N, V]`` logit sets, then the
divergence: ``srpo_core/reference/linear_token_contrast.py`` in fp32), issue 24's bar.

    python benchmarks/bench_linear_contrast.py time V KIND ROUNDS    # interleaved rounds, one process: medians
    python benchmarks/bench_linear_contrast.py mem METHOD V KIND     # one call in a fresh process: peak extra MiB

N = 1,024, H = 1,024, fp32. Memory is the high-water mark above the RSS right before the call (``VmHWM`` reset
through ``/proc/self/clear_refs`` after the inputs exist and a small warm-up call), as ``benchmarks/_mem.py``.
Run it with one thread: ``OMP_NUM_THREADS=1 taskset -c 0``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from srpo_core.bench.measure import _status_bytes
from srpo_core.ops.linear_token_contrast import linear_token_contrast
from srpo_core.reference.linear_token_contrast import linear_token_contrast as naive_ref

N, H = 1024, 1024


def inputs(v: int, n: int = N, h: int = H):
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g)
    ref = hid + 0.3 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * h ** -0.5
    ids = torch.randint(0, v, (n,), generator=g)
    return hid, ref, w, ids


def naive(hid, ref, w, ids, kind):
    return naive_ref(hid, ref, w, ids, kind=kind)


def ours(hid, ref, w, ids, kind):
    return tuple(linear_token_contrast(hid, ref, w, ids, kind=kind, backend="torch"))


METHODS = {"naive": naive, "ours": ours}




def main(argv) -> None:
    if argv[0] == "mem":
        method, v, kind = argv[1], int(argv[2]), argv[3]
        fn = METHODS[method]
        fn(*inputs(5000, 1024, 16), kind)  # warm-up: large enough for the compiled token_contrast chunks (js)
        x = inputs(v)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = _status_bytes("VmRSS:")
        out = fn(*x, kind)
        peak = _status_bytes("VmHWM:")
        del out
        print(json.dumps({"method": method, "V": v, "kind": kind, "extra_mb": round((peak - rss0) / 2 ** 20, 1)}))
        return
    v, kind, rounds = int(argv[1]), argv[2], int(argv[3])
    x = inputs(v)
    for fn in METHODS.values():
        fn(*inputs(5000, 1024, 16), kind)  # warm-up, as in `mem`
    times = {m: [] for m in METHODS}
    res = {}
    for _ in range(rounds):
        for m, fn in METHODS.items():
            t0 = time.perf_counter()
            res[m] = fn(*x, kind)
            times[m].append(time.perf_counter() - t0)
    err = max(float((a.double() - b.double()).abs().max()) for a, b in zip(res["ours"], res["naive"], strict=True))
    med = {m: statistics.median(t) for m, t in times.items()}
    print(json.dumps({"V": v, "kind": kind, "rounds": rounds, "threads": torch.get_num_threads(),
                      "median_s": {m: round(t, 3) for m, t in med.items()},
                      "all_s": {m: [round(t, 3) for t in ts] for m, ts in times.items()},
                      "ours_over_naive": round(med["ours"] / med["naive"], 3), "max_abs_diff": err}))


if __name__ == "__main__":
    main(sys.argv[1:])
