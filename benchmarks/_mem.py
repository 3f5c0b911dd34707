"""Peak-memory probe: ``python benchmarks/_mem.py METHOD MODE N H V DTYPE`` prints one JSON line.

Runs one call of ``METHOD`` (see ``linear_methods.METHODS``) in this fresh process and reports the peak resident set
size above the RSS right before the call: the kernel's high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs``
<- 5) after the inputs exist and after a tiny warm-up call (so torch.compile's own memory is not counted), and read
back from ``/proc/self/status`` after the call; minus the ``psutil`` RSS at the reset. ``extra_mb`` also subtracts
what the call must return (for ``fwdbwd``: the gradients of hidden and weight): the working memory the method adds.
"""

from __future__ import annotations

import json
import sys

import psutil
import torch

from srpo_core.bench.linear_methods import METHODS, make_inputs
from srpo_core.bench.measure import _status_bytes


def main(argv=None) -> None:
    method, mode, n, h, v, dtype = (argv or sys.argv[1:])[:6]
    n, h, v = int(n), int(h), int(v)
    dt = getattr(torch, dtype)
    fn = METHODS[method]
    small = make_inputs(8, 16, 64, dt)
    fn(*small, backward=(mode == "fwdbwd"))  # warm-up (torch.compile for cut-cross-entropy)
    del small
    inputs = make_inputs(n, h, v, dt)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = psutil.Process().memory_info().rss
    out = fn(*inputs, backward=(mode == "fwdbwd"))
    peak = _status_bytes("VmHWM:")
    returned = 0
    if mode == "fwdbwd":
        returned = (n * h + v * h) * inputs[0].element_size()
    del out
    print(json.dumps({"method": method, "mode": mode, "peak_mb": (peak - rss0) / 2 ** 20,
                      "extra_mb": (peak - rss0 - returned) / 2 ** 20}))


if __name__ == "__main__":
    main()
