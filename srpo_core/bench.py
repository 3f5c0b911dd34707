"""`srpo-core bench`: every public op side by side with the anchors that run on this device.

Each case builds its inputs once and returns a closure; the harness times it (median with 20/80 quantiles; on CUDA
through ``triton.testing.do_bench``, which synchronises), measures the peak extra memory of one call, and reports
``ours / anchor`` ratios against srpo-core's CPU performance targets (the bars). The same case table feeds
``benchmarks/test_bench_ops.py`` (the pytest-benchmark suite: ``pytest benchmarks/test_bench_ops.py
--benchmark-enable``), and the JSON this writes feeds ``benchmarks/write_docs.py`` (the generated
``docs/benchmarks.md``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs. On CPU the peak resident set size above
the RSS right before the call: the kernel's high-water mark is reset (``/proc/self/clear_refs`` ← 5) and read back
(``VmHWM`` in ``/proc/self/status``). That counts every allocation (torch, inductor's C++ buffers, anchors' own
code), not only torch's. For freed memory to leave the RSS, glibc's mmap threshold is pinned at 128 KiB (it would
otherwise grow after the first large free and keep later buffers in the heap) and the heap is trimmed before each
call. Where ``/proc`` is missing (not Linux) the torch profiler's allocation events are replayed instead; the JSON says
which (``environment.memory_method``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

SCHEMA_VERSION = 1

# Size presets: "full" is what the bars are stated at (the linear op at N=1024, H=1024, V=151,936;
# benchmarks/linear_table.py measures it at N=2048 and other shapes); "quick" finishes in under a minute on 2 CPU
# cores; "tiny" is for the test that checks the JSON.
# what --op accepts
OPS = ("token_logprobs", "token_contrast", "linear_token_logprobs", "role_aware_advantages", "linear_policy_loss")
SIZES = {
    "full": {"logprob_rows": 4096, "vocab": 151_936, "role_tokens": 1 << 20, "linear": (1024, 1024, 151_936),
             "contrast_rows": 1024},
    "quick": {"logprob_rows": 512, "vocab": 32_000, "role_tokens": 1 << 17, "linear": (256, 512, 32_000),
              "contrast_rows": 256},
    "tiny": {"logprob_rows": 16, "vocab": 257, "role_tokens": 1 << 10, "linear": (16, 32, 257), "contrast_rows": 8},
}


@dataclasses.dataclass
class Case:
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    impl: str  # "srpo-core" for ours, otherwise the anchor's name
    shape: str
    dtype: str
    setup: Callable[[], Callable[[], object]]  # builds inputs, returns the timed closure
    devices: tuple[str, ...] = ("cpu", "cuda")


@dataclasses.dataclass
class Bar:
    """``ours / anchor`` of ``metric`` must be ≤ ``max_ratio`` (for times: "≥ k× faster" is ``max_ratio = 1/k``)."""

    op: str
    mode: str
    anchor: str
    metric: str  # "time" or "memory"
    max_ratio: float
    text: str


CPU_BARS = [
    Bar("token_logprobs", "fwd", "trl.selective_log_softmax", "time", 1 / 1.5, "≥ 1.5× faster than TRL"),
    Bar("token_logprobs", "fwd", "naive", "time", 1 / 3, "≥ 3× faster than naive"),
    Bar("token_logprobs", "fwd", "naive", "memory", 1 / 16, "peak extra memory ≤ 1/16 of naive"),
    Bar("token_logprobs", "fwd+bwd", "naive", "time", 1 / 3, "≥ 3× faster than naive"),
    Bar("token_logprobs", "fwd+bwd", "naive", "memory", 1 / 16, "peak extra memory ≤ 1/16 of naive"),
    Bar("role_aware_advantages", "fwd", "reference composition", "time", 1 / 3, "≥ 3× faster than the reference"),
]


# ----------------------------------------------------------------------------------------------------------- cases
def _logits(n: int, v: int, dtype: torch.dtype, device: str, requires_grad: bool = False):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    return x.requires_grad_(requires_grad), ids


def _fwd_bwd(fn, x):
    def run():
        x.grad = None
        fn().sum().backward()

    return run


def _token_logprob_cases(sizes, dtypes, device) -> list[Case]:
    n, v = sizes["logprob_rows"], sizes["vocab"]
    shape = f"N={n} V={v}"
    cases = []
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")

        def ours(mode, dtype=dtype):
            from srpo_core import token_logprobs

            x, ids = _logits(n, v, dtype, device, requires_grad=mode != "fwd")
            call = lambda: token_logprobs(x, ids)  # noqa: E731
            return call if mode == "fwd" else _fwd_bwd(call, x)

        def naive(mode, dtype=dtype):
            x, ids = _logits(n, v, dtype, device, requires_grad=mode != "fwd")
            call = lambda: torch.log_softmax(x.float(), -1).gather(-1, ids[:, None]).squeeze(-1)  # noqa: E731
            return call if mode == "fwd" else _fwd_bwd(call, x)

        def trl_sls(mode, dtype=dtype):
            from trl.trainer.utils import selective_log_softmax

            x, ids = _logits(n, v, dtype, device, requires_grad=mode != "fwd")
            call = lambda: selective_log_softmax(x, ids)  # noqa: E731
            return call if mode == "fwd" else _fwd_bwd(call, x)

        def trl_kernel(mode, dtype=dtype):
            from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

            x, ids = _logits(n, v, dtype, device, requires_grad=mode != "fwd")
            call = lambda: selective_log_softmax_and_entropy(x[None], ids[None])[0]  # noqa: E731
            return call if mode == "fwd" else _fwd_bwd(call, x)

        for mode in ("fwd", "fwd+bwd"):
            cases += [
                Case("token_logprobs", mode, "srpo-core", shape, dname, lambda m=mode, f=ours: f(m)),
                Case("token_logprobs", mode, "naive", shape, dname, lambda m=mode, f=naive: f(m)),
                Case("token_logprobs", mode, "trl.selective_log_softmax", shape, dname,
                     lambda m=mode, f=trl_sls: f(m)),
                Case("token_logprobs", mode, "trl.logprob_entropy kernel", shape, dname,
                     lambda m=mode, f=trl_kernel: f(m), devices=("cuda",)),
            ]
    return cases


def _three_gemms(hidden: torch.Tensor, weight: torch.Tensor):
    """The floor of an LM-head op's fwd+bwd: the GEMMs it cannot avoid (logits, grad_hidden, grad_weight)."""
    grad = torch.ones(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)

    def three():
        hidden @ weight.T
        grad @ weight
        grad.T @ hidden

    return three


