"""The log-prob kernels at a real RL step's size on a GPU: N = 32,768 rows, V = 151,936 (Qwen2-VL), against the
float64 references of ``srpo_core.reference`` run on the GPU in row chunks.

Each case has ignored rows (``ids = ignore_index``) whose logits are scaled ×30, so their max logit is far above the
~88.7 where ``exp`` overflows fp32 (the ignored-row NaN of issue 11), and the ``[V, N]ᵀ`` cases read the transpose of a
contiguous ``[V, N]`` buffer: vocab stride N, so ``(V − 1)·N ≈ 5·10⁹`` elements, past 2³¹ (the int32-offset hazard).
Errors are ``‖out − ref‖ / ‖ref‖``; ignored rows must give exactly 0 and a zero gradient; nothing may be NaN.

CUDA only (``SRPO_TEST_DEVICE=cuda``, as ``make gpu-check`` sets): ~10-20 GB per logits tensor, no CPU holds it under
the interpreter in a test's time. Off CUDA every test skips, saying so.
"""

from __future__ import annotations

import os

import pytest
import torch

from srpo_core import linear_token_logprobs, token_contrast, token_logprobs
from srpo_core.reference import linear_token_logprobs as ref_linear
from srpo_core.reference import token_contrast as ref_contrast
from srpo_core.reference import token_logprobs as ref_logprobs

# SRPO_GPU_LARGE_SMOKE=1: the same code at a toy size on the CPU (interpreter), to check the tests themselves
SMOKE = os.environ.get("SRPO_GPU_LARGE_SMOKE") == "1"
N, V, H = (64, 300, 32) if SMOKE else (32_768, 151_936, 1_024)
CHUNK = 16 if SMOKE else 2_048  # rows per float64 reference chunk: 2048 × V × 8 B = 2.5 GB
IGNORE = -100
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# ‖out − ref‖ / ‖ref‖ bounds: the outputs are fp32 (reduced in fp32 over V); a bf16 gradient is rounded to bf16 (2⁻⁸)
TOL_OUT = {"bf16": 1e-5, "fp32": 1e-5}
TOL_GRAD = {"bf16": 8e-3, "fp32": 1e-5}


