"""What a GPU would get from each Triton kernel, measured statically (no GPU needed).

Every kernel module lists what it launches in a module-level ``GPU_REPORT``: dicts with ``name``, ``fn`` (the
``@triton.jit`` function), ``signature`` (arg → Triton type string: ``"*bf16"``, ``"i32"``, ``"fp32"``,
``"constexpr"``; a ``":16"`` suffix says the value is a multiple of 16, as the JIT specialises it for typical vocab
sizes and strides), ``constexprs``, ``num_warps``, optional ``num_stages`` (default 3, Triton's) and ``bytes`` (the
bytes the kernel moves against its op's floor, a short formula). Pointers are taken as 16-byte aligned, which every
fresh torch allocation is.

For each entry and each target (sm_80 = A100, sm_90 = H100) this compiles the kernel with the real Triton compiler
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``) and reads the cubin with the ``cuobjdump``
that ships with Triton:

- ``-res-usage``: registers per thread, local memory (spills: Triton kernels keep no local arrays, so any local
  memory is spilled registers), stack, static shared memory; Triton's dynamic shared memory comes from the metadata;
- ``-sass``: whether global loads are 128-bit (``LDG.E.128``, or ``LDGSTS``/``.128`` copies into shared memory), and
  whether tensor-core instructions (``HMMA`` on sm_80, ``HGMMA`` / ``HMMA`` on sm_90) appear;
- the TTIR: every ``tt.addptr`` offset is int64 (``addr_audit.audit_ttir``; findings per row in ``addptr_findings``,
  printed with kernel and source line under the table).

Usage: ``python benchmarks/gpu_report.py [--json FILE] [--targets 80,90] [--only SUBSTRING]``. Exits 1 if a kernel
fails to compile. ``TRITON_INTERPRET`` is removed from the environment first: under the interpreter ``@triton.jit``
gives objects that cannot be compiled.
"""

from __future__ import annotations

import os

# Run as a script, this must happen before anything imports triton / srpo_core.kernels. Imported (the tests read
# MODULES), it must leave the importer's environment alone.
_INTERPRET_WAS_SET = os.environ.get("TRITON_INTERPRET") not in (None, "0")
if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from srpo_core.bench.addr_audit import audit_ttir, format_findings  # noqa: E402

MODULES = (
    "srpo_core.kernels.token_logprobs",
    "srpo_core.kernels.token_contrast",
    "srpo_core.kernels.role_aware_advantages",
    "srpo_core.kernels.linear_token_logprobs",
    "srpo_core.kernels.linear_token_contrast",
)
TARGETS = {"sm_80": 80, "sm_90": 90}
DEFAULT_NUM_STAGES = 3

RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
LDG_RE = re.compile(r"\b(LDG|LDGSTS)\.E\S*")
TENSOR_CORE_RE = re.compile(r"\b(HGMMA|HMMA|WGMMA|UTCHMMA)\b")


def cuobjdump_path() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("cuobjdump")
    if not found:
        raise FileNotFoundError("cuobjdump: neither bundled with triton nor on PATH")
    return found