def _linear_cases(sizes, dtypes, device) -> list[Case]:
    n, h, v = sizes["linear"]
    shape = f"N={n} H={h} V={v}"
    cases = []
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")

        def inputs(mode, dtype=dtype):
            g = torch.Generator(device="cpu").manual_seed(0)
            hidden = (torch.randn(n, h, generator=g)).to(device=device, dtype=dtype)
            weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(device=device, dtype=dtype)
            ids = torch.randint(0, v, (n,), generator=g).to(device)
            if mode != "fwd":
                hidden.requires_grad_(True)
                weight.requires_grad_(True)
            return hidden, weight, ids

        def wrap(mode, call, hidden, weight):
            if mode == "fwd":
                return call

            def run():
                hidden.grad = weight.grad = None
                call().sum().backward()

            return run

        def ours(mode):
            from srpo_core import linear_token_logprobs

            hidden, weight, ids = inputs(mode)
            return wrap(mode, lambda: linear_token_logprobs(hidden, weight, ids), hidden, weight)

        def naive(mode):
            hidden, weight, ids = inputs(mode)
            call = lambda: torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, ids[:, None])[:, 0]  # noqa: E731
            return wrap(mode, call, hidden, weight)

        def gemm(mode, dtype=dtype):
            hidden, weight, _ = inputs("fwd", dtype)
            if mode == "fwd":
                return lambda: hidden @ weight.T
            return _three_gemms(hidden, weight)

        def trl_chunked(mode):
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk  # what GRPOTrainer passes

            hidden, weight, ids = inputs(mode)
            call = lambda: ChunkedLogProbFunction.apply(hidden, weight, None, ids, 1.0, chunk, None, 1.0, ())[0]  # noqa: E731
            return wrap(mode, call, hidden, weight)

        def cce(mode):
            from cut_cross_entropy import linear_cross_entropy

            hidden, weight, ids = inputs(mode)
            impl = "cce" if device == "cuda" else "torch_compile"
            call = lambda: -linear_cross_entropy(hidden, weight, ids, reduction="none", impl=impl)  # noqa: E731
            return wrap(mode, call, hidden, weight)

        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in (("srpo-core", ours), ("naive", naive), ("GEMM floor", gemm),
                             ("trl.ChunkedLogProbFunction", trl_chunked), ("cut-cross-entropy", cce)):
                cases.append(Case("linear_token_logprobs", mode, impl, shape, dname, lambda m=mode, f=fn: f(m)))
    return cases


