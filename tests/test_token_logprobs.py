"""token_logprobs: the Triton kernels (under TRITON_INTERPRET=1), the chunked torch path (eager and compiled) and the
vocab-parallel form against the float64 reference — values and gradients of both outputs — plus edge cases of the
math (−inf entries, ±1e4 logits, V = 1, N = 0), strides, errors, the torch.library registration and torch.compile."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from srpo_core_test_gloo import free_port  # tests/gloo_group.py, registered by conftest.py

from srpo_core import _dispatch
from srpo_core.common import chunked
from srpo_core.ops import token_logprobs as ops_path
from srpo_core.ops.token_logprobs import token_logprobs
from srpo_core.reference.token_logprobs import token_logprobs as reference
from srpo_core.testing import assert_close, assert_close_vs_torch
from srpo_core.tuning import TUNING

# The interpreter evaluates −inf − (−inf) and 0 · inf in masked lanes with numpy, which warns; the kernel discards them.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

needs_interpreter = pytest.mark.skipif(
    not (_dispatch.triton_importable() and (_dispatch.interpreting() or torch.cuda.is_available())),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 math against float64 truth on the same (exactly upcast) values.
RTOL, ATOL = 1e-5, 1e-5
GRAD_MODES = ("logp", "entropy", "both")


# ----------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _eager_by_default(monkeypatch):
    """Tests run the eager chunks unless they opt into compilation (a compile costs seconds)."""
    monkeypatch.setattr(TUNING, "use_compile", False)
    yield
    chunked.reset()


def upstream(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def loss_of(logp, ent, g1, g2, mode):
    dt = logp.dtype
    g1, g2 = g1.to(logp.device, dt), g2.to(logp.device, dt)
    if mode == "logp":
        return (logp * g1).sum()
    if mode == "entropy":
        return (ent * g2).sum()
    return (logp * g1).sum() + (ent * g2).sum()


def reference_with_grad(x, ids, *, temperature, ignore_index=-100, mode="both", seed=0):
    """float64 reference on the (exactly upcast) values, on the CPU: ``(logp, entropy, grad of the mode's loss)``."""
    x64 = x.detach().cpu().double().requires_grad_(True)
    ids = ids.cpu()
    # an ignored row is never read: garbage there (NaN) must not leak into the reference's gradient either
    clean = torch.where((ids == ignore_index)[..., None], torch.zeros_like(x64), x64)
    lp, ent = reference(clean, ids, temperature=temperature, return_entropy=True, ignore_index=ignore_index)
    g1, g2 = upstream(lp.shape, seed)
    (grad,) = torch.autograd.grad(loss_of(lp, ent, g1, g2, mode), x64)
    return lp.detach(), ent.detach(), grad


def grad_bound(grad_ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tolerance of a gradient stored in ``dtype``: fp32 math error plus rounding to the logits' dtype."""
    eps = 0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    return ATOL + (RTOL + eps) * grad_ref.abs()


def check_outputs(logp, ent, grad, ref, dtype, tag=""):
    lp64, ent64, grad64 = ref
    assert logp.dtype == torch.float32, f"{tag}logp dtype {logp.dtype}"
    assert_close(logp, lp64, atol=ATOL, rtol=RTOL, name=f"{tag}logp")
    if ent is not None:
        assert ent.dtype == torch.float32
        assert_close(ent, ent64, atol=ATOL, rtol=RTOL, name=f"{tag}entropy")
    if grad is not None:
        assert grad.dtype == dtype and grad.shape == grad64.shape, f"{tag}grad {grad.dtype} {tuple(grad.shape)}"
        assert_close(grad, grad64, atol=grad_bound(grad64, dtype), name=f"{tag}grad")


def run_public(x, ids, *, temperature, backend, mode, seed=0, ignore_index=-100):
    """Public function forward + autograd backward of the mode's loss."""
    xg = x.detach().clone().requires_grad_(True) if x.is_contiguous() else _same_strides(x).requires_grad_(True)
    logp, ent = token_logprobs(xg, ids, temperature=temperature, return_entropy=True, ignore_index=ignore_index,
                               backend=backend)
    g1, g2 = upstream(logp.shape, seed)
    (grad,) = torch.autograd.grad(loss_of(logp, ent, g1, g2, mode), xg)
    return logp.detach(), ent.detach(), grad


def _same_strides(x):
    """A leaf with the same values and the same (non-contiguous) strides as ``x``."""
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out


@st.composite
def cases(draw, max_n=5, max_v=70):
    """Logits with awkward sizes, extreme scales, −inf entries, ignored rows and several memory layouts (CPU tensors:
    a test moves them to its ``device``)."""
    n = draw(st.sampled_from([0] + [1, 2, 3, 4] * 2 + list(range(5, max_n + 1))))
    v = draw(st.integers(1, max_v) | st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 47, 64, max_v]))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    scale = draw(st.sampled_from([1.0, 8.0, 1e4]))
    if dtype == torch.float16:
        scale = min(scale, 3e3)  # randn · 1e4 overflows fp16's 65504 now and then
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = draw(st.sampled_from(["contiguous", "row-padded", "column-major", "sliced-3d", "4d-copy"]))
    lead = {"sliced-3d": (2, n + 1), "4d-copy": (2, 3, n + 1)}.get(layout, (n,))
    x = torch.randn(*lead, v, generator=g, dtype=torch.float64) * scale
    neg_inf = draw(st.sampled_from([0.0, 0.0, 0.2, 0.6]))
    if neg_inf:
        x[torch.rand(x.shape, generator=g) < neg_inf] = -math.inf
        x[..., 0] = torch.where(torch.isinf(x[..., 0]), 0.0, x[..., 0])  # keep every row a distribution
    ids = torch.randint(0, v, lead, generator=g)
    ids[torch.rand(lead, generator=g) < draw(st.sampled_from([0.0, 0.3]))] = -100
    ids = ids.to(draw(st.sampled_from([torch.int64, torch.int32])))
    x = x.to(dtype)
    if layout == "row-padded":  # row stride V + 3
        x = torch.cat([x, torch.zeros(n, 3, dtype=dtype)], 1)[:, :v]
    elif layout == "column-major":  # vocab stride N: the launcher copies
        x = x.t().contiguous().t()
    elif layout == "sliced-3d":  # logits[:, :-1]: two row strides, read in place
        x, ids = x[:, :-1], ids[:, :-1]
    elif layout == "4d-copy":  # [2, 2, n, V] cut out of [2, 3, n+1, V]: three row strides, the launcher copies
        x, ids = x[:, :2, :-1], ids[:, :2, :-1]
    temperature = draw(st.sampled_from([1.0, 0.7, 1.9]))
    return x, ids, temperature


