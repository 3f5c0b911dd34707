"""Time the fused kernels on a CUDA GPU against the anchors that run there and the device's ceilings.

For each case: the median and 20/80 % quantiles of ``triton.testing.do_bench`` (which synchronises), the effective
bandwidth ``floor_bytes / time`` and the useful ``flops / time``, each also as a fraction of the device's datasheet
peak (``PEAKS``, looked up from the device name: H100 SXM / PCIe, H200; other devices get no fraction), and
``floor_time = floor_bytes / copy_bandwidth`` with ``copy_bandwidth`` measured here (a device-to-device copy of
``--copy-mib`` MiB, read + write). ``floor_bytes`` is what the op must move at least (docs/kernels.md): ``N·V·s`` for
log-probs forward, ``3·N·V·s`` forward+backward, ``2·N·V·s`` for a contrast; for the linear op the inputs and
gradients once, ``(N·H + V·H)·s`` forward and three times that forward+backward, and ``2·N·V·H`` FLOPs forward,
``6·N·V·H`` forward+backward (the three products no method avoids).

Cases (an anchor that does not import or run here is a "skipped" row with the reason; an error in srpo-core's own
row is an "error" row, which ``make gpu-check`` counts as a failure):
- ``token_logprobs`` fwd and fwd+bwd, without and with entropy: srpo-core (``backend="triton"``), TRL's Triton kernel
  ``trl.kernels.logprob_entropy.selective_log_softmax_and_entropy`` (always computes both), Liger-Kernel's
  ``LigerCrossEntropyLoss(reduction="none")`` (log-probs only), naive ``log_softmax(x.float()).gather``;
- ``token_contrast`` kl and js: srpo-core, naive (two fp32 ``log_softmax`` and a sum);
- ``linear_token_logprobs`` fwd and fwd+bwd: srpo-core, TRL's ``ChunkedLogProbFunction`` (chunk 32768, as its
  trainer), Liger's ``LigerFusedLinearCrossEntropyLoss(reduction="none")``, cut-cross-entropy's
  ``linear_cross_entropy(impl="cce", reduction="none")``, naive (``hidden @ Wᵀ`` then log-softmax);
- ``role_aware_advantages`` (``backend="triton"`` vs ``"torch"``).

srpo-core's own rows run first; ``--seconds S`` starts no row after S seconds (``make gpu-check`` gives the bench what
is left of its budget), so a run cut short is a partial result with our rows in it, not a failure.

Usage: ``python benchmarks/gpu_bench.py [--rows 4096] [--vocab 151936] [--dtype bf16] [--linear-rows 8192]
[--hidden 2048] [--seconds S] [--smoke] [--json FILE] [--markdown FILE]``. Exits with status 2 and a message on a
machine without CUDA (nothing is timed, no number is invented), unless ``--smoke``: tiny shapes, each case built and
called once on the CPU through Triton's interpreter, no timing (the check's rehearsal).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

NO_CUDA_STATUS = 2
# where the cases put their tensors: "cuda", except in ``--smoke`` (the rehearsal runs every case once on the CPU)
DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Datasheet peaks (dense, no sparsity): memory bytes/s and FLOP/s per operand dtype (fp32 = plain FP32 cores; the
# fp32 linear kernels use IEEE dots, not TF32). Matched by substring of torch.cuda.get_device_name(), first hit wins.
PEAKS = (
    ("H200", {"bytes_per_s": 4.8e12, "bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bytes_per_s": 2.0e12, "bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bytes_per_s": 3.35e12, "bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
)


def device_peaks(name: str) -> dict | None:
    return next((dict(p, device=key) for key, p in PEAKS if key in name), None)


def version(name: str) -> str | None:
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return None


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "driver_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "trl": version("trl"),
        "srpo_core": version("srpo_core"),
    }


def copy_bandwidth(mib: int) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written over the median time)."""
    from triton.testing import do_bench

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * src.numel() / (ms * 1e-3)