def _contrast_cases(sizes, dtypes, device) -> list[Case]:
    n, v = sizes["contrast_rows"], sizes["vocab"]
    shape = f"N={n} V={v}"
    cases = []
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")

        def ours(dtype=dtype):
            from srpo_core import token_contrast

            x, ids = _logits(n, v, dtype, device)
            y, _ = _logits(n, v, dtype, device)
            y = y.roll(1, 0)
            return lambda: token_contrast(x, y, ids, kind="kl")

        def naive(dtype=dtype):
            x, ids = _logits(n, v, dtype, device)
            y, _ = _logits(n, v, dtype, device)
            y = y.roll(1, 0)

            def call():
                lp, lq = torch.log_softmax(x.float(), -1), torch.log_softmax(y.float(), -1)
                return (lp.exp() * (lp - lq)).sum(-1), lp.gather(-1, ids[:, None]), lq.gather(-1, ids[:, None])

            return call

        cases += [Case("token_contrast", "fwd", "srpo-core", shape, dname, ours),
                  Case("token_contrast", "fwd", "naive", shape, dname, naive)]
    return cases


def _role_cases(sizes, device) -> list[Case]:
    n = sizes["role_tokens"]
    t = 1024 if n >= 1024 else n
    b = n // t
    shape = f"{n} tokens (B={b}, T={t})"

    def inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        mask = torch.rand(b, t, generator=g) < 0.95
        lp, lc, la = (-(torch.rand(b, t, generator=g) * 4) for _ in range(3))
        roles = torch.randint(0, 3, (b, t), generator=g)
        adv = torch.randn(b, generator=g)
        return [x.to(device) for x in (adv, lp, lc, la, roles, mask)]

    def ours():
        from srpo_core import role_aware_advantages

        adv, lp, lc, la, roles, mask = inputs()
        return lambda: role_aware_advantages(adv, lp, lc, la, roles, mask=mask).advantages

    def reference():
        from srpo_core.config import SRPOConfig
        from srpo_core.layout import cu_seqlens_from_mask
        from srpo_core.reference.contrast import contrast
        from srpo_core.reference.role_weights import role_weights

        adv, lp, lc, la, roles, mask = inputs()
        cfg = SRPOConfig()

        def call():  # the plain composition: pack, contrast, SPEC steps 2-6, unpack
            r = roles[mask]
            s = torch.where(r == 1, contrast(lp[mask], lc[mask], "k3"), contrast(lp[mask], la[mask], "logratio"))
            out = torch.zeros(mask.shape, dtype=s.dtype, device=s.device)
            out[mask] = role_weights(adv, s, r, cu_seqlens_from_mask(mask), cfg).advantages
            return out

        return call

    def vppo():
        from srpo_core.presets import vppo_advantages

        adv, lp, lc, _, _, mask = inputs()
        return lambda: vppo_advantages(adv, lp, lc, mask=mask)

    return [Case("role_aware_advantages", "fwd", "srpo-core", shape, "float32", ours),
            Case("role_aware_advantages", "fwd", "reference composition", shape, "float32", reference),
            Case("role_aware_advantages", "fwd", "vppo_advantages (preset)", shape, "float32", vppo)]