def on(device, x, ids):
    """``x`` and ``ids`` on ``device``, ``x`` keeping its strides (a sliced or column-major layout stays one)."""
    if x.device == device:
        return x, ids
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    out.copy_(x)
    return out, ids.to(device)


# ------------------------------------------------------------------------------------------- Triton kernels
@needs_interpreter
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), block_v=st.sampled_from([16, 16, 32, None]), mode=st.sampled_from(GRAD_MODES))
def test_kernel_matches_float64_reference(case, block_v, mode, device):
    """Forward and backward kernels (launched directly, to force small blocks) against the float64 reference."""
    from srpo_core.kernels.token_logprobs import token_logprobs_bwd, token_logprobs_fwd

    x, ids, temperature = case
    token_logprobs(x, ids, temperature=temperature, backend="torch")  # the public checks pass
    x, ids = on(device, x, ids)
    logp, ent, row_max, row_logsum = token_logprobs_fwd(x, ids, temperature=temperature, ignore_index=-100,
                                                        return_entropy=True, block_v=block_v)
    g1, g2 = (g.float().to(device) for g in upstream(logp.shape, 0))
    grad = token_logprobs_bwd(g1 if mode != "entropy" else None, g2 if mode != "logp" else None,
                              x, ids, row_max, row_logsum, ent, temperature=temperature, ignore_index=-100,
                              block_v=block_v)
    ref = reference_with_grad(x, ids, temperature=temperature, mode=mode)
    check_outputs(logp, ent, grad, ref, x.dtype, tag=f"V={x.shape[-1]} {x.dtype} τ={temperature} {mode} ")
    logp_only, no_ent, _, _ = token_logprobs_fwd(x, ids, temperature=temperature, ignore_index=-100,
                                                 return_entropy=False, block_v=block_v)
    assert no_ent is None and torch.equal(logp_only.nan_to_num(), logp.nan_to_num())


@needs_interpreter
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(max_n=4, max_v=40), mode=st.sampled_from(GRAD_MODES))
def test_public_triton_backend_autograd(case, mode, device):
    """backend="triton" through the custom op's autograd formula (default block)."""
    x, ids, temperature = case
    x, ids = on(device, x, ids)
    out = run_public(x, ids, temperature=temperature, backend="triton", mode=mode)
    check_outputs(*out, reference_with_grad(x, ids, temperature=temperature, mode=mode), x.dtype)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize("mode", GRAD_MODES)
