"""Static audit of the address math of a compiled Triton kernel (no GPU needed): every ``tt.addptr`` offset is int64.

The interpreter computes offsets in Python/numpy int64 whatever the kernel says, so an ``index × stride`` that a GPU
computes in int32 and wraps past 2³¹ (a ``[V, N]ᵀ`` view at N = 32,768, V = 151,936: ``(V − 1)·N ≈ 5·10⁹``) passes
every CPU test. This module reads the kernel's TTIR (Triton's first IR, after inlining and canonicalisation) and
reports, with the kernel's source line:

- ``i32 offset``: a ``tt.addptr`` whose offset is i32 (scalar or tensor). Exempt: an offset that is a compile-time
  ``arith.constant`` (``p + 1``: a literal below 2³¹ cannot overflow, and the pointer itself is 64-bit);
- ``widened after an i32 multiply``: an i64 offset that comes, through any chain of ops, from ``arith.extsi`` of an
  i32 ``arith.muli`` (``(row * stride).to(tl.int64)``: the product already wrapped before the cast).

It also captures real launches (``capture_launches``: each module's ``*_kernel`` is replaced by a recorder, the
launcher runs on meta tensors, nothing executes) and turns each into the signature the JIT would specialise it to
(``jit_signature``: an int below 2³¹ is ``i32`` — the worst case for overflow —, ``:16`` when divisible by 16, 1 is a
constant, a tensor is a 16-byte aligned pointer), so a kernel can be compiled and audited at a shape no CPU can hold.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import re
import sys

ADDPTR_RE = re.compile(
    r"(%[\w.#]+) = tt\.addptr (%[\w.#]+), (%[\w.#]+) : (.+?), ((?:tensor<[^>]*>)|i\d+) loc\((.*)\)\s*$")
DEF_RE = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = ([\w.]+)(.*)$")
LOC_DEF_RE = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
FILE_LOC_RE = re.compile(r'"([^"]+\.py)":(\d+):(\d+)')
LOC_REF_RE = re.compile(r"#loc\d*")
SSA_RE = re.compile(r"%[\w.#]+")


def _is_i64(ty: str) -> bool:
    return ty == "i64" or ty.endswith("xi64>")


def _is_i32(ty: str) -> bool:
    return ty == "i32" or ty.endswith("xi32>")


def _where(loc: str, aliases: dict[str, str], depth: int = 0) -> list[str]:
    """Every ``file.py:line`` a location (inline or ``#locN``, through names and call sites) points to."""
    if depth > 20:
        return []
    found = [f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}" for m in FILE_LOC_RE.finditer(loc)]
    for ref in LOC_REF_RE.findall(loc):
        if ref in aliases:
            found += _where(aliases[ref], aliases, depth + 1)
    return list(dict.fromkeys(found))


def audit_ttir(ttir: str) -> list[dict]:
    """Findings (``kind``, ``op``, ``offset_type``, ``where``) for one kernel's TTIR; empty when all is int64."""
    lines = ttir.splitlines()
    aliases = {m.group(1): m.group(2) for m in map(LOC_DEF_RE.match, lines) if m}
    defs = {}
    for line in lines:
        m = DEF_RE.match(line)
        if m:
            defs[m.group(1)] = (m.group(2), line)

    def late_widening(name: str, seen: set) -> str | None:
        """The line of an ``extsi(muli i32)`` that ``name`` is computed from, if any."""
        if name in seen or name not in defs:
            return None
        seen.add(name)
        op, line = defs[name]
        rhs = line.split("=", 1)[1].split(" loc(")[0]
        operands = SSA_RE.findall(rhs.split(" : ")[0])
        if op in ("arith.extsi", "arith.extui"):
            src = operands[0] if operands else None
            if src in defs and defs[src][0] == "arith.muli" and _is_i32(defs[src][1].split(" : ")[-1].split()[0]):
                return defs[src][1]
        if op in ("scf.for", "scf.while", "tt.load", "tt.get_program_id", "tt.make_range", "arith.constant"):
            return None  # values from memory, loops or the grid are not address arithmetic to follow
        for o in operands:
            hit = late_widening(o, seen)
            if hit:
                return hit
        return None

    findings = []
    for line in lines:
        m = ADDPTR_RE.search(line)
        if not m:
            continue
        _res, _ptr, off, _pty, oty, loc = m.groups()
        where = _where(loc, aliases)
        if not _is_i64(oty):
            if off in defs and defs[off][0] == "arith.constant":
                continue
            findings.append({"kind": "i32 offset", "op": line.strip(), "offset_type": oty, "where": where})
            continue
        hit = late_widening(off, set())
        if hit:
            dm = re.search(r"loc\((.*)\)\s*$", hit)
            findings.append({"kind": "widened after an i32 multiply", "op": line.strip(), "offset_type": oty,
                             "where": where + (_where(dm.group(1), aliases) if dm else [])})
    return findings


def format_findings(kernel: str, target: str, findings: list[dict]) -> str:
    return "\n".join(f"{kernel} [{target}] {f['kind']} ({f['offset_type']}) at {', '.join(f['where']) or '?'}: "
                     f"{f['op'][:160]}" for f in findings)


# --- launches captured on meta tensors -------------------------------------------------------------------------

def unwrap(kernel):
    """(the JIT function, heuristics [(name, fn)], first autotune config or None) under Autotuner / Heuristics
    wrappers; the JIT function's ``.fn`` is the kernel's Python function (the same object under the interpreter)."""
    heuristics, config = [], None
    while not inspect.isfunction(kernel.fn):
        if hasattr(kernel, "configs"):
            config = config or kernel.configs[0]
        if hasattr(kernel, "values"):
            heuristics = list(kernel.values.items()) + heuristics
        kernel = kernel.fn
    return kernel, heuristics, config


def jit_signature(kernel, args: tuple, kwargs: dict) -> dict:
    """What the JIT would compile for ``kernel[grid](*args, **kwargs)``: ``{fn, signature, constexprs, attrs,
    options}`` for ``triton.compile(ASTSource(...))``."""
    import torch

    fn, heuristics, config = unwrap(kernel)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
    if config is not None:
        kwargs = {**config.kwargs, **kwargs}
        options.setdefault("num_warps", config.num_warps)
        options.setdefault("num_stages", config.num_stages)
    named = dict(zip(fn.arg_names[:len(args)], args, strict=True))
    named.update(kwargs)
    for name, h in heuristics:
        named[name] = h({**named})
    constexpr_params = {p.name for p in fn.params if p.is_constexpr}
    dtypes = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
              torch.bool: "i1"}
    signature, constexprs, divisible = {}, {}, []
    for name in fn.arg_names:
        v = named.get(name)
        if name in constexpr_params or v is None:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = f"*{dtypes[v.dtype]}"
            divisible.append(name)
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -2**31 <= v < 2**31 else ("i64" if -2**63 <= v < 2**63 else "u64")
                if v % 16 == 0:
                    divisible.append(name)
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name}={v!r} of a type this audit does not model")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    options.setdefault("num_warps", 4)
    options.setdefault("num_stages", 3)
    return {"fn": fn, "signature": signature, "constexprs": constexprs, "attrs": attrs, "options": options,
            "values": {k: v for k, v in named.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}


class _Recorder:
    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append({"kernel": self.name, "grid": grid, **jit_signature(self.kernel, args, dict(kwargs))})
        return launch

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


@contextlib.contextmanager
def capture_launches(*modnames: str):
    """Within: every ``*_kernel`` of the named kernel modules records its launches (nothing runs) into the list
    yielded."""
    log, saved = [], []
    try:
        for modname in modnames:
            mod = importlib.import_module(modname)
            for name in [n for n in vars(mod) if n.endswith("_kernel")]:
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, _Recorder(name, getattr(mod, name), log))
        yield log
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)