# Shapes of the fused policy loss (issue 12's bars are stated at N=1024, H=1024, V ∈ {32,000, 151,936}, fp32).
POLICY_LOSS_SHAPES = {"full": [(4, 256, 1024, 32_000), (4, 256, 1024, 151_936)], "quick": [(2, 128, 512, 32_000)],
                      "tiny": [(2, 8, 32, 257)]}


def _policy_loss_cases(preset, dtypes, device) -> list[Case]:
    """fwd+bwd of a GRPO step's loss (PPO-clip, token-mean, per-sequence advantages so that Liger can take them) from
    hidden states: ours, naive torch, the three GEMMs, our log-prob op + the loss in torch, Liger's fused GRPO loss."""
    return [c for s in POLICY_LOSS_SHAPES[preset] for d in dtypes for c in _policy_loss_shape(*s, d, preset, device)]


def _policy_loss_shape(b, t, h, v, dtype, preset, device) -> list[Case]:
    from srpo_core.reference.policy_loss import token_loss

    shape, dname, n = f"N={b * t} H={h} V={v}", str(dtype).removeprefix("torch."), b * t

    def inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(b, t, h, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(device=device, dtype=dtype).requires_grad_(True)
        ids = torch.randint(0, v, (b, t), generator=g).to(device)
        old = (-torch.rand(b, t, generator=g) * 8).to(device)
        return hidden, weight, ids, old, torch.randn(b, generator=g).to(device), torch.ones(b, t, dtype=torch.bool,
                                                                                           device=device)

    def step(loss_fn, hidden, weight):
        def run():
            hidden.grad = weight.grad = None
            loss_fn().backward()

        run.params = (hidden, weight)  # the memory table frees their gradients before measuring one call
        return run

    def torch_loss(logp, old, adv, mask):
        ell, _ = token_loss(logp, old, adv[:, None].expand_as(old), None, None, epsilon_low=0.2,
                            epsilon_high=0.28, clip_ratio_c=None, beta=0.0, kl_kind="k3", entropy_coeff=0.0)
        return (ell * mask).sum() / mask.sum()

    def ours():
        from srpo_core import linear_policy_loss

        hidden, weight, ids, old, adv, mask = inputs()
        return step(lambda: linear_policy_loss(hidden, weight, ids, old, adv, mask=mask, epsilon_high=0.28).loss,
                    hidden, weight)

    def naive():
        hidden, weight, ids, old, adv, mask = inputs()
        lp = lambda: torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, ids[..., None])[..., 0]  # noqa: E731
        return step(lambda: torch_loss(lp(), old, adv, mask), hidden, weight)

    def ours_logprobs():
        from srpo_core import linear_token_logprobs

        hidden, weight, ids, old, adv, mask = inputs()
        lp = lambda: linear_token_logprobs(hidden.reshape(-1, h), weight, ids.reshape(-1)).reshape(b, t)  # noqa: E731
        return step(lambda: torch_loss(lp(), old, adv, mask), hidden, weight)

    def gemm():
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden, weight = (torch.randn(n, h, generator=g).to(device, dtype), torch.randn(v, h, generator=g).to(
            device, dtype))
        return _three_gemms(hidden, weight)

    def liger():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        hidden, weight, ids, old, adv, mask = inputs()
        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                      loss_type="bnpo", compiled=True)
        return step(lambda: fn(hidden, weight, ids, mask.long(), adv, old_per_token_logps=old)[0], hidden, weight)

    impls = [("srpo-core", ours), ("naive", naive), ("GEMM floor", gemm),
             ("our log-probs + loss", ours_logprobs)]
    if preset != "tiny":  # Liger's compile alone takes longer than the whole tiny run
        impls.append(("liger.LigerFusedLinearGRPOLoss", liger))
    return [Case("linear_policy_loss", "fwd+bwd", impl, shape, dname, fn) for impl, fn in impls]