def make_inputs(n: int, v: int, dtype: torch.dtype, *, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = (torch.randn(n, v, generator=g, device=DEVICE) * 2).to(dtype).requires_grad_(requires_grad)
    ids = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    return x, ids


def fwd_bwd(call, x):
    def run():
        out = call()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad).backward()

    run.grad_to_none = [x]
    return run


OURS = "srpo-core"


def logprob_cases(n: int, v: int, dtype: torch.dtype) -> list[tuple]:
    """(op, mode, impl, setup -> callable, floor bytes, useful FLOPs or None)."""
    s = torch.finfo(dtype).bits // 8
    cases = []
    for entropy in (False, True):
        op = "token_logprobs+entropy" if entropy else "token_logprobs"
        for mode in ("fwd", "fwd+bwd"):
            floor = (1 if mode == "fwd" else 3) * n * v * s
            grad = mode != "fwd"

            def ours(grad=grad, entropy=entropy):
                from srpo_core.ops.token_logprobs import token_logprobs

                x, ids = make_inputs(n, v, dtype, requires_grad=grad)
                call = lambda: token_logprobs(x, ids, return_entropy=entropy, backend="triton")  # noqa: E731
                return fwd_bwd(call, x) if grad else call

            def trl(grad=grad):
                from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

                x, ids = make_inputs(n, v, dtype, requires_grad=grad)
                call = lambda: selective_log_softmax_and_entropy(x, ids)  # noqa: E731
                return fwd_bwd(call, x) if grad else call

            def liger(grad=grad):
                from liger_kernel.transformers import LigerCrossEntropyLoss

                x, ids = make_inputs(n, v, dtype, requires_grad=grad)
                loss = LigerCrossEntropyLoss(reduction="none")
                call = lambda: loss(x, ids)  # noqa: E731  (its backward writes the gradient into x's buffer)
                return fwd_bwd(call, x) if grad else call

            def naive(grad=grad, entropy=entropy):
                x, ids = make_inputs(n, v, dtype, requires_grad=grad)

                def call():
                    lp = torch.log_softmax(x.float(), -1)
                    out = lp.gather(-1, ids[:, None]).squeeze(-1)
                    return (out, -(lp.exp() * lp).sum(-1)) if entropy else out

                return fwd_bwd(call, x) if grad else call

            cases += [(op, mode, OURS, ours, floor, None), (op, mode, "trl (triton, +entropy)", trl, floor, None)]
            if not entropy:
                cases.append((op, mode, "liger", liger, floor, None))
            cases.append((op, mode, "naive torch", naive, floor, None))
    return cases


def contrast_cases(n: int, v: int, dtype: torch.dtype) -> list[tuple]:
    s = torch.finfo(dtype).bits // 8
    cases = []
    for kind in ("kl", "js"):
        def ours(kind=kind):
            from srpo_core.ops.token_contrast import token_contrast

            x, ids = make_inputs(n, v, dtype, seed=0)
            y, _ = make_inputs(n, v, dtype, seed=1)
            return lambda: token_contrast(x, y, ids, kind=kind, backend="triton")

        def naive(kind=kind):
            x, ids = make_inputs(n, v, dtype, seed=0)
            y, _ = make_inputs(n, v, dtype, seed=1)

            def call():
                lp, lq = torch.log_softmax(x.float(), -1), torch.log_softmax(y.float(), -1)
                if kind == "kl":
                    div = (lp.exp() * (lp - lq)).sum(-1)
                else:
                    lm = torch.logaddexp(lp, lq) - 0.6931471805599453
                    div = 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))
                return div, lp.gather(-1, ids[:, None]), lq.gather(-1, ids[:, None])

            return call

        cases += [(f"token_contrast[{kind}]", "fwd", OURS, ours, 2 * n * v * s, None),
                  (f"token_contrast[{kind}]", "fwd", "naive torch", naive, 2 * n * v * s, None)]
    return cases