def compile_ttir(launch: dict, cc: int = 90) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=launch["fn"], signature=launch["signature"], constexprs=launch["constexprs"],
                    attrs=launch["attrs"])
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=launch["options"]).asm["ttir"]


# --- the shapes no CPU can hold: N = 32,768 rows, V = 151,936 (Qwen2-VL), on meta tensors -----------------------

N_BIG, V_BIG, H_BIG = 32_768, 151_936, 16_384


def _meta(*shape, dtype=None):
    import torch

    return torch.empty(*shape, dtype=dtype or torch.bfloat16, device="meta")


def _ids(n):
    import torch

    return torch.empty(n, dtype=torch.int64, device="meta")


def large_cases() -> dict:
    """name -> (kernel module, call on meta tensors, the largest ``index × stride`` it needs). ``[V, N]ᵀ``: the
    logits are the transpose of a contiguous ``[V, N]`` buffer, so the vocab stride is N and ``(V − 1)·N`` ≈ 5·10⁹;
    contiguous ``[N, V]``: the row offset ``(N − 1)·V`` is as large."""
    tl_mod, tc_mod, lin_mod, rw_mod = (
        f"srpo_core.kernels.{m}"
        for m in ("token_logprobs", "token_contrast", "linear_token_logprobs", "role_aware_advantages"))

    def logprobs(transposed, bwd):
        def call():
            import torch

            from srpo_core.kernels import token_logprobs as k

            x = _meta(V_BIG, N_BIG).T if transposed else _meta(N_BIG, V_BIG)
            ids = _ids(N_BIG)
            lp, ent, m, s = k.token_logprobs_fwd(x, ids, temperature=1.0, ignore_index=-100, return_entropy=True)
            if bwd:
                g = torch.empty(N_BIG, device="meta")
                k.token_logprobs_bwd(g, g, x, ids, m, s, ent, temperature=1.0, ignore_index=-100)
        return call

    def contrast(kind, transposed):
        def call():
            from srpo_core.kernels import token_contrast as k

            x, y = ((_meta(V_BIG, N_BIG).T, _meta(V_BIG, N_BIG).T) if transposed
                    else (_meta(N_BIG, V_BIG), _meta(N_BIG, V_BIG)))
            k.token_contrast_fwd(x, y, _ids(N_BIG), kind=kind, temperature=1.0, ignore_index=-100)
        return call

    def linear():
        from srpo_core.kernels import linear_token_logprobs as k

        k.linear_logprobs_fwd(_meta(N_BIG, H_BIG), _meta(V_BIG, H_BIG), None, _ids(N_BIG), inv_tau=1.0,
                              want_entropy=True)

    def roles():
        import torch

        from srpo_core.kernels import role_aware_advantages as k

        n = 2**31 + 2**20
        s, r = _meta(n, dtype=torch.float32), _meta(n, dtype=torch.int64)
        k.partial_stats(s, r)
        cu, a, st = _meta(9, dtype=torch.int64), _meta(8, dtype=torch.float32), _meta(6, dtype=torch.float32)
        k.weights(s, r, cu, a, st, beta_perception=1.0, beta_reasoning=1.0, u_max=3.0, w_min=0.1,
                  weight_map="exp", standardize=True, renorm=True)

    big = (V_BIG - 1) * N_BIG
    cases = {}
    for transposed in (True, False):
        tag = "[V,N]T" if transposed else "[N,V]"
        cases[f"token_logprobs fwd {tag}"] = (tl_mod, logprobs(transposed, False), big)
        cases[f"token_logprobs fwd+bwd {tag}"] = (tl_mod, logprobs(transposed, True), big)
        for kind in ("kl", "js"):
            cases[f"token_contrast {kind} {tag}"] = (tc_mod, contrast(kind, transposed), big)
    cases["linear_logprobs fwd [V,H] H=16384"] = (lin_mod, linear, (V_BIG - 1) * H_BIG)
    cases["role_weights N=2^31+2^20"] = (rw_mod, roles, 2**31 + 2**20)
    return cases