def test_bf16_trl_forward_and_backward_case(backend, mode, device):
    """TRL's ``test_forward_and_backward`` case (issue 22): bf16 logits of ±20, V = 2,053, τ = 0.7, a non-contiguous
    ``logits[:, :-1]`` view. Values and the logits gradient against float64, within twice torch's own bf16 error
    (``log_softmax`` of ``x/τ`` in bf16, TRL's reference). The interpreter truncated the kernel's fp32 → bf16 store
    (up to one ulp off where torch is half of one): the kernel now rounds to nearest there too."""
    B, T, V, tau = 2, 6, 2053, 0.7
    g = torch.Generator().manual_seed(22)
    base = (torch.rand(B, T + 1, V, generator=g, dtype=torch.float64) * 40 - 20).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), generator=g)
    g1, g2 = upstream((B, T), seed=22)

    x = base.to(device).requires_grad_(True)
    logp, ent = token_logprobs(x[:, :-1], ids.to(device), temperature=tau, return_entropy=True, backend=backend)
    (grad,) = torch.autograd.grad(loss_of(logp, ent, g1.to(device), g2.to(device), mode), x)

    xt = base.clone().requires_grad_(True)  # torch's own bf16 computation (TRL's reference), on the CPU
    lsm = (xt[:, :-1] / tau).log_softmax(-1)
    t_lp, t_ent = lsm.gather(-1, ids[..., None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)
    (t_grad,) = torch.autograd.grad(loss_of(t_lp, t_ent, g1, g2, mode), xt)

    r_lp, r_ent, r_grad = reference_with_grad(base[:, :-1], ids, temperature=tau, mode=mode, seed=22)
    assert_close(logp.cpu(), r_lp, atol=ATOL, rtol=RTOL, name="logp")
    assert_close(ent.cpu(), r_ent, atol=ATOL, rtol=RTOL, name="entropy")
    assert grad.dtype == torch.bfloat16 and torch.equal(grad[:, -1].cpu(), torch.zeros(B, V, dtype=torch.bfloat16))
    assert_close_vs_torch(grad[:, :-1].cpu(), r_grad, t_grad[:, :-1], atol=ATOL, name=f"{backend} {mode} grad")


# ------------------------------------------------------------------------------------------------- torch path
@settings(max_examples=30, deadline=None)
@given(case=cases(max_n=8, max_v=90), chunk=st.sampled_from([16, 100, 1 << 21]), mode=st.sampled_from(GRAD_MODES))
def test_torch_path_matches_float64_reference(case, chunk, mode):
    x, ids, temperature = case
    old = TUNING.token_logprobs_chunk_elements
    TUNING.token_logprobs_chunk_elements = chunk  # one row per chunk, several, or everything at once
    try:
        out = run_public(x, ids, temperature=temperature, backend="torch", mode=mode)
    finally:
        TUNING.token_logprobs_chunk_elements = old
    check_outputs(*out, reference_with_grad(x, ids, temperature=temperature, mode=mode), x.dtype)


def compiled_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 301, generator=g, dtype=torch.float64) * 4
    x[0, 1, ::3] = -math.inf
    x[1, 2] = torch.randn(301, generator=g, dtype=torch.float64) * 1e4
    ids = torch.randint(0, 301, (3, 7), generator=g)
    ids[2, 3] = ids[0, 0] = -100
    x[2, 3] = math.nan  # an ignored row's garbage never reaches a result
    return x.to(dtype)[:, :-1], ids[:, :-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_chunks_match_reference_and_eager(monkeypatch, dtype):
    """The torch.compile'd chunk functions (several chunks of a sliced 3-D input) against the reference and the eager
    chunks, forward and backward, logp and entropy."""
    monkeypatch.setattr(TUNING, "use_compile", True)
    monkeypatch.setattr(TUNING, "token_logprobs_compile_min_elements", 0)
    monkeypatch.setattr(TUNING, "token_logprobs_compiled_chunk_elements", 301 * 4)  # 4 rows a chunk, a partial last
    x, ids = compiled_case(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure would warn and fall back
        compiled = run_public(x, ids, temperature=0.8, backend="torch", mode="both")
    assert chunked._BROKEN is None
    check_outputs(*compiled, reference_with_grad(x, ids, temperature=0.8, mode="both"), dtype)
    monkeypatch.setattr(TUNING, "use_compile", False)
    eager = run_public(x, ids, temperature=0.8, backend="torch", mode="both")
    for a, b, name in zip(compiled, eager, ("logp", "entropy", "grad"), strict=True):
        assert_close(a, b, atol=grad_bound(b.double(), dtype) if name == "grad" else 2e-6, rtol=2e-6, name=name)
    assert torch.equal(compiled[2][2, 3], torch.zeros_like(compiled[2][2, 3]))


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setattr(TUNING, "use_compile", True)
    monkeypatch.setattr(TUNING, "token_logprobs_compile_min_elements", 0)

    def broken(self, *args):
        raise RuntimeError("no working C++ compiler (simulated)")

    monkeypatch.setattr(chunked.Compiled, "__call__", broken)
    x, ids = compiled_case(torch.float32)
    with pytest.warns(RuntimeWarning, match="falling back to eager chunks"):
        out = run_public(x, ids, temperature=0.8, backend="torch", mode="both")
    assert "simulated" in chunked._BROKEN and not chunked.compile_wanted(torch.device("cpu"))
    check_outputs(*out, reference_with_grad(x, ids, temperature=0.8, mode="both"), torch.float32)


def test_no_compile_env_var(monkeypatch):
    monkeypatch.setattr(TUNING, "use_compile", None)
    monkeypatch.setenv("SRPO_NO_COMPILE", "1")
    assert not chunked.compile_wanted(torch.device("cpu"))
    monkeypatch.setenv("SRPO_NO_COMPILE", "0")
    assert chunked.compile_wanted(torch.device("cpu"))
    assert not chunked.compile_wanted(torch.device("meta"))


def test_gradcheck_float64_torch_path_and_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 6, -100], [3, 3, 1]])

    def ours(x):
        return token_logprobs(x, ids, temperature=0.7, return_entropy=True, backend="torch")

    def ref(x):
        return reference(x, ids, temperature=0.7, return_entropy=True)

    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradcheck(ref, (x,))
    lp, ent = ours(x)
    assert lp.dtype == torch.float64
    rl, rh = ref(x)
    assert_close(lp, rl, atol=1e-12, rtol=1e-12) and assert_close(ent, rh, atol=1e-12, rtol=1e-12)


