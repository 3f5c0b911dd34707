"""Time the fused kernels on a CUDA GPU against TRL, a naive torch version and the bandwidth floor.

For each case: the median and 20/80 % quantiles of ``triton.testing.do_bench`` (which synchronises), the effective
bandwidth ``floor_bytes / time``, and ``floor_time = floor_bytes / copy_bandwidth`` where ``copy_bandwidth`` is
measured here with a device-to-device copy (read + write) of ``--copy-mib`` MiB. ``floor_bytes`` is what the op must
move at least (docs/kernels.md): ``N·V·s`` for log-probs forward, ``3·N·V·s`` forward+backward (read, then read +
write the gradient), ``2·N·V·s`` for a contrast (both rows once).

Cases (each skipped with a note when its implementation is not importable):
- ``token_logprobs`` fwd and fwd+bwd, without and with entropy: srpo-core (``backend="triton"``), TRL
  ``selective_log_softmax`` / ``selective_log_softmax_and_entropy``, naive ``log_softmax(x.float()).gather``;
- ``token_contrast`` kl and js: srpo-core, naive (two fp32 ``log_softmax`` and a sum);
- ``role_aware_advantages`` (``backend="triton"`` vs ``"torch"``) when a Triton role-weights kernel exists.

Usage: ``python benchmarks/gpu_bench.py [--rows 4096] [--vocab 151936] [--dtype bf16] [--json FILE]``.
Exits with status 2 and a message on a machine without CUDA: nothing is timed, no number is invented.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch

NO_CUDA_STATUS = 2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * src.numel() / (ms * 1e-3)


def make_inputs(n: int, v: int, dtype: torch.dtype, *, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(n, v, generator=g, device="cuda") * 2).to(dtype).requires_grad_(requires_grad)
    ids = torch.randint(0, v, (n,), generator=g, device="cuda")
    return x, ids


def fwd_bwd(call, x):
    def run():
        out = call()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad).backward()

    run.grad_to_none = [x]
    return run


def logprob_cases(n: int, v: int, dtype: torch.dtype) -> list[tuple]:
    """(op, mode, impl, setup -> callable, floor bytes)."""
    s = torch.finfo(dtype).bits // 8
    cases = []
    for entropy in (False, True):
        op = "token_logprobs+entropy" if entropy else "token_logprobs"
        for mode in ("fwd", "fwd+bwd"):
            floor = (1 if mode == "fwd" else 3) * n * v * s
            grad = mode != "fwd"

            def ours(grad=grad, entropy=entropy):
                from srpo_core.logprobs import token_logprobs

                x, ids = make_inputs(n, v, dtype, requires_grad=grad)
                call = lambda: token_logprobs(x, ids, return_entropy=entropy, backend="triton")  # noqa: E731
                return fwd_bwd(call, x) if grad else call

            def trl(grad=grad, entropy=entropy):
                from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

                x, ids = make_inputs(n, v, dtype, requires_grad=grad)
                if entropy:
                    call = lambda: selective_log_softmax_and_entropy(x, ids)  # noqa: E731
                else:
                    call = lambda: selective_log_softmax(x, ids)  # noqa: E731
                return fwd_bwd(call, x) if grad else call

            def naive(grad=grad, entropy=entropy):
                x, ids = make_inputs(n, v, dtype, requires_grad=grad)

                def call():
                    lp = torch.log_softmax(x.float(), -1)
                    out = lp.gather(-1, ids[:, None]).squeeze(-1)
                    return (out, -(lp.exp() * lp).sum(-1)) if entropy else out

                return fwd_bwd(call, x) if grad else call

            cases += [(op, mode, "srpo-core", ours, floor), (op, mode, "trl", trl, floor),
                      (op, mode, "naive torch", naive, floor)]
    return cases


def contrast_cases(n: int, v: int, dtype: torch.dtype) -> list[tuple]:
    s = torch.finfo(dtype).bits // 8
    cases = []
    for kind in ("kl", "js"):
        def ours(kind=kind):
            from srpo_core.contrast_ops import token_contrast

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

        cases += [(f"token_contrast[{kind}]", "fwd", "srpo-core", ours, 2 * n * v * s),
                  (f"token_contrast[{kind}]", "fwd", "naive torch", naive, 2 * n * v * s)]
    return cases


def role_cases(tokens: int) -> list[tuple]:
    if importlib.util.find_spec("srpo_core.kernels.role_weights") is None:
        return []
    t = 1024
    b = max(1, tokens // t)

    def inputs():
        g = torch.Generator(device="cuda").manual_seed(0)
        lp, lc, la = (-(torch.rand(b * t, generator=g, device="cuda") * 4) for _ in range(3))
        roles = torch.randint(0, 3, (b * t,), generator=g, device="cuda")
        adv = torch.randn(b, generator=g, device="cuda")
        cu = torch.arange(0, b * t + 1, t, device="cuda")
        return adv, lp, lc, la, roles, cu

    def run(backend):
        def setup():
            from srpo_core import role_aware_advantages

            adv, lp, lc, la, roles, cu = inputs()
            return lambda: role_aware_advantages(adv, lp, lc, la, roles, cu_seqlens=cu, backend=backend).advantages

        return setup

    # floor: read three fp32 log-probs and int64 roles once, write the fp32 advantages
    floor = b * t * (3 * 4 + 8 + 4)
    return [("role_aware_advantages", "fwd", "srpo-core triton", run("triton"), floor),
            ("role_aware_advantages", "fwd", "srpo-core torch", run("torch"), floor)]


def measure(setup, floor_bytes: int, copy_bw: float) -> dict:
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
    return {"median_ms": med, "p20_ms": lo, "p80_ms": hi, "floor_bytes": floor_bytes, "floor_ms": floor_ms,
            "effective_gbps": floor_bytes / (med * 1e-3) / 1e9, "x_floor": med / floor_ms, "peak_extra_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="N, rows of logits (default 4096)")
    parser.add_argument("--vocab", type=int, default=151_936, help="V (default 151936, Qwen2-VL)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--role-tokens", type=int, default=1 << 20)
    parser.add_argument("--copy-mib", type=int, default=1024)
    parser.add_argument("--only", help="only ops whose name contains this")
    parser.add_argument("--json", metavar="FILE", help="write results and environment as JSON")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(f"gpu_bench.py: no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
              "these timings need a GPU. Nothing was timed. For a static view of what a GPU would get, run "
              "`python benchmarks/gpu_report.py`; for CPU timings, `srpo-core bench`.", file=sys.stderr)
        return NO_CUDA_STATUS

    dtype = DTYPES[args.dtype]
    env = environment()
    copy_bw = copy_bandwidth(args.copy_mib)
    cases = logprob_cases(args.rows, args.vocab, dtype) + contrast_cases(args.rows, args.vocab, dtype) \
        + role_cases(args.role_tokens)
    results = []
    for op, mode, impl, setup, floor in cases:
        if args.only and args.only not in op:
            continue
        row = {"op": op, "mode": mode, "impl": impl, "shape": f"N={args.rows} V={args.vocab}", "dtype": args.dtype}
        try:
            row.update(measure(setup, floor, copy_bw))
        except (ImportError, NotImplementedError) as e:
            row["skipped"] = f"{type(e).__name__}: {e}"
        except torch.cuda.OutOfMemoryError as e:
            row["skipped"] = f"out of memory: {str(e).splitlines()[0]}"
        torch.cuda.empty_cache()
        results.append(row)

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{env['gpu']}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    for col in ("op", "mode", "impl", "median ms", "p20-p80 ms", "floor ms", "× floor", "GB/s", "peak extra MiB"):
        table.add_column(col)
    for r in results:
        if "skipped" in r:
            table.add_row(escape(r["op"]), r["mode"], r["impl"], "skipped", escape(r["skipped"]), "", "", "", "")
            continue
        table.add_row(escape(r["op"]), r["mode"], r["impl"], f"{r['median_ms']:.3f}",
                      f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", f"{r['floor_ms']:.3f}", f"{r['x_floor']:.2f}",
                      f"{r['effective_gbps']:.0f}", f"{r['peak_extra_bytes'] / 2**20:.0f}")
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "copy_bandwidth_Bps": copy_bw,
                                               "args": vars(args), "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