@pytest.fixture
def cuda(device):
    if device.type != "cuda" and not SMOKE:
        pytest.skip("large-shape GPU test: needs SRPO_TEST_DEVICE=cuda and a CUDA device (run `make gpu-check` there)")
    torch.cuda.empty_cache()
    yield device
    torch.cuda.empty_cache()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert not bool(torch.isnan(got).any()), "NaN in the output"
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def make_logits(shape_nv, dtype, *, transposed: bool, seed: int, device):
    """``[N, V]`` logits (a ``[V, N]ᵀ`` view when ``transposed``), ids with every 7th row ignored and those rows ×30."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, v = shape_nv
    x = torch.randn((v, n) if transposed else (n, v), generator=g, device=device, dtype=dtype)
    x = x.T if transposed else x
    ids = torch.randint(0, v, (n,), generator=g, device=device)
    ids[::7] = IGNORE
    x[::7] *= 30.0  # ignored rows with max logit ≈ 150 (≫ 88.7)
    assert x.shape == (n, v) and (SMOKE or not transposed or (v - 1) * x.stride(1) >= 2**31)
    return x, ids


class RelErr:
    """``‖out − ref‖ / ‖ref‖`` accumulated over chunks (no float64 copy of a whole [N, V] tensor: 40 GB)."""

    def __init__(self):
        self.num = self.den = 0.0

    def add(self, got, want):
        got, want = got.double(), want.double()
        assert not bool(torch.isnan(got).any()), "NaN in the output"
        got, want = got.detach(), want.detach()
        self.num += float((got - want).square().sum())
        self.den += float(want.square().sum())

    @property
    def value(self) -> float:
        return (self.num / max(self.den, 1e-300)) ** 0.5


@pytest.mark.parametrize("transposed", [False, True], ids=["[N,V]", "[V,N]T"])
@pytest.mark.parametrize("dt", sorted(DTYPES))
def test_token_logprobs_fwd_bwd_large(cuda, dt, transposed):
    x, ids = make_logits((N, V), DTYPES[dt], transposed=transposed, seed=1, device=cuda)
    g = torch.Generator(device=cuda).manual_seed(2)
    g_lp, g_ent = (torch.randn(N, generator=g, device=cuda) for _ in range(2))
    xl = x.detach().requires_grad_()
    lp, ent = token_logprobs(xl, ids, return_entropy=True, backend="triton")
    torch.autograd.backward([lp, ent], [g_lp, g_ent])
    got_grad = xl.grad
    del xl
    ign = ids == IGNORE
    assert bool((lp[ign] == 0).all()) and bool((ent[ign] == 0).all()), "an ignored row's output is not 0"
    assert bool((got_grad[ign] == 0).all()), "an ignored row's gradient is not exactly 0"
    e_lp, e_ent, e_grad = RelErr(), RelErr(), RelErr()
    for s in range(0, N, CHUNK):  # float64 reference by row chunks, autograd through it
        sl = slice(s, s + CHUNK)
        xc = x[sl].double().requires_grad_()
        l, h = ref_logprobs.token_logprobs(xc, ids[sl], return_entropy=True, ignore_index=IGNORE)
        (gx,) = torch.autograd.grad((l * g_lp[sl]).sum() + (h * g_ent[sl]).sum(), xc)
        e_lp.add(lp[sl], l.detach()), e_ent.add(ent[sl], h.detach()), e_grad.add(got_grad[sl], gx)
        del xc, l, h, gx
    assert e_lp.value < TOL_OUT[dt], f"logp: {e_lp.value:.2e}"
    assert e_ent.value < 10 * TOL_OUT[dt], f"entropy: {e_ent.value:.2e}"
    assert e_grad.value < TOL_GRAD[dt], f"grad: {e_grad.value:.2e}"


@pytest.mark.parametrize("transposed", [False, True], ids=["[N,V]", "[V,N]T"])
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_token_contrast_large(cuda, kind, transposed):
    x, ids = make_logits((N, V), torch.bfloat16, transposed=transposed, seed=3, device=cuda)
    y, _ = make_logits((N, V), torch.bfloat16, transposed=transposed, seed=4, device=cuda)
    got = token_contrast(x, y, ids, kind=kind, backend="triton")
    want = [[], [], []]
    for s in range(0, N, CHUNK):
        r = ref_contrast.token_contrast(x[s:s + CHUNK].double(), y[s:s + CHUNK].double(), ids[s:s + CHUNK],
                                        kind=kind, ignore_index=IGNORE)
        for acc, t in zip(want, r, strict=True):
            acc.append(t)
    ign = ids == IGNORE
    for name, a, w in zip(("div", "logp", "logp_ref"), got, want, strict=True):
        w = torch.cat(w)
        assert bool((a[ign] == 0).all()), f"{name}: an ignored row is not 0"
        assert rel(a, w) < (1e-4 if name == "div" else 1e-5), name


def test_linear_token_logprobs_fwd_bwd_large(cuda):
    """bf16 ``hidden [N, H]``, ``weight [V, H]``; ignored rows' hidden ×30 (logits ≈ 10²: the NaN of issue 11)."""
    g = torch.Generator(device=cuda).manual_seed(5)
    hidden = torch.randn(N, H, generator=g, device=cuda, dtype=torch.bfloat16)
    weight = (torch.randn(V, H, generator=g, device=cuda) * H ** -0.5).to(torch.bfloat16)
    ids = torch.randint(0, V, (N,), generator=g, device=cuda)
    ids[::7] = IGNORE
    hidden[::7] *= 30.0
    g_lp, g_ent = (torch.randn(N, generator=g, device=cuda) for _ in range(2))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = linear_token_logprobs(h, w, ids, return_entropy=True, backend="triton")
    torch.autograd.backward([lp, ent], [g_lp, g_ent])
    w64 = weight.double().requires_grad_()
    want_lp, want_ent, want_gh = [], [], []
    for s in range(0, N, CHUNK):
        hc = hidden[s:s + CHUNK].double().requires_grad_()
        l, e = ref_linear.linear_token_logprobs(hc, w64, ids[s:s + CHUNK], return_entropy=True, ignore_index=IGNORE)
        (l * g_lp[s:s + CHUNK]).sum().add((e * g_ent[s:s + CHUNK]).sum()).backward()
        want_lp.append(l.detach()), want_ent.append(e.detach()), want_gh.append(hc.grad)
        del hc, l, e
    ign = ids == IGNORE
    for name, t in (("grad_hidden", h.grad), ("grad_weight", w.grad), ("logp", lp), ("entropy", ent)):
        assert bool(torch.isfinite(t).all()), f"{name}: non-finite values (ignored rows with large logits?)"
    assert bool((h.grad[ign] == 0).all()), "an ignored row's grad_hidden is not exactly 0"
    assert rel(lp, torch.cat(want_lp)) < 5e-3 and rel(ent, torch.cat(want_ent)) < 5e-3
    assert rel(h.grad, torch.cat(want_gh)) < 2e-2
    assert rel(w.grad, w64.grad) < 2e-2