def test_reference_matches_torch_log_softmax_and_entropy():
    x = torch.randn(4, 13, dtype=torch.float64)
    ids = torch.tensor([0, 12, 5, -100])
    lp, ent = reference(x, ids, temperature=1.3, return_entropy=True)
    logp_all = torch.log_softmax(x / 1.3, -1)
    want = logp_all.gather(-1, ids.clamp(min=0)[:, None]).squeeze(-1) * (ids != -100)
    assert_close(lp, want, atol=1e-12, rtol=1e-12)
    want_ent = torch.distributions.Categorical(logits=x / 1.3).entropy() * (ids != -100)
    assert_close(ent, want_ent, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------- edge cases
INF = math.inf
EDGE_CASES = [
    # row, id, expected (logp, entropy) — None: only the reference's value is checked
    pytest.param([1e4, -1e4, 0.0, 1e4 - 2], 3, (None, None), id="pm-1e4"),
    pytest.param([0.0, -INF, 1.0, -INF], 2, (None, None), id="neg-inf-entries"),
    pytest.param([0.0, -INF, 1.0], 1, (-INF, None), id="id-on-neg-inf-logit"),
    pytest.param([5.0], 0, (0.0, 0.0), id="V=1"),
    pytest.param([2.0, 2.0, 2.0, 2.0], 1, (-math.log(4), math.log(4)), id="uniform"),
    pytest.param([-INF, -INF, -INF], 1, (math.nan, math.nan), id="all-neg-inf-row-nan"),
    # block 1 (of 16 columns) holds the id; block 2 moves the max by 1e4, rescaling block 1's mass to 0
    pytest.param([0.0] * 19 + [1e4], 3, (-1e4, None), id="max-moves-across-blocks"),
]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize(("row", "id_", "expected"), EDGE_CASES)
def test_edge_cases(row, id_, expected, backend, device):
    x = torch.tensor([row], dtype=torch.float32, device=device)
    ids = torch.tensor([id_], device=device)
    if backend == "triton":
        from srpo_core.kernels.token_logprobs import token_logprobs_fwd

        logp, ent, _, _ = token_logprobs_fwd(x, ids, temperature=1.0, ignore_index=-100, return_entropy=True,
                                             block_v=16)
    else:
        logp, ent = token_logprobs(x, ids, return_entropy=True, backend="torch")
    lp64, ent64 = reference(x.double(), ids, return_entropy=True)
    assert_close(logp, lp64, atol=ATOL, rtol=RTOL, name="logp")
    assert_close(ent, ent64, atol=ATOL, rtol=RTOL, name="entropy")
    for got, want, name in zip((logp, ent), expected, ("logp", "entropy"), strict=True):
        if want is not None:
            assert_close(got, torch.tensor([want]), atol=1e-5, name=name)
    if not math.isnan(expected[0] if expected[0] is not None else 0.0):
        out = run_public(x, ids, temperature=1.0, backend=backend, mode="both")
        assert torch.isfinite(out[2]).all()
        check_outputs(*out, reference_with_grad(x, ids, temperature=1.0, mode="both"), torch.float32)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_ignored_rows_give_zero_and_zero_grad_and_n0(backend, device):
    x = torch.randn(4, 23, device=device)
    x[1] = math.nan  # an ignored row is never read into a result
    ids = torch.tensor([3, -100, 0, -100], device=device)
    out = run_public(x, ids, temperature=1.0, backend=backend, mode="both")
    for t in out[:2]:
        assert torch.equal(t[[1, 3]], torch.zeros(2, device=device))
        assert torch.isfinite(t).all()
    assert torch.equal(out[2][[1, 3]], torch.zeros(2, 23, device=device)) and torch.isfinite(out[2]).all()
    x0 = torch.randn(0, 23, device=device, requires_grad=True)
    lp, ent = token_logprobs(x0, ids[:0], return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (0,) and lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert x0.grad.shape == (0, 23)


def test_ignore_index_is_a_parameter_and_logp_only_output():
    x = torch.randn(3, 7)
    ids = torch.tensor([-1, 2, -1])
    lp = token_logprobs(x, ids, ignore_index=-1)
    assert isinstance(lp, torch.Tensor) and lp[0] == 0 and lp[2] == 0 and lp[1] < 0


def test_float64_in_float64_out_and_auto_on_cpu():
    x = torch.randn(3, 11, dtype=torch.float64)
    ids = torch.tensor([1, 2, 3])
    lp, ent = token_logprobs(x, ids, return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float64
    rl, rh = reference(x, ids, return_entropy=True)
    assert_close(lp, rl, atol=1e-12, rtol=1e-12) and assert_close(ent, rh, atol=1e-12, rtol=1e-12)


def test_only_entropy_or_only_logp_gets_a_gradient():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 8, 0])
    for pick in (0, 1):
        out = token_logprobs(x, ids, return_entropy=True, backend="torch")
        (g,) = torch.autograd.grad(out[pick].sum(), x)
        ref = reference(x, ids, return_entropy=True)
        (want,) = torch.autograd.grad(ref[pick].sum(), x)
        assert_close(g, want, atol=1e-12, rtol=1e-10)


@pytest.mark.slow
@needs_interpreter
def test_large_vocab_kernel_and_torch_path():
    """V = 262,144 (the largest vocabulary the issue names), fp32 and bf16, both backends."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 262_144, generator=g) * 3).to(dtype)
        ids = torch.tensor([0, 262_143])
        for backend in ("triton", "torch"):
            out = run_public(x, ids, temperature=0.9, backend=backend, mode="both")
            check_outputs(*out, reference_with_grad(x, ids, temperature=0.9, mode="both"), dtype, tag=backend)


# ------------------------------------------------------------------------------------------------------- errors
ERRORS = [
    pytest.param(dict(logits=torch.randn(3, 5).long()), TypeError, "`logits` must be a floating-point",
                 id="int-logits"),
    pytest.param(dict(ids=torch.tensor([0, 1])), ValueError, "`ids` must have the leading shape of `logits` (3,)",
                 id="ids-shape"),
    pytest.param(dict(ids=torch.tensor([0.0, 1.0, 2.0])), TypeError, "`ids` must be an integer", id="float-ids"),
    pytest.param(dict(ids=torch.tensor([0, 5, 1])), ValueError, "`ids` must lie in [0, V) = [0, 5)",
                 id="id-too-big"),
    pytest.param(dict(ids=torch.tensor([0, -3, 1])), ValueError, "got ids[1] = -3", id="id-negative"),
    pytest.param(dict(logits=torch.randn(2, 3, 5), ids=torch.tensor([[0, 1, 9], [0, 0, 0]])), ValueError,
                 "got ids[0, 2] = 9", id="id-too-big-2d"),
    pytest.param(dict(temperature=0.0), ValueError, "`temperature` must be a positive", id="temperature-0"),
    pytest.param(dict(temperature=math.inf), ValueError, "`temperature` must be a positive", id="temperature-inf"),
    pytest.param(dict(temperature=True), TypeError, "`temperature`", id="temperature-bool"),
    pytest.param(dict(return_entropy=1), TypeError, "`return_entropy` must be a bool", id="return-entropy"),
    pytest.param(dict(ignore_index=1.5), TypeError, "`ignore_index` must be an int", id="ignore-index-float"),
    pytest.param(dict(backend="cuda"), ValueError, "`backend` must be one of", id="backend"),
    pytest.param(dict(logits=torch.randn(3, 0)), ValueError, "V >= 1", id="V=0"),
    pytest.param(dict(logits=torch.tensor(1.0), ids=torch.tensor(0)), ValueError, "at least one dim", id="0d"),
    pytest.param(dict(ids=torch.tensor([0, 1, 2], device="meta")), ValueError, "`ids` must be on", id="device"),
    pytest.param(dict(vocab_start=5), ValueError, "`vocab_start` = 5 needs a `process_group`", id="vocab-start"),
    pytest.param(dict(vocab_start=-1), ValueError, "`vocab_start` must be an int >= 0", id="vocab-start-neg"),
    pytest.param(dict(logits=torch.randn(3, 5, dtype=torch.float64), backend="triton"), (TypeError, RuntimeError),
                 "", id="float64-triton"),
]


@pytest.mark.parametrize(("override", "exc", "match"), [p.values for p in ERRORS], ids=[p.id for p in ERRORS])
def test_errors_name_the_argument(override, exc, match):
    args = dict(logits=torch.randn(3, 5), ids=torch.tensor([0, 4, -100]))
    args.update(override)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("logits", "ids")}
    with pytest.raises(exc) as info:
        token_logprobs(args["logits"], args["ids"], **kwargs)
    assert match in str(info.value)
    if match:
        assert str(info.value).startswith("token_logprobs:")


def test_backend_triton_without_interpreter_or_cuda_raises(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        token_logprobs(torch.randn(2, 4), torch.tensor([0, 1]), backend="triton")


# ----------------------------------------------------------------------------------------- torch.library / compile
def test_opcheck_forward_and_backward_ops():
    x = torch.randn(2, 3, 11, requires_grad=True)
    ids = torch.tensor([[0, 10, -100], [4, 4, 2]])
    torch.library.opcheck(torch.ops.srpo_core.token_logprobs.default, (x, ids, 0.9, -100, True, "torch"))
    torch.library.opcheck(torch.ops.srpo_core.token_logprobs.default, (x, ids, 1.0, -100, False, "torch"))
    lp, ent, _, row_max, row_logsum = torch.ops.srpo_core.token_logprobs(x.detach(), ids, 0.9, -100, True, "torch")
    torch.library.opcheck(torch.ops.srpo_core.token_logprobs_backward.default,
                          (torch.randn(2, 3), None, None, x.detach(), ids, row_max, row_logsum, ent, 0.9, -100,
                           "torch"))


@pytest.mark.parametrize("compile_chunks", [False, True], ids=["eager-chunks", "compiled-chunks"])
def test_torch_compile_fullgraph_traces_the_custom_op(monkeypatch, compile_chunks):
    """A training step calling token_logprobs compiles with fullgraph=True on CPU (no graph break), and gives the
    eager values and gradients; the op's own compiled chunk functions run inside the compiled step."""
    monkeypatch.setattr(TUNING, "use_compile", compile_chunks)
    monkeypatch.setattr(TUNING, "token_logprobs_compile_min_elements", 0)
    x = torch.randn(3, 4, 37, requires_grad=True)
    ids = torch.tensor([[0, 36, -100, 5], [1, 2, 3, 4], [9, 9, 9, -100]])

    def step(x, ids):
        logp, ent = token_logprobs(x[:, :-1] * 1.0, ids[:, :-1], temperature=0.9, return_entropy=True)
        return (logp * 2.0).sum() + 0.1 * ent.sum()

    loss = torch.compile(step, fullgraph=True)(x, ids)
    (grad,) = torch.autograd.grad(loss, x)
    loss_eager = step(x, ids)
    (grad_eager,) = torch.autograd.grad(loss_eager, x)
    assert_close(loss, loss_eager, atol=1e-5, rtol=1e-6, name="loss")
    assert_close(grad, grad_eager, atol=1e-6, rtol=1e-5, name="grad")


# ------------------------------------------------------------------------------------------------ vocab-parallel

@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed gloo")
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_unsharded(tmp_path, world):
    """2 and 3 ranks on gloo, uneven shards of V ∈ {37, 41, 29, 5}: logp, entropy and the local gradient equal the
    unsharded forward and gradient (fp32, bf16, float64; torch path, and the Triton kernels under the interpreter)."""
    script = pathlib.Path(__file__).with_name("token_logprobs_dist_worker.py")
    backends = "torch,triton" if _dispatch.interpreting() and _dispatch.triton_importable() else "torch"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "OMP_NUM_THREADS": "1", "SRPO_NO_COMPILE": "1"}
    # cwd outside the repository, so the root `kernels/` folder never lands on the children's sys.path.
    proc = subprocess.run([sys.executable, str(script), str(free_port()), str(world), backends], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert f"vocab-parallel: OK world={world}" in proc.stdout


# ------------------------------------------------------------------------------------------- outputs own storage
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_outputs_own_their_storage_in_place_edits_and_backward(backend, entropy, device):
    """Issue 17 defect 2: ``logp[0, 2] = 0`` (and the same on the entropy) under autograd, then backward; the edited
    positions contribute no gradient and the rest equals the float64 reference's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 19, generator=g, dtype=torch.float64).to(torch.float32)
    ids = torch.randint(0, 19, (2, 4), generator=g)
    xg = x.clone().to(device).requires_grad_(True)
    out = token_logprobs(xg, ids.to(device), return_entropy=entropy, backend=backend)
    outs = out if entropy else (out,)
    for t in outs:
        assert t._base is None, "an output is a view of another tensor"
        t[0, 2] = 0  # in place, under autograd
        t[1] *= 2.0
    sum(t.sum() for t in outs).backward()
    x64 = x.double().requires_grad_(True)
    refs = reference(x64, ids, return_entropy=True)
    weight = torch.ones(2, 4, dtype=torch.float64)
    weight[0, 2], weight[1] = 0.0, 2.0
    (want,) = torch.autograd.grad(sum((r * weight).sum() for r in refs[:len(outs)]), x64)
    assert_close(xg.grad.cpu(), want, atol=1e-5, rtol=1e-5, name="grad")
    assert torch.equal(outs[0][0, 2].cpu(), torch.tensor(0.0))


# ---------------------------------------------------------------------------------------- guard, sync, in place
class _GuardSpy:
    """Stands in for ``_dispatch.device_guard`` and for a kernel: records that every launch happens inside."""

    def __init__(self):
        self.depth, self.launches, self.outside = 0, 0, 0

    def guard(self, t):
        spy = self

        class _Ctx:
            def __enter__(self):
                spy.depth += 1

            def __exit__(self, *exc):
                spy.depth -= 1

        assert isinstance(t, torch.Tensor)
        return _Ctx()

    def wrap(self, kernel):
        spy = self

        class _K:
            def __getitem__(self, grid):
                spy.launches += 1
                spy.outside += spy.depth == 0
                return kernel[grid]

        return _K()


@needs_interpreter
def test_every_launch_runs_inside_the_device_guard(monkeypatch, device):
    from srpo_core.kernels import token_logprobs as kmod

    spy = _GuardSpy()
    monkeypatch.setattr(_dispatch, "device_guard", spy.guard)
    for name in ("token_logprobs_fwd_kernel", "token_logprobs_bwd_kernel"):
        monkeypatch.setattr(kmod, name, spy.wrap(getattr(kmod, name)))
    x = torch.randn(3, 20, device=device, requires_grad=True)
    lp, ent = token_logprobs(x * 1.0, torch.tensor([1, 2, 3], device=device), return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    assert spy.launches == 2 and spy.outside == 0


def test_check_ids_false_skips_the_scan_and_gives_nan(monkeypatch):
    x = torch.randn(3, 8)
    ids = torch.tensor([1, 8, -100])
    with pytest.raises(ValueError, match=r"ids\[1\] = 8"):
        token_logprobs(x, ids)

    def no_scan(*a, **k):
        raise AssertionError("the id scan ran")

    monkeypatch.setattr(ops_path, "check_id_range", no_scan)
    lp = token_logprobs(x, ids, check_ids=False)
    assert torch.isnan(lp[1]) and lp[2] == 0 and torch.isfinite(lp[0])
    with pytest.raises(TypeError, match="`check_ids` must be a bool"):
        token_logprobs(x, ids, check_ids=1)


def test_check_ids_false_step_compiles_without_graph_break():
    """A step with check_ids=False has no graph break (no host sync in the wrapper), forward and backward."""
    import torch._dynamo

    def step(x, ids):
        logp, ent = token_logprobs(x * 1.0, ids, return_entropy=True, check_ids=False)
        return logp.sum() + ent.sum()

    torch._dynamo.reset()
    x = torch.randn(2, 3, 17, requires_grad=True)
    ids = torch.randint(0, 17, (2, 3))
    explained = torch._dynamo.explain(step)(x, ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    loss = torch.compile(step, fullgraph=True)(x, ids)
    (grad,) = torch.autograd.grad(loss, x)
    (want,) = torch.autograd.grad(step(x, ids), x)
    assert_close(grad, want, atol=1e-6, rtol=1e-5, name="grad")


def _inplace_case(dtype, layout, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 21, generator=g, dtype=torch.float64)
    h = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 21, (2, 5), generator=g)
    ids[0, 1] = -100
    if layout == "sliced-3d":
        ids = ids[:, :-1]
    return h.to(dtype).to(device), w.to(dtype).to(device), ids.to(device)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch", "torch-compiled"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("layout", ["contiguous", "sliced-3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward_writes_the_gradient_over_the_logits(monkeypatch, backend, entropy, layout, dtype, device):
    """inplace_backward=True: the gradient that reaches the layer below is the logits' own buffer, and it equals the
    out-of-place gradient exactly (same arithmetic), so the weight gradient does too."""
    if backend == "torch-compiled":
        monkeypatch.setattr(TUNING, "use_compile", True)
        monkeypatch.setattr(TUNING, "token_logprobs_compile_min_elements", 0)
        backend = "torch"
    h, w0, ids = _inplace_case(dtype, layout, device)
    results = []
    for inplace in (False, True):
        w = w0.clone().requires_grad_(True)
        logits = h @ w  # [2, 5, 21], not a leaf
        x = logits[:, :-1] if layout == "sliced-3d" else logits
        seen = {}
        x.register_hook(lambda g, seen=seen: seen.setdefault("grad", g))
        out = token_logprobs(x, ids, return_entropy=entropy, backend=backend, inplace_backward=inplace)
        loss = (out[0] * 2.0).sum() + 0.5 * out[1].sum() if entropy else (out * 2.0).sum()
        loss.backward()
        got = seen["grad"]
        if inplace:
            assert got.data_ptr() == x.data_ptr(), "the gradient is not the logits' buffer"
            assert torch.equal(x.detach(), got)
        results.append((got.detach().clone(), w.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]), "logits gradient differs in place"
    assert torch.equal(results[0][1], results[1][1]), "weight gradient differs in place"


def test_inplace_backward_refusals():
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="leaf that requires grad"):
        token_logprobs(torch.randn(2, 5, requires_grad=True), ids, inplace_backward=True)
    base = torch.randn(5, 2, requires_grad=True)
    with pytest.raises(ValueError, match="written in place"):
        token_logprobs((base * 1.0).t(), ids, inplace_backward=True)  # vocab stride 2
    with pytest.raises(ValueError, match="written in place"):
        token_logprobs((torch.randn(1, 5, requires_grad=True) * 1.0).expand(2, 5), ids, inplace_backward=True)
    with pytest.raises(ValueError, match="not supported with `process_group`"):
        token_logprobs(torch.randn(2, 5), ids, inplace_backward=True, process_group=object())
    with pytest.raises(TypeError, match="`inplace_backward` must be a bool"):
        token_logprobs(torch.randn(2, 5), ids, inplace_backward="yes")
    # no grad needed: the option changes nothing
    assert_close(token_logprobs(torch.ones(2, 5), ids, inplace_backward=True), torch.full((2,), -math.log(5.0)),
                 atol=1e-6)


# ----------------------------------------------------------------------------- large logits on ignored rows
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_large_logits_on_ignored_rows_forward_and_backward(backend, dtype, entropy, device):
    """Ignored rows (padding, prompt, image placeholders) scaled ×30, max logit/τ > 88.7 (e^x overflows fp32): every
    output and gradient finite, zero on those rows, the rest equal to the float64 reference; the same on both
    backends (the kernels never exponentiate an unshifted logit on an ignored row or a masked lane)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 200, generator=g) * 4
    ids = torch.randint(0, 200, (8,), generator=g)
    ids[[0, 5]] = -100
    x[[0, 5]] *= 30.0
    x[0, 7] = 3e4  # max logit / τ = 6e4 at τ = 0.5
    x = x.to(dtype)
    mode = "both" if entropy else "logp"
    out = run_public(x.to(device), ids.to(device), temperature=0.5, backend=backend, mode=mode)
    for t in out:
        assert torch.isfinite(t).all()
    assert torch.equal(out[2][[0, 5]].cpu(), torch.zeros(2, 200, dtype=dtype))
    check_outputs(*(t.cpu() for t in out), reference_with_grad(x, ids, temperature=0.5, mode=mode), dtype)