def linear_cases(n: int, h: int, v: int, dtype: torch.dtype) -> list[tuple]:
    s = torch.finfo(dtype).bits // 8
    cases = []

    def inputs(grad):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        hidden = torch.randn(n, h, generator=g, device=DEVICE).to(dtype).requires_grad_(grad)
        weight = (torch.randn(v, h, generator=g, device=DEVICE) * h ** -0.5).to(dtype).requires_grad_(grad)
        return hidden, weight, torch.randint(0, v, (n,), generator=g, device=DEVICE)

    def wrap(make_call, grad):
        hidden, weight, ids = inputs(grad)
        call = make_call(hidden, weight, ids)
        if not grad:
            return lambda: _no_grad(call)
        run = fwd_bwd(call, hidden)
        run.grad_to_none = [hidden, weight]
        return run

    impls = {
        OURS: lambda hid, w, ids: lambda: _ours_linear(hid, w, ids),
        "trl (chunked)": lambda hid, w, ids: lambda: _trl_linear(hid, w, ids),
        "liger (flce)": _liger_linear,
        "cut-cross-entropy": lambda hid, w, ids: lambda: _cce_linear(hid, w, ids),
        "naive torch": lambda hid, w, ids: lambda: torch.log_softmax((hid @ w.T).float(), -1).gather(
            -1, ids[:, None])[:, 0],
    }
    for mode in ("fwd", "fwd+bwd"):
        grad = mode != "fwd"
        floor = (1 if mode == "fwd" else 3) * (n * h + v * h) * s
        flops = (2 if mode == "fwd" else 6) * n * v * h
        for impl, make in impls.items():
            cases.append(("linear_token_logprobs", mode, impl,
                          lambda make=make, grad=grad: wrap(make, grad), floor, flops))
    return cases


def policy_loss_cases(n: int, h: int, v: int, dtype: torch.dtype) -> list[tuple]:
    """fwd+bwd of a GRPO loss from hidden states (``srpo_core.bench.cases``' policy-loss rows, on CUDA): ours (Triton),
    ours (torch path), naive torch, the three GEMMs alone, our log-probs + the loss, Liger's fused GRPO loss."""
    from srpo_core.bench.cases import policy_loss_shape

    floor, flops = 3 * (n * h + v * h) * (torch.finfo(dtype).bits // 8), 6 * n * v * h
    return [(c.op, c.mode, c.impl, c.setup, floor, flops) for c in policy_loss_shape(1, n, h, v, dtype, "full", DEVICE)]


def _no_grad(call):
    with torch.no_grad():
        return call()


def _ours_linear(hidden, weight, ids):
    from srpo_core.ops.linear_token_logprobs import linear_token_logprobs

    return linear_token_logprobs(hidden, weight, ids, backend="triton")


def _trl_linear(hidden, weight, ids):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, ids, 1.0, 32768, None, 1.0, ())[0]


def _liger_linear(hidden, weight, ids):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda: loss(weight, hidden, ids)


def _cce_linear(hidden, weight, ids):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, ids, impl="cce", reduction="none")