def split_signature(signature: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Strip ``":16"`` hints; return the plain signature and the args known to be multiples of 16 (and pointers,
    taken as 16-byte aligned)."""
    plain, divisible = {}, []
    for arg, ty in signature.items():
        ty, _, hint = ty.partition(":")
        plain[arg] = ty
        if hint == "16" or ty.startswith("*"):
            divisible.append(arg)
    return plain, divisible


def compile_entry(entry: dict, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = entry["fn"]
    signature, divisible = split_signature(entry["signature"])
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(entry.get("constexprs", {})), attrs=attrs)
    options = {"num_warps": entry["num_warps"], "num_stages": entry.get("num_stages", DEFAULT_NUM_STAGES)}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def inspect_cubin(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = RES_RE.search(res)
    if not m:
        raise RuntimeError(f"could not parse `cuobjdump -res-usage` output:\n{res}")
    regs, stack, shared_static, local = (int(g) for g in m.groups())
    loads = [mm.group(0) for mm in LDG_RE.finditer(sass)]
    wide = [ld for ld in loads if ".128" in ld]
    tensor_core = sorted({mm.group(1) for mm in TENSOR_CORE_RE.finditer(sass)})
    return {
        "registers": regs,
        "local_bytes": local,
        "stack_bytes": stack,
        "shared_static_bytes": shared_static,
        "global_loads": len(loads),
        "global_loads_128bit": len(wide),
        "load_kinds": sorted(set(loads)),
        "tensor_core": tensor_core,
    }


def collect(modules=MODULES, targets=TARGETS, only: str | None = None, log=print) -> dict:
    cuobjdump = cuobjdump_path()
    rows, skipped, errors = [], [], []
    for modname in modules:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                skipped.append({"module": modname, "reason": "module does not exist yet"})
                log(f"note: {modname} does not exist yet: skipped")
                continue
            raise
        entries = getattr(mod, "GPU_REPORT", None)
        if entries is None:
            skipped.append({"module": modname, "reason": "no GPU_REPORT list"})
            log(f"note: {modname} has no GPU_REPORT list: skipped")
            continue
        for entry in entries:
            if only and only not in entry["name"]:
                continue
            for target, cc in targets.items():
                config = {k: v for k, v in entry.get("constexprs", {}).items() if k.isupper()}
                config["num_warps"] = entry["num_warps"]
                config["num_stages"] = entry.get("num_stages", DEFAULT_NUM_STAGES)
                row = {"module": modname, "kernel": entry["name"], "target": target, "config": config,
                       "bytes": entry.get("bytes", "")}
                t0 = time.perf_counter()
                try:
                    compiled = compile_entry(entry, cc)
                    row.update(inspect_cubin(compiled.asm["cubin"], cuobjdump))
                    row["addptr_findings"] = audit_ttir(compiled.asm["ttir"])
                    row["shared_dynamic_bytes"] = int(compiled.metadata.shared)
                except Exception as e:  # report every failure, keep going
                    row["error"] = f"{type(e).__name__}: {e}"
                    errors.append({"kernel": entry["name"], "target": target,
                                   "traceback": traceback.format_exc(limit=3)})
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
    return {"rows": rows, "skipped": skipped, "errors": errors}


def environment() -> dict:
    import torch
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuobjdump": cuobjdump_path(),
        "note": "static compile (no GPU): registers/spills/shared/SASS of the cubin Triton would load",
    }


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="srpo-core Triton kernels, compiled statically", show_lines=False)
    for col in ("kernel", "target", "config", "regs", "spill (local B)", "stack B", "smem B", "128-bit LDG",
                "tensor cores", "int64 addr", "bytes moved"):
        table.add_column(col, overflow="fold")
    for r in report["rows"]:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        if "error" in r:
            table.add_row(escape(r["kernel"]), r["target"], cfg, "[red]compile error[/red]", "", "", "", "", "", "",
                          escape(r["bytes"]))
            continue
        spill = str(r["local_bytes"]) if r["local_bytes"] == 0 else f"[red]{r['local_bytes']}[/red]"
        ldg = f"{'yes' if r['global_loads_128bit'] else '[yellow]no[/yellow]'} ({r['global_loads_128bit']}/" \
              f"{r['global_loads']})"
        smem = r["shared_dynamic_bytes"] + r["shared_static_bytes"]
        n_bad = len(r["addptr_findings"])
        addr = "ok" if not n_bad else f"[red]{n_bad} not i64[/red]"
        table.add_row(escape(r["kernel"]), r["target"], cfg, str(r["registers"]), spill, str(r["stack_bytes"]),
                      str(smem), ldg, ",".join(r["tensor_core"]) or "none", addr, escape(r["bytes"]))
    Console(width=200).print(table)
    for r in report["rows"]:
        if r.get("addptr_findings"):
            print(format_findings(r["kernel"], r["target"], r["addptr_findings"]))
    for s in report["skipped"]:
        print(f"skipped {s['module']}: {s['reason']}")
    for e in report["errors"]:
        print(f"ERROR compiling {e['kernel']} for {e['target']}:\n{e['traceback']}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--only", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    if _INTERPRET_WAS_SET:
        print("note: TRITON_INTERPRET was set; removed for this report (the interpreter cannot compile)")
    targets = {f"sm_{int(cc)}": int(cc) for cc in args.targets.split(",")}
    report = collect(targets=targets, only=args.only)
    report["environment"] = environment()
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