# ----------------------------------------------------------------------------- shift, out_dtype, return_lse, K ids
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_shift_scores_position_t_with_id_t_plus_1(backend, device):
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 6, 13, generator=g).to(device)
    ids = torch.randint(0, 13, (2, 6), generator=g).to(device)
    ids[1, 4] = -100
    xa, xb = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    lp, ent = token_logprobs(xa, ids, shift=True, return_entropy=True, backend=backend)
    lp2, ent2 = token_logprobs(xb[:, :-1], ids[:, 1:], return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (2, 6)
    assert torch.equal(lp[:, :-1], lp2) and torch.equal(ent[:, :-1], ent2)
    assert torch.equal(lp[:, -1], torch.zeros(2, device=device)) and lp[1, 3] == 0
    w = torch.arange(1.0, 11.0, device=device).view(2, 5)
    ((lp[:, :-1] * w).sum() + ent[:, :-1].sum()).backward()
    ((lp2 * w).sum() + ent2.sum()).backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(xa.grad[:, -1], torch.zeros(2, 13, device=device))
    with pytest.raises(ValueError, match="`shift=True` needs positions"):
        token_logprobs(x0[0, 0], ids[0, 0], shift=True)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32])
def test_out_dtype_casts_every_output(out_dtype):
    x = torch.randn(3, 4, 11, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 11, (3, 4))
    outs = token_logprobs(x, ids, return_entropy=True, return_lse=True, out_dtype=out_dtype)
    ref = token_logprobs(x, ids, return_entropy=True, return_lse=True)
    assert all(t.dtype == torch.float32 for t in ref)  # the default: float32 whatever the logits' dtype
    for a, e in zip(outs, ref, strict=True):
        assert a.dtype == out_dtype and torch.equal(a, e.to(out_dtype))
    sum(t.float().sum() for t in outs).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    with pytest.raises(TypeError, match="`out_dtype` must be None or one of"):
        token_logprobs(x, ids, out_dtype=torch.int32)


