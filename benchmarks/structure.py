"""The library's shape, measured: its modules, the import edges between them, the import cycles, and the modules
one call of ``role_aware_advantages`` and one of ``linear_policy_loss`` pass through, public entry to kernel.

    python benchmarks/structure.py            # markdown on stdout
    python benchmarks/structure.py --json F   # and the numbers as JSON

Modules: every ``.py`` of the installed library (``srpo_core/`` and ``kernels/`` as ``srpo_core.kernels``), not the
benchmarks, docs or the study. An edge is an ``import`` anywhere in a module (function-local ones included) that
names another of them; ``from package import name`` counts the submodule when ``name`` is one. Cycles are the
strongly connected components of that graph with more than one module. A call path is the sequence of library
modules whose code runs, from ``sys.setprofile`` (consecutive frames of one module are one stay), with the Triton
backend under ``TRITON_INTERPRET=1`` so the path reaches the kernels; a call back up is a call from a module into one
that imports it (directly or not): a callback or a closure handed down.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"srpo_core": ROOT / "srpo_core", "srpo_core.kernels": ROOT / "kernels"}
SKIP = ("srpo_core.experiment", "srpo_core.examples")


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if not name.startswith(SKIP):
                out[name] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if _is_package(path) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def _module_of(filename: str, files: dict[str, str]) -> str | None:
    return files.get(os.path.realpath(filename))


def trace(fn) -> tuple[list[str], list[tuple[str, str]]]:
    """The library modules whose code runs during ``fn()``, one entry per stay, in order; and every call from one
    library module into another, as ``(caller, callee)``."""
    files = {os.path.realpath(p): m for m, p in modules().items()}
    path: list[str] = []
    calls: list[tuple[str, str]] = []

    def prof(frame, event, arg):
        if event != "call":
            return
        m = _module_of(frame.f_code.co_filename, files)
        if m is None:
            return
        if not path or path[-1] != m:
            path.append(m)
        caller = _module_of(frame.f_back.f_code.co_filename, files) if frame.f_back is not None else None
        if caller is not None and caller != m:
            calls.append((caller, m))

    fn()  # once untraced: lazy imports and first-call caches are not the call's path
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return path, calls


def _calls():
    """The two calls the issue asks to follow, on small inputs, with the Triton backend."""
    import torch

    import srpo_core as S

    g = torch.Generator().manual_seed(0)
    b, t = 4, 12
    roles = torch.zeros(b, t, dtype=torch.long)
    roles[:, :4], roles[:, 4:10] = 1, 2
    mask = torch.ones(b, t, dtype=torch.bool)
    lp = -torch.rand(b, t, generator=g)

    def advantages():
        S.role_aware_advantages(torch.tensor([1.0, -1.0, 0.5, -0.5]), lp,
                                lp - torch.rand(b, t, generator=g), lp - torch.rand(b, t, generator=g), roles,
                                mask=mask, backend="triton")

    n, h, v = 16, 8, 32
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    ids = torch.randint(0, v, (n,), generator=g)

    def policy_loss():
        out = S.linear_policy_loss(hid, w, ids, None, torch.randn(n, generator=g), cu_seqlens=torch.tensor([0, n]),
                                   backend="triton")
        out.loss.backward()

    return {"role_aware_advantages": advantages, "linear_policy_loss (forward + backward)": policy_loss}


def compress(path: list[str]) -> list[str]:
    """Runs that go back and forth between the same two modules (a launcher and the interpreted kernel's helpers,
    a loop calling one checker) written once as ``A ⇄ B``."""
    out: list[str] = []
    i = 0
    while i < len(path):
        j = i
        while j + 2 < len(path) and path[j + 2] == path[j]:
            j += 1
        if j > i:
            out.append(f"{path[i]} ⇄ {path[i + 1]}")
            i = j + 2
        else:
            out.append(path[i])
            i += 1
    return out


def imported_by(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """``m`` → every module that imports ``m``, directly or not."""
    up: dict[str, set[str]] = {m: set() for m in g}
    for m in g:
        seen, stack = set(), list(g[m])
        while stack:
            d = stack.pop()
            if d not in seen:
                seen.add(d)
                stack.extend(g.get(d, ()))
        for d in seen:
            up.setdefault(d, set()).add(m)
    return up


def upward(calls: list[tuple[str, str]], g: dict[str, set[str]]) -> list[str]:
    """The calls that climb back up: a module calling into one that imports it (a callback or a closure handed
    down), as distinct ``caller → callee`` pairs."""
    up = imported_by(g)
    return sorted({f"{a} → {b}" for a, b in calls if b in up.get(a, ())})


def measure() -> dict:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    g = graph()
    traced = {name: trace(fn) for name, fn in _calls().items()}
    return {
        "modules": len(g),
        "edges": sum(len(v) for v in g.values()),
        "cycles": cycles(g),
        "paths": {k: {"modules": p, "stays": len(p), "distinct": len(set(p)), "upward": upward(c, g),
                      "first_entries": list(dict.fromkeys(p))} for k, (p, c) in traced.items()},
        "public_names": len(__import__("srpo_core").__all__),
    }


def render(r: dict) -> str:
    lines = [f"- modules: {r['modules']}; import edges between them: {r['edges']}; "
             f"top-level names: {r['public_names']}",
             f"- import cycles: {len(r['cycles'])}" + "".join(f"\n  - {' ↔ '.join(c)}" for c in r["cycles"])]
    for k, p in r["paths"].items():
        short = [m.replace("srpo_core.", "") for m in compress(p["modules"])]
        ups = "; ".join(u.replace("srpo_core.", "") for u in p["upward"]) or "none"
        lines.append(f"- `{k}`: {p['stays']} stays in {p['distinct']} modules; calls back up the imports: {ups}; "
                     f"modules in order of first entry: "
                     + " → ".join(m.removeprefix("srpo_core.") for m in p["first_entries"])
                     + "\n  - every stay (back-and-forth runs as ⇄): " + " → ".join(short))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    r = measure()
    print(render(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