def build_cases(preset: str, device: str) -> list[Case]:
    sizes = SIZES[preset]
    dtypes = (torch.float32, torch.bfloat16) if preset != "tiny" else (torch.float32,)
    cases = (_token_logprob_cases(sizes, dtypes, device) + _contrast_cases(sizes, dtypes[:1], device)
             + _linear_cases(sizes, dtypes[:1], device) + _role_cases(sizes, device)
             + _policy_loss_cases(preset, dtypes[:1], device))
    return [c for c in cases if device in c.devices]


# ------------------------------------------------------------------------------------------------------ measuring
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


def _ratios(results: list[dict]) -> list[dict]:
    """``ours / anchor`` for time and memory, per (op, mode, shape, dtype)."""
    ours = {(r["op"], r["mode"], r["shape"], r["dtype"]): r for r in results
            if r["impl"] == "srpo-core" and r["status"] == "ok"}
    out = []
    for r in results:
        key = (r["op"], r["mode"], r["shape"], r["dtype"])
        if r["impl"] == "srpo-core" or r["status"] != "ok" or key not in ours:
            continue
        o = ours[key]
        out.append({"op": r["op"], "mode": r["mode"], "shape": r["shape"], "dtype": r["dtype"], "anchor": r["impl"],
                    "time_ratio": o["median_s"] / r["median_s"],
                    "memory_ratio": (o["peak_bytes"] / r["peak_bytes"]) if r["peak_bytes"] else None})
    return out


def _bars(ratios: list[dict], device: str, preset: str) -> list[dict]:
    """The CPU bars, evaluated on every run; they *apply* only at the sizes they are stated at (``full``): elsewhere
    a row informs and holds nothing (``applies`` false)."""
    if device != "cpu":
        return []
    out = []
    for bar in CPU_BARS:
        for r in ratios:
            if (r["op"], r["mode"], r["anchor"]) != (bar.op, bar.mode, bar.anchor):
                continue
            value = r["time_ratio"] if bar.metric == "time" else r["memory_ratio"]
            out.append({"op": bar.op, "mode": bar.mode, "anchor": bar.anchor, "metric": bar.metric,
                        "shape": r["shape"], "dtype": r["dtype"], "bar": bar.text, "max_ratio": bar.max_ratio,
                        "ratio": value, "held": value is not None and value <= bar.max_ratio,
                        "applies": preset == "full"})
    return out


# x86 / Arm feature flags that decide which SIMD paths torch, inductor and oneDNN take (the rest of cpuinfo is noise).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


def cpu_info() -> dict:
    """CPU model, the ISA flags of :data:`ISA_FLAGS` it has, and torch's CPU capability (the SIMD level its own
    kernels dispatch to, e.g. ``AVX2`` or ``AVX512``): the numbers of a CPU run depend on all three."""
    model, flags = platform.processor() or None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and value.strip():
                    model = model if key == "hardware" and model else value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
                if not line.strip() and flags:  # the first processor block is enough
                    break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = None
    return {"cpu_model": model, "cpu_flags": [f for f in ISA_FLAGS if f in flags],
            "torch_cpu_capability": capability}


def environment(device: str) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "machine": platform.machine(), "processor": platform.processor() or None,
           "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__, **cpu_info()}
    for mod in ("triton", "trl", "cut_cross_entropy", "liger_kernel", "srpo_core"):
        env[mod] = version(mod)
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["memory_method"] = "torch.cuda.max_memory_allocated above the inputs"
    else:
        env["memory_method"] = ("peak RSS above the RSS before the call (VmHWM after clear_refs)"
                                if _rss_method_available() else "torch profiler allocation events")
    env["load_average"] = _load()
    return env


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in __import__("os").getloadavg()]
    except OSError:
        return None