def _lse_and_multi_reference(x, ids, temperature, ignore_index=-100):
    """float64: logp of K ids per row, entropy, lse, from the definitions."""
    z = x / temperature
    lse = torch.logsumexp(z, -1)
    keep = ids != ignore_index
    lp = z.gather(-1, torch.where(keep, ids, 0)) - lse.unsqueeze(-1)
    row_keep = keep.any(-1)
    ent = lse - (torch.softmax(z, -1) * z).sum(-1)
    zero = torch.zeros((), dtype=x.dtype)
    return torch.where(keep, lp, zero), torch.where(row_keep, ent, zero), torch.where(row_keep, lse, zero)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_k_ids_per_row_entropy_and_lse_values_and_gradients(backend, dtype, k, device):
    """ids [..., K] (TRL's selective_log_softmax form) with return_lse: values and the gradient of a loss on all
    three outputs (z-loss on lse) against float64 autograd; logits of ±1e4 keep their digits (max-shifted gather)."""
    g = torch.Generator().manual_seed(7 + k)
    x = (torch.randn(2, 3, 29, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[0, 0] += 1e4
    ids = torch.randint(0, 29, (2, 3, k), generator=g)
    if k:
        ids[0, 1, 0] = -100
        ids[1, 2] = -100  # a row with every id ignored: every output 0 there
    xg = x.to(device).requires_grad_(True)
    lp, ent, lse = token_logprobs(xg, ids.to(device), temperature=0.8, return_entropy=True, return_lse=True,
                                  backend=backend)
    assert lp.shape == (2, 3, k) and ent.shape == lse.shape == (2, 3)
    g1 = torch.randn(2, 3, k, generator=g, dtype=torch.float64)
    loss = (lp * g1.to(device).float()).sum() + 0.3 * ent.sum() + 1e-3 * (lse**2).sum()
    (grad,) = torch.autograd.grad(loss, xg)
    x64 = x.double().requires_grad_(True)
    r_lp, r_ent, r_lse = _lse_and_multi_reference(x64, ids, 0.8)
    (want,) = torch.autograd.grad((r_lp * g1).sum() + 0.3 * r_ent.sum() + 1e-3 * (r_lse**2).sum(), x64)
    assert_close(lp.cpu(), r_lp.detach(), atol=ATOL, rtol=RTOL, name="logp")
    assert_close(ent.cpu(), r_ent.detach(), atol=ATOL, rtol=RTOL, name="entropy")
    assert_close(lse.cpu(), r_lse.detach(), atol=ATOL, rtol=RTOL, name="lse")
    eps = 0.0 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps  # δ and p parts round separately in bf16
    assert_close(grad.cpu(), want, atol=ATOL + (RTOL + eps) * want.abs(), name="grad")
    if k:
        assert torch.equal(grad[1, 2].cpu(), torch.zeros(29, dtype=dtype))


def test_k_ids_match_the_single_id_op_and_errors():
    x = torch.randn(4, 17, dtype=torch.float64)
    ids = torch.randint(0, 17, (4,))
    assert torch.equal(token_logprobs(x, ids[:, None]).squeeze(-1), token_logprobs(x, ids))
    with pytest.raises(ValueError, match="or that shape plus a last dim K"):
        token_logprobs(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got ids\[2, 1\] = 17"):
        token_logprobs(x, torch.tensor([[0, 1], [2, 3], [4, 17], [5, 6]]))
    lp = token_logprobs(x, torch.tensor([[0, 1], [2, 3], [4, 17], [5, -100]]), check_ids=False)
    assert torch.isnan(lp[2, 1]) and lp[3, 1] == 0 and torch.isfinite(lp[:2]).all()
    with pytest.raises(ValueError, match="with `process_group`"):
        token_logprobs(x, ids, return_lse=True, process_group=object())


@pytest.mark.parametrize("multi", [False, True], ids=["ids", "K-ids"])
def test_meta_tensors_infer_shapes_forward_and_backward(multi):
    x = torch.empty(2, 5, 64, device="meta", requires_grad=True)
    ids = torch.empty((2, 5, 3) if multi else (2, 5), dtype=torch.long, device="meta")
    lp, ent, lse = token_logprobs(x, ids, return_entropy=True, return_lse=True, shift=True)
    assert lp.shape == ids.shape and ent.shape == lse.shape == (2, 5)
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in (lp, ent, lse))
    (lp.sum() + ent.sum() + lse.sum()).backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"


def test_inplace_backward_is_ignored_under_torch_compile():
    w = torch.randn(6, 21, requires_grad=True)
    h = torch.randn(2, 4, 6)
    ids = torch.randint(0, 21, (2, 4))

    def step(h, w, ids):
        return token_logprobs(h @ w, ids, inplace_backward=True, check_ids=False).sum()

    loss = torch.compile(step, fullgraph=True)(h, w, ids)
    (grad,) = torch.autograd.grad(loss, w)
    (want,) = torch.autograd.grad(step(h, w, ids), w)
    assert_close(grad, want, atol=1e-5, rtol=1e-5, name="grad")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_one_pass_cpu_forward_redoes_the_rows_it_cannot_shift(dtype, temperature, compiled, monkeypatch):
    """The CPU log-prob forward shifts each row by its sampled logit; rows where that overflows (another logit
    hundreds of nats above), whose sampled logit is −inf, or that are all −inf, are redone with the row max. Small
    chunks, so the redo crosses chunk boundaries; eager (three passes over a workspace) and compiled (one inductor
    kernel per chunk)."""

    monkeypatch.setattr(TUNING, "token_logprobs_shift_chunk_bytes", 3 * 4 * 50)  # 3 rows of V = 50 per chunk
    if compiled:
        monkeypatch.setattr(TUNING, "use_compile", True)
        monkeypatch.setattr(TUNING, "token_logprobs_compile_min_elements", 0)
        monkeypatch.setattr(TUNING, "token_logprobs_compiled_chunk_elements", 2 * 50)  # 2-row chunks, a 1-row tail
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure would warn and fall back
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(11, 50, generator=g) * 3).to(dtype)
    ids = torch.randint(0, 50, (11,), generator=g)
    x[1, (ids[1] + 1) % 50] = x[1, ids[1]] + 300  # e^{300/τ} overflows fp32
    x[4, ids[4]] = -math.inf  # the sampled token is impossible: logp = −inf
    x[7] = -math.inf  # an all −inf row
    x[9, ids[9]] = x[9].float().max().to(dtype) + 60  # far above the rest: their terms underflow, s = 1
    out = token_logprobs(x, ids, temperature=temperature, backend="torch")
    ref = torch.log_softmax(x.double() / temperature, -1).gather(1, ids[:, None])[:, 0]
    finite = torch.isfinite(ref)
    assert torch.allclose(out[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)
    o, r = out[~finite].double(), ref[~finite]
    assert ((o == r) | (torch.isnan(o) & torch.isnan(r))).all(), (o, r)  # −inf stays −inf, NaN stays NaN
    # the backward through the shifted statistics matches log_softmax's
    xr = x.detach().float().requires_grad_(True)
    keep = torch.isfinite(ref) & (torch.arange(11) != 7)
    token_logprobs(xr, ids, temperature=temperature)[keep].sum().backward()
    xd = x.detach().double().requires_grad_(True)
    torch.log_softmax(xd / temperature, -1).gather(1, ids[:, None])[:, 0][keep].sum().backward()
    assert torch.allclose(xr.grad.double()[keep], xd.grad[keep], rtol=1e-5, atol=1e-6)
    assert chunked._BROKEN is None


def test_one_pass_cpu_forward_redoes_only_the_rows_that_need_it(monkeypatch):
    """Ignored rows and ordinary rows are not redone (a redo reads the row again); a sampled token far below the
    row's top is (the backward's log p would cancel there), and its gradient keeps float32 accuracy. The input is a
    ``[B, T+1, V][:, :-1]`` view, whose rows do not merge: only the redone rows are gathered."""
    import srpo_core.cpu.token_logprobs as cpu_tl

    redone = []
    real = cpu_tl._fwd_chunk_eager

    def spy(x, ids, inv_t, entropy, ws):
        redone.append(x.shape[0])
        return real(x, ids, inv_t, entropy, ws)

    monkeypatch.setattr(cpu_tl, "_fwd_chunk_eager", spy)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 9, 4000, generator=g) * 2
    x = base[:, :-1]
    ids = torch.randint(0, 4000, (3, 8), generator=g)
    ids[:, ::3] = -100
    x[1, 4, (ids[1, 4] + 7) % 4000] = x[1, 4, ids[1, 4]] + 80  # p(sampled) ≈ e^-80: redone with the row max
    xr = x.detach().clone().requires_grad_(True)
    out = token_logprobs(xr, ids)
    assert sum(redone) == 1, redone
    keep = ids != -100
    ref64 = torch.log_softmax(x.double(), -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(out[keep].double(), ref64[keep], rtol=1e-6, atol=1e-5)
    out[keep].sum().backward()
    xd = x.detach().double().requires_grad_(True)
    torch.log_softmax(xd, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0][keep].sum().backward()
    assert (xr.grad.double() - xd.grad).abs().max() < 1e-6


def test_one_pass_redo_of_a_single_row():
    """``logits [V]`` (and the multi-index form ``ids [K]``) whose sampled logit is far below the top: the redo of
    the one-pass forward gathers the one row."""
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    x[3] = -100.0
    ref = torch.log_softmax(x.double(), -1)
    assert torch.allclose(token_logprobs(x, torch.tensor(3), backend="torch").double(), ref[3], rtol=1e-6)
    out = token_logprobs(x, torch.tensor([3, 5]), backend="torch").double()
    assert torch.allclose(out, ref[[3, 5]], rtol=1e-6, atol=1e-6)


# -- what the fuzz found: the entropy with an overflowing logit ------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_logprobs_entropy_with_overflowing_logit(backend, device):
    """Found by the fuzz: on the Triton backend a logit whose x/τ overflows to -inf in fp32 gave entropy NaN."""
    _, entropy = token_logprobs(torch.tensor([[-3e38, -0.29343]], device=device), torch.tensor([0], device=device),
                                temperature=0.7, return_entropy=True, backend=backend)
    assert float(entropy[0]) == 0.0, entropy