def role_cases(tokens: int) -> list[tuple]:
    t = 1024
    b = max(1, tokens // t)

    def inputs():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        lp, lc, la = (-(torch.rand(b * t, generator=g, device=DEVICE) * 4) for _ in range(3))
        roles = torch.randint(0, 3, (b * t,), generator=g, device=DEVICE)
        adv = torch.randn(b, generator=g, device=DEVICE)
        cu = torch.arange(0, b * t + 1, t, device=DEVICE)
        return adv, lp, lc, la, roles, cu

    def run(backend):
        def setup():
            from srpo_core import role_aware_advantages

            adv, lp, lc, la, roles, cu = inputs()
            return lambda: role_aware_advantages(adv, lp, lc, la, roles, cu_seqlens=cu, backend=backend).advantages

        return setup

    # floor: read three fp32 log-probs and int64 roles once, write the fp32 advantages
    floor = b * t * (3 * 4 + 8 + 4)
    return [("role_aware_advantages", "fwd", f"{OURS} triton", run("triton"), floor, None),
            ("role_aware_advantages", "fwd", f"{OURS} torch", run("torch"), floor, None)]


def measure(setup, floor_bytes: int, flops: int | None, copy_bw: float, peaks: dict | None, dtype_name: str) -> dict:
    from triton.testing import do_bench

    fn = setup()
    grad_to_none = getattr(fn, "grad_to_none", None)
    fn()  # compile / warm up outside the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    peak = torch.cuda.max_memory_allocated() - base
    floor_ms = floor_bytes / copy_bw * 1e3
    bps = floor_bytes / (med * 1e-3)
    row = {"median_ms": med, "p20_ms": lo, "p80_ms": hi, "floor_bytes": floor_bytes, "floor_ms": floor_ms,
           "effective_gbps": bps / 1e9, "x_floor": med / floor_ms, "peak_extra_bytes": peak}
    if peaks:
        row["bw_fraction_of_peak"] = bps / peaks["bytes_per_s"]
    if flops:
        row["flops"] = flops
        row["tflops"] = flops / (med * 1e-3) / 1e12
        if peaks:
            row["flops_fraction_of_peak"] = row["tflops"] * 1e12 / peaks[dtype_name]
    return row


def markdown(env: dict, copy_bw: float, peaks: dict | None, results: list[dict]) -> str:
    peak_txt = (f"datasheet peaks used: {peaks['bytes_per_s'] / 1e12:.2f} TB/s, {peaks['bf16'] / 1e12:.0f} TFLOP/s "
                f"bf16, {peaks['fp32'] / 1e12:.0f} TFLOP/s fp32 ({peaks['device']})") if peaks else \
        "no datasheet peaks for this device: no fractions"
    lines = [f"GPU benchmarks on {env['gpu']} ({env['date']}; torch {env['torch']}, triton {env['triton']}); measured "
             f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; {peak_txt}.", "",
             "| op | mode | impl | shape | dtype | median ms (p20-p80) | × floor | GB/s | % peak BW | TFLOP/s "
             "| % peak FLOP/s | peak extra MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        head = f"| {r['op']} | {r['mode']} | {r['impl']} | {r['shape']} | {r['dtype']} |"
        if "median_ms" not in r:
            why = "ran (not timed)" if "ran" in r else r.get("skipped") or f"ERROR {r.get('error')}"
            lines.append(f"{head} {why.replace('|', '/')[:120]} | | | | | | |")
            continue
        bw = f"{100 * r['bw_fraction_of_peak']:.0f}" if "bw_fraction_of_peak" in r else ""
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        tfp = f"{100 * r['flops_fraction_of_peak']:.0f}" if "flops_fraction_of_peak" in r else ""
        lines.append(f"{head} {r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | {r['x_floor']:.2f} | "
                     f"{r['effective_gbps']:.0f} | {bw} | {tf} | {tfp} | {r['peak_extra_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def _write_atomically(path: str, text: str) -> None:
    """A process killed mid-write (the check's timeout) leaves the previous complete file, never half of one."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def smoke_environment() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": "none (--smoke: every case run once on the CPU, nothing timed)", "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "triton": version("triton"),
            "trl": version("trl"), "srpo_core": version("srpo_core")}


def run_once(setup) -> dict:
    """``--smoke``: build the case and call it once (forward and backward where the case has one); no timing."""
    setup()()
    return {"ran": True}


def ours_first(cases: list[tuple]) -> list[tuple]:
    """srpo-core's own rows before every anchor row (a run stopped at its deadline has timed ours first)."""
    return sorted(cases, key=lambda c: not c[2].startswith(OURS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="N, rows of logits (default 4096)")
    parser.add_argument("--vocab", type=int, default=151_936, help="V (default 151936, Qwen2-VL)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--linear-rows", type=int, default=8192, help="N of the linear op (default 8192)")
    parser.add_argument("--hidden", type=int, default=2048, help="H of the linear op (default 2048)")
    parser.add_argument("--role-tokens", type=int, default=1 << 20)
    parser.add_argument("--copy-mib", type=int, default=1024)
    parser.add_argument("--only", help="only ops whose name contains this")
    parser.add_argument("--seconds", type=float, help="start no row after this many seconds: the run ends early, "
                        "exit 0, with `complete: false` in the JSON (a partial result, not a failure)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, every case run once on the CPU through "
                        "Triton's interpreter, nothing timed (the GPU check's rehearsal)")
    parser.add_argument("--json", metavar="FILE", help="write results and environment as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as markdown")
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        args.rows, args.vocab, args.linear_rows, args.hidden, args.role_tokens = 8, 70, 8, 16, 2048
    elif not torch.cuda.is_available():
        print(f"gpu_bench.py: no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
              "these timings need a GPU. Nothing was timed. For a static view of what a GPU would get, run "
              "`python benchmarks/gpu_report.py`; for CPU timings, `srpo-core bench`.", file=sys.stderr)
        return NO_CUDA_STATUS

    dtype = DTYPES[args.dtype]
    env = smoke_environment() if args.smoke else environment()
    peaks = None if args.smoke else device_peaks(env["gpu"])
    copy_bw = 0.0 if args.smoke else copy_bandwidth(args.copy_mib)
    cases = ours_first(logprob_cases(args.rows, args.vocab, dtype) + contrast_cases(args.rows, args.vocab, dtype)
                       + linear_cases(args.linear_rows, args.hidden, args.vocab, dtype)
                       + policy_loss_cases(args.linear_rows, args.hidden, args.vocab, dtype)
                       + role_cases(args.role_tokens))
    results = []
    stopped = False

    def dump(final: bool) -> None:  # after every row, so a run stopped at its time limit keeps what it timed
        if args.json:
            _write_atomically(args.json, json.dumps({"environment": env, "copy_bandwidth_Bps": copy_bw, "peaks": peaks,
                                                     "args": vars(args), "complete": final, "results": results},
                                                    indent=1))
        if args.markdown:
            _write_atomically(args.markdown, markdown(env, copy_bw, peaks, results))

    for op, mode, impl, setup, floor, flops in cases:
        if args.only and args.only not in op:
            continue
        if args.seconds is not None and time.monotonic() - t0 > args.seconds:
            stopped = True
            print(f"gpu_bench.py: {args.seconds:.0f} s deadline reached: stopping with {len(results)} rows "
                  f"(srpo-core's rows come first); a partial result", flush=True)
            break
        n = args.linear_rows if op.startswith(("linear", "policy")) else args.rows
        shape = f"N={n} H={args.hidden} V={args.vocab}" if op.startswith(("linear", "policy")) else \
            (f"{args.role_tokens} tokens" if op.startswith("role") else f"N={n} V={args.vocab}")
        row = {"op": op, "mode": mode, "impl": impl, "shape": shape,
               "dtype": "fp32" if op.startswith("role") else args.dtype}
        try:
            row.update(run_once(setup) if args.smoke else measure(setup, floor, flops, copy_bw, peaks, row["dtype"]))
        except torch.cuda.OutOfMemoryError as e:
            row["skipped"] = f"out of memory: {str(e).splitlines()[0]}"
        except Exception as e:  # an anchor that does not run here is skipped; srpo-core's own failure is an error
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["error" if impl.startswith(OURS) else "skipped"] = msg
        if not args.smoke:
            torch.cuda.empty_cache()
        results.append(row)
        print(f"{op} {mode} {impl}: " + (f"{row['median_ms']:.3f} ms" if "median_ms" in row else "ran" if "ran" in row
                                         else row.get("skipped") or f"ERROR {row['error']}"), flush=True)
        dump(False)

    print(markdown(env, copy_bw, peaks, results))
    dump(not stopped)
    for f in (args.json, args.markdown):
        if f:
            print(f"wrote {f}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