def run(preset: str = "quick", device: str | None = None, ops: list[str] | None = None,
        progress: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"bench: unknown op {', '.join(map(repr, unknown))}; the ops are {', '.join(OPS)}")
    env = environment(device)  # load average before the run
    start = time.perf_counter()
    cases = [c for c in build_cases(preset, device) if not ops or c.op in ops]
    min_time = {"full": 2.0, "quick": 0.3, "tiny": 0.0}[preset]
    results = []
    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("benchmarking", total=len(cases))
            for c in cases:
                bar.update(task, description=f"{c.op} {c.mode} {c.impl} {c.dtype}")
                results.append(measure(c, device, min_time=min_time))
                bar.advance(task)
    else:
        results = [measure(c, device, min_time=min_time) for c in cases]
    ratios = _ratios(results)
    env["load_average_after"] = _load()
    env["wall_s"] = round(time.perf_counter() - start, 1)
    return {"schema": SCHEMA_VERSION, "preset": preset, "environment": env, "results": results,
            "ratios": ratios, "bars": _bars(ratios, device, preset)}


# ------------------------------------------------------------------------------------------------------- output
def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def _fmt_bytes(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:.1f} MiB"


RATIO_NOTE = ("ours/it: srpo-core's median time (peak memory) divided by this row's; below 1, srpo-core is faster "
              "(smaller). peak mem: the most extra memory one call takes above its inputs.")