def audit_large(cc: int = 90, only: str | None = None) -> list[dict]:
    """Each large case: its launches, the JIT signature of each, and the TTIR findings at that signature."""
    out = []
    for name, (modname, call, largest) in large_cases().items():
        if only and only not in name:
            continue
        row = {"case": name, "largest_offset": largest, "launches": []}
        try:
            with capture_launches(modname) as log:
                call()
            for launch in log:
                ttir = compile_ttir(launch, cc)
                row["launches"].append({"kernel": launch["kernel"], "signature": launch["signature"],
                                        "values": launch["values"], "findings": audit_ttir(ttir)})
        except Exception as e:  # report, keep going
            row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="int64 address audit of the kernels at N=32768, V=151936 "
                                                 "(launches captured on meta tensors, compiled for sm_90)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--only")
    parser.add_argument("--cc", type=int, default=90)
    args = parser.parse_args(argv)
    rows = audit_large(args.cc, args.only)
    bad = 0
    for r in rows:
        if "error" in r:
            bad += 1
            print(f"{r['case']}: ERROR {r['error']}")
            continue
        for la in r["launches"]:
            status = "ok" if not la["findings"] else f"{len(la['findings'])} offsets not int64"
            bad += bool(la["findings"])
            print(f"{r['case']}: {la['kernel']} {status}")
            if la["findings"]:
                print(format_findings(la["kernel"], f"sm_{args.cc}", la["findings"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real: the interpreter's kernels cannot be compiled
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
