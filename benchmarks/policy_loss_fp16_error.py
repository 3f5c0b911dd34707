"""fp16 / bf16 gradient error of ``linear_policy_loss`` against float64 (issue 22's reproducer, docs/policy_loss.md).

    OMP_NUM_THREADS=1 python benchmarks/policy_loss_fp16_error.py N V H [torch|triton]

Hidden ``randn``, weight ``randn/√H`` (both rounded to fp16 then bf16: the same values in both dtypes), ids uniform,
advantages ``randn`` and ``old_logp = −ln V + 0.1·randn`` (fp32), token-mean, one packed sequence. The clipped
objective's gradient jumps where a ratio crosses the clip range, so the low-precision errors depend on how many tokens
sit near it: compare dtypes on the same draw, not across draws. Prints, per dtype, the
norm-wise relative error of grad_hidden and grad_weight, the "floor" (the float64 gradient rounded to that dtype) and
the share of grad_weight that is exactly 0 where float64's is not. ``triton`` on CPU needs ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from srpo_core import linear_policy_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("v", type=int)
    ap.add_argument("h", type=int)
    ap.add_argument("backend", nargs="?", default="torch", choices=("torch", "triton"))
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    h0 = torch.randn(a.n, a.h, generator=g, dtype=f64).half().bfloat16().double()  # exact in fp16 and in bf16
    w0 = (torch.randn(a.v, a.h, generator=g, dtype=f64) / math.sqrt(a.h)).half().bfloat16().double()
    ids = torch.randint(0, a.v, (a.n,), generator=g)
    adv = torch.randn(a.n, generator=g, dtype=f64).float()
    old = (-math.log(a.v) + 0.1 * torch.randn(a.n, generator=g, dtype=f64)).float()
    cu = torch.tensor([0, a.n])

    def grads(dtype, backend):
        h, w = h0.to(dtype).clone().requires_grad_(True), w0.to(dtype).clone().requires_grad_(True)
        lo = torch.float64 if dtype == torch.float64 else torch.float32
        t = time.perf_counter()
        linear_policy_loss(h, w, ids, old.to(lo), adv.to(lo), cu_seqlens=cu, backend=backend).loss.backward()
        return h.grad.double(), w.grad.double(), time.perf_counter() - t

    gh64, gw64, t64 = grads(torch.float64, "torch")
    print(f"N={a.n} V={a.v} H={a.h} backend={a.backend} float64 {t64:.1f}s")

    def rel(x, ref):
        return float((x - ref).norm() / ref.norm())

    for dt in (torch.float16, torch.bfloat16):
        gh, gw, t = grads(dt, a.backend)
        zero = float(((gw == 0) & (gw64 != 0)).double().mean())
        print(f"{str(dt):15s} grad_hidden {rel(gh, gh64):.2e} (floor {rel(gh64.to(dt).double(), gh64):.2e})  "
              f"grad_weight {rel(gw, gw64):.2e} (floor {rel(gw64.to(dt).double(), gw64):.2e})  "
              f"grad_weight zeros {zero:.3f}  {t:.1f}s")


if __name__ == "__main__":
    main()