def check_arguments(device: str | None, json_path: str | None, plot_path: str | None) -> None:
    """What ``srpo-core bench`` checks before a run of minutes: the device exists, ``--json`` / ``--plot`` can be
    written, matplotlib imports for ``--plot``. Raises ``ValueError`` with the option named."""
    import importlib.util
    import os
    import pathlib

    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None and torch.version.hip is None
               else "no GPU is visible")
        raise ValueError(f"--device cuda: {why} (torch {torch.__version__}); use --device cpu or leave it out")
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is None:
            continue
        target = pathlib.Path(path)
        parent = target.parent if str(target.parent) else pathlib.Path(".")
        if target.is_dir():
            raise ValueError(f"{option} {path}: is a directory; give a file name")
        if not parent.is_dir():
            raise ValueError(f"{option} {path}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise ValueError(f"{option} {path}: cannot be written (no write permission)")
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib, which is not installed (pip install matplotlib, or the `bench` "
                         "extra of srpo-core)")


def header_lines(report: dict) -> list[str]:
    """The run's identity, one fact per line: what ran, where (CPU model, ISA flags, torch's CPU capability or the
    GPU), with which versions, and when. Lines are short; a long flag list wraps on its own."""
    env = report["environment"]
    lines = [f"srpo-core bench ({report['preset']} sizes) on {env['device']} · {env['date']}",
             f"torch {env['torch']} · triton {env.get('triton') or 'not installed'} · python {env['python']}"]
    if env.get("gpu"):
        lines.append(f"GPU: {env['gpu']}")
    lines.append(f"CPU: {env.get('cpu_model') or env.get('processor') or env['machine']} · {env['cpu_count']} cores, "
                 f"{env['torch_threads']} torch threads")
    lines.append(f"ISA: {' '.join(env.get('cpu_flags') or []) or 'unknown'} · torch CPU capability "
                 f"{env.get('torch_cpu_capability') or 'unknown'}")
    return lines


def print_report(report: dict, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for i, line in enumerate(header_lines(report)):
        console.print(f"[bold]{line}[/]" if i == 0 else line, overflow="fold", highlight=False)
    console.print(f"[dim]{RATIO_NOTE}[/]", highlight=False)
    ours = {(r["op"], r["mode"], r["shape"], r["dtype"]): r for r in report["results"]
            if r["impl"] == "srpo-core" and r["status"] == "ok"}
    groups = dict.fromkeys((r["op"], r["dtype"]) for r in report["results"])
    for op, dtype in groups:
        rows = [r for r in report["results"] if (r["op"], r["dtype"]) == (op, dtype)]
        table = Table(title=f"{op} · {dtype} · {rows[0]['shape']}", title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        for col in ("mode", "implementation", "median", "peak mem", "ours/it\ntime", "ours/it\nmem"):
            table.add_column(col, justify="left" if col in ("mode", "implementation") else "right", no_wrap=True)
        for r in rows:
            if r["status"] != "ok":
                table.add_row(r["mode"], r["impl"], f"[dim]{r['status']}[/]", "", "", "")
                continue
            o = ours.get((r["op"], r["mode"], r["shape"], r["dtype"]))
            t_ratio = m_ratio = ""
            if o is not None and r["impl"] != "srpo-core":
                t_ratio = f"{o['median_s'] / r['median_s']:.3f}"
                m_ratio = f"{o['peak_bytes'] / r['peak_bytes']:.3f}" if r["peak_bytes"] else "—"
            name = f"[bold]{r['impl']}[/]" if r["impl"] == "srpo-core" else r["impl"]
            table.add_row(r["mode"], name, _fmt_time(r["median_s"]), _fmt_bytes(r["peak_bytes"]), t_ratio, m_ratio)
        console.print(table)
    skipped = [r for r in report["results"] if r["status"] != "ok"]
    for r in skipped:
        console.print(f"[dim]{r['op']} {r['mode']} {r['impl']}: {r['status']} ({r['reason']})[/]", overflow="fold")
    if report["bars"]:
        applies = all(b.get("applies", True) for b in report["bars"])
        console.print("[bold]bars[/]: srpo-core's CPU targets, " + (
            "held or missed at these (full) sizes" if applies else
            "for information only: they are stated at the full sizes (`srpo-core bench`), so nothing is judged here"),
            overflow="fold", highlight=False)
        for b in report["bars"]:
            if not b.get("applies", True):
                verdict = "[dim]info  [/]"
            else:
                verdict = "[green]held  [/]" if b["held"] else "[red]missed[/]"
            value = "—" if b["ratio"] is None else f"{b['ratio']:.3f} (target ≤ {b['max_ratio']:.3f})"
            console.print(f"  {verdict} {b['op']} {b['mode']} {b['dtype']}: {b['bar']}, ours/anchor {value}",
                          overflow="fold", highlight=False)


def plot(report: dict, path: str) -> None:
    """Median time and peak memory per implementation, one panel pair per (op, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    groups = sorted({(r["op"], r["mode"], r["dtype"]) for r in ok})
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 2.2 * len(groups) + 0.5), squeeze=False)
    for (op, mode, dtype), (ax_t, ax_m) in zip(groups, axes, strict=True):
        rows = [r for r in ok if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        names = [r["impl"] for r in rows]
        colors = ["tab:red" if n == "srpo-core" else "tab:gray" for n in names]
        ax_t.barh(names, [r["median_s"] * 1e3 for r in rows], color=colors)
        ax_t.set_xlabel("median time (ms)")
        ax_t.set_title(f"{op} {mode} {dtype} · {rows[0]['shape']}", fontsize=8)
        ax_m.barh(names, [r["peak_bytes"] / 2**20 for r in rows], color=colors)
        ax_m.set_xlabel("peak extra memory (MiB)")
        for ax in (ax_t, ax_m):
            ax.tick_params(labelsize=7)
    env = report["environment"]
    fig.suptitle(f"srpo-core bench ({report['preset']}) · {env['device']} · torch {env['torch']} · {env['date']}\n"
                 f"CPU {env.get('cpu_model')} · torch CPU capability {env.get('torch_cpu_capability')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
