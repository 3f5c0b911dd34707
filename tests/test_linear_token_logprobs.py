"""``linear_token_logprobs`` against its float64 reference: torch path and Triton kernels (interpreter), forward and
gradients of hidden / weight / bias, entropy, ignore_index, temperature, N = 0 / 1, tiny vocabulary tiles (many tiles,
ragged last tile), the overflow fallback, vocab-parallel on 2 and 3 gloo processes, bad input, benchmark smoke."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from srpo_core_test_gloo import free_port  # tests/gloo_group.py, registered by conftest.py

import srpo_core.ops.linear_token_logprobs as L
from srpo_core.ops.linear_token_logprobs import linear_token_logprobs
from srpo_core.reference.linear_token_logprobs import linear_token_logprobs as reference
from srpo_core.testing import assert_close
from srpo_core.tuning import TUNING

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def make(n, h, v, dtype, *, seed, bias, scale=1.0, ignore_every=0, device="cpu"):
    """Random inputs made on the CPU (the same values on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        ids[::ignore_every] = -100
    return hidden.to(device), weight.to(device), None if b is None else b.to(device), ids.to(device)


def run(fn, hidden, weight, bias, ids, *, entropy, seed, **kw):
    """Forward, then backward of ``Σ g_lp·logp + Σ g_H·H`` (random upstream): outputs and grads, float64."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(h, w, ids, bias=b, return_entropy=entropy, **kw)
    lp, ent = out if entropy else (out, None)
    g = torch.Generator().manual_seed(seed + 7)
    loss = (lp.double() * torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device)).sum()
    if entropy:
        loss = loss + (ent.double() * torch.randn(ent.shape, generator=g, dtype=torch.float64).to(ent.device)).sum()
    if loss.requires_grad:
        loss.backward()
    res = {"logp": lp, "grad_hidden": h.grad, "grad_weight": w.grad}
    if entropy:
        res["entropy"] = ent
    if b is not None:
        res["grad_bias"] = b.grad
    return res


def check(hidden, weight, bias, ids, *, entropy, seed, temperature=1.0, **kw):
    got = run(linear_token_logprobs, hidden, weight, bias, ids, entropy=entropy, seed=seed, temperature=temperature,
              **kw)
    def up(x):
        return None if x is None else x.double()

    ref = run(reference, up(hidden), up(weight), up(bias), ids, entropy=entropy, seed=seed, temperature=temperature)
    same = run(reference, hidden, weight, bias, ids, entropy=entropy, seed=seed, temperature=temperature)
    low = hidden.dtype in (torch.bfloat16, torch.float16)
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    logits_max = logits.abs().max() if logits.numel() else 0.0
    for name, want in ref.items():
        have = got[name]
        if want is None:
            assert have is None or not have.abs().any(), name
            continue
        assert have is not None, f"{name}: no gradient"
        assert have.dtype == (torch.float64 if hidden.dtype == torch.float64 else
                              (torch.float32 if name in ("logp", "entropy") else hidden.dtype)), name
        torch_err = (same[name].double() - want).abs()
        peak = want.abs().max() if want.numel() else 0
        # A gradient is a sum of (onehot − p)-weighted rows of `weight` (or `hidden`): its rounding scales with them,
        # not with the result, which may be exactly 0 (V = 1) while fp32 gives p = 1 − ulp.
        # Backward recomputes the logits u with another summation order: an ulp of |u| in u - lse becomes a relative
        # error of p, times those rows.
        scale = max([float(x.abs().max()) for x in (hidden, weight) if x.numel()] + [0.0])
        u_max = float(logits_max) / temperature
        atol = 2 * torch_err + (1e-10 if hidden.dtype == torch.float64 else
                                2e-5 + 4e-6 * max(peak, scale) + 2 ** -21 * u_max * scale)
        if low:  # a different tiling rounds a few logits / gradient tiles to the neighbouring bf16/fp16 value; the
            # entropy gradient multiplies that rounding by |u| (hypothesis found 2^-6 · (peak + 1) 0.5% too tight)
            atol = atol + 2 ** -5 * (peak + 1)
        assert_close(have, want, atol=atol, name=f"{name} [{DTYPE_IDS[hidden.dtype]}]")


@pytest.fixture
def small_tiles(monkeypatch):
    """Force many vocabulary tiles and token chunks on tiny shapes."""
    monkeypatch.setattr(TUNING, "linear_vocab_tile", 7)
    monkeypatch.setattr(TUNING, "linear_tile_elements", 7 * 5)


# ---------------------------------------------------------------------------------------------------------------------
# torch path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 40), h=st.integers(1, 24), v=st.integers(1, 300),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       bias=st.booleans(), entropy=st.booleans(), temperature=st.sampled_from([1.0, 0.6, 2.5]),
       ignore_every=st.sampled_from([0, 0, 2, 3]), tiles=st.sampled_from([(7, 35), (64, 256), (1024, 1 << 21)]),
       scale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 2 ** 16))
def test_torch_path_matches_reference(n, h, v, dtype, bias, entropy, temperature, ignore_every, tiles, scale, seed,
                                      device):
    old = TUNING.linear_vocab_tile, TUNING.linear_tile_elements
    TUNING.linear_vocab_tile, TUNING.linear_tile_elements = tiles
    try:
        hidden, weight, b, ids = make(n, h, v, dtype, seed=seed, bias=bias, scale=scale, ignore_every=ignore_every,
                                      device=device)
        check(hidden, weight, b, ids, entropy=entropy, seed=seed, temperature=temperature, backend="torch")
    finally:
        TUNING.linear_vocab_tile, TUNING.linear_tile_elements = old


@pytest.mark.parametrize("n", [0, 1], ids=["N=0", "N=1"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_tiny_batches(n, entropy, small_tiles, device):
    hidden, weight, b, ids = make(n, 5, 17, torch.float64, seed=n, bias=True, device=device)
    check(hidden, weight, b, ids, entropy=entropy, seed=n, backend="torch")


def test_all_ignored_gives_zeros_and_zero_grads(small_tiles, device):
    hidden, weight, b, ids = make(6, 5, 17, torch.float32, seed=3, bias=True, device=device)
    ids[:] = -100
    res = run(linear_token_logprobs, hidden, weight, b, ids, entropy=True, seed=3)
    for name, x in res.items():
        assert x is not None and not x.abs().any(), name


def test_gradcheck_float64(small_tiles, device):
    hidden, weight, b, ids = make(5, 3, 11, torch.float64, seed=1, bias=True, ignore_every=4, device=device)
    hidden.requires_grad_()
    weight.requires_grad_()
    b.requires_grad_()

    def f(h, w, bb):
        lp, ent = linear_token_logprobs(h, w, ids, bias=bb, temperature=0.8, return_entropy=True, backend="torch")
        return lp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight, b))


@pytest.mark.parametrize("where", ["later tile", "first tile"], ids=["jump-later", "jump-first"])
def test_overflow_fallback_and_extreme_logits(where, small_tiles, device):
    """A logit far above the running logsumexp of earlier tiles (the fast path's 2^x would overflow) is redone with an
    explicit max; -inf logits (bias) count as probability 0."""
    hidden, weight, b, ids = make(4, 3, 30, torch.float64, seed=5, bias=True, device=device)
    col = 25 if where == "later tile" else 2
    b[col] = 400.0
    b[11] = -float("inf")
    ids[0] = col
    ids[1] = 3
    check(hidden, weight, b, ids, entropy=True, seed=5, backend="torch")
    lp = linear_token_logprobs(hidden.float(), weight.float(), ids, bias=b.float())
    assert torch.isfinite(lp).all()


def test_output_never_materialises_full_logits_in_a_tile():
    """The rule of :func:`tile_sizes`: a tile holds at most linear_tile_elements values (the forward's
    linear_forward_tile_scale times more), vocabulary tiles ≤ linear_vocab_tile (×linear_forward_tile_scale); the
    forward's tile stays ≤ 16 MiB fp32."""
    for n, v in [(1, 151936), (2048, 151936), (16384, 32000), (3, 5)]:
        for fwd, k in ((False, 1), (True, TUNING.linear_forward_tile_scale)):
            nc, vt = L.tile_sizes(n, v, forward=fwd)
            assert nc * vt <= max(k * TUNING.linear_tile_elements, vt) and vt <= k * TUNING.linear_vocab_tile
            assert 1 <= nc <= n
            assert nc * vt * 4 <= 16 << 20


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (conftest sets TRITON_INTERPRET=1 on CPU-only machines)

needs_interpreter = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def kernel_blocks(monkeypatch):
    K = pytest.importorskip("srpo_core.kernels.linear_token_logprobs")
    small = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16, "num_warps": 1, "num_stages": 1}
    monkeypatch.setattr(K, "DEFAULT", dict(small))
    monkeypatch.setattr(K, "DEFAULT_FP32", dict(small))
    monkeypatch.setattr(TUNING, "linear_triton_bwd_chunk_elements", 16 * 64)  # several backward chunks
    monkeypatch.setattr(TUNING, "linear_triton_target_programs", 4)  # several forward splits
    return K


@needs_interpreter
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 33), h=st.integers(1, 40), v=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), bias=st.booleans(),
       entropy=st.booleans(), temperature=st.sampled_from([1.0, 0.7]), ignore_every=st.sampled_from([0, 3]),
       seed=st.integers(0, 2 ** 16))
def test_triton_matches_reference(kernel_blocks, n, h, v, dtype, bias, entropy, temperature, ignore_every, seed,
                                  device):
    hidden, weight, b, ids = make(n, h, v, dtype, seed=seed, bias=bias, ignore_every=ignore_every, device=device)
    check(hidden, weight, b, ids, entropy=entropy, seed=seed, temperature=temperature, backend="triton")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_default_config(dtype, device):
    pytest.importorskip("srpo_core.kernels.linear_token_logprobs")
    hidden, weight, b, ids = make(9, 20, 150, dtype, seed=11, bias=True, ignore_every=4, device=device)
    check(hidden, weight, b, ids, entropy=True, seed=11, temperature=0.9, backend="triton")


@needs_interpreter
def test_triton_n0(kernel_blocks, device):
    hidden, weight, b, ids = make(0, 4, 9, torch.float32, seed=0, bias=False, device=device)
    check(hidden, weight, b, ids, entropy=True, seed=0, backend="triton")


# ---------------------------------------------------------------------------------------------------------------------
# vocab-parallel



@pytest.mark.parametrize("world", [2, 3], ids=["2 ranks", "3 ranks"])
def test_vocab_parallel_matches_unsharded(world, tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed gloo")
    worker = pathlib.Path(__file__).with_name("linear_logprobs_dist_worker.py")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(worker), str(free_port()), str(world)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert f"linear-dist: OK {world}" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def _good():
    return torch.randn(4, 6), torch.randn(10, 6), torch.tensor([0, 9, -100, 3])


@pytest.mark.parametrize("case,exc,match", [
    pytest.param("inner size", ValueError, r"`weight` must be \[V, H\] with H = 6", id="inner size"),
    pytest.param("id too large", ValueError, r"ids\[1\] = 10", id="id too large"),
    pytest.param("id negative", ValueError, r"ids\[0\] = -1 ", id="id negative"),
    pytest.param("dtype mismatch", TypeError, r"`weight` must have the dtype of `hidden`", id="dtype mismatch"),
    pytest.param("device mismatch", ValueError, r"`weight` must be on cpu", id="device mismatch"),
    pytest.param("bias shape", ValueError, r"`bias` must have shape \[V\] = \[10\]", id="bias shape"),
    pytest.param("ids shape", ValueError, r"`ids` must have shape \[4\] \(the leading dimensions", id="ids shape"),
    pytest.param("vocab_start without group", ValueError, r"`vocab_start` must be 0 without a process_group",
                 id="vocab_start without group"),
    pytest.param("temperature", ValueError, r"`temperature` must be a positive finite float", id="temperature"),
    pytest.param("float ids", TypeError, r"`ids` must be an integer tensor", id="float ids"),
    pytest.param("empty vocabulary", ValueError, r"V >= 1", id="empty vocabulary"),
])
def test_bad_input(case, exc, match):
    h, w, ids = _good()
    kw = {}
    if case == "inner size":
        w = torch.randn(10, 5)
    elif case == "id too large":
        ids = torch.tensor([0, 10, -100, 3])
    elif case == "id negative":
        ids = torch.tensor([-1, 2, -100, 3])
    elif case == "dtype mismatch":
        w = w.double()
    elif case == "device mismatch":
        w = torch.empty(10, 6, device="meta")
    elif case == "bias shape":
        kw["bias"] = torch.randn(9)
    elif case == "ids shape":
        ids = ids[:3]
    elif case == "vocab_start without group":
        kw["vocab_start"] = 4
    elif case == "temperature":
        kw["temperature"] = 0.0
    elif case == "float ids":
        ids = ids.float()
    elif case == "empty vocabulary":
        w = torch.randn(0, 6)
    with pytest.raises(exc, match=match):
        linear_token_logprobs(h, w, ids, **kw)


def test_ignore_index_is_not_out_of_range():
    h, w, ids = _good()
    lp = linear_token_logprobs(h, w, ids, ignore_index=-100)
    assert lp[2] == 0 and torch.isfinite(lp).all()


# ---------------------------------------------------------------------------------------------------------------------
# benchmark smoke (the table script and the pytest-benchmark module on tiny sizes)


def test_benchmark_table_smoke(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear_table.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "| ours |" in text and "naive" in text and "torch" in text
    # a --dtype filter that leaves no shape is an error naming it, not an empty table
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear_table.py"), "--smoke", "--dtype",
                           "bfloat16", "--out", str(tmp_path / "none.md")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--dtype bfloat16" in proc.stderr and not (tmp_path / "none.md").exists()


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_torch_compile_fullgraph_traces_the_custom_op(entropy):
    """A training step calling linear_token_logprobs compiles with fullgraph=True (custom ops with fake kernels and an
    autograd formula) and gives the eager values and gradients."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, 12, generator=g), torch.randn(40, 12, generator=g) / 3
    ids = torch.tensor([0, 39, -100, 4, 7, 7, 1, 30, 2])

    def step(h, w):
        out = linear_token_logprobs(h * 1.0, w, ids, temperature=0.8, return_entropy=entropy)
        return (out[0] * 2.0 + 0.1 * out[1]).sum() if entropy else (out * 2.0).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_custom_op_opcheck():
    g = torch.Generator().manual_seed(4)
    hidden, weight, bias = torch.randn(5, 6, generator=g), torch.randn(11, 6, generator=g), torch.randn(11, generator=g)
    ids = torch.tensor([0, 10, -100, 3, 3])
    for want_entropy in (False, True):
        args = (hidden.requires_grad_(True), weight.requires_grad_(True), bias, ids, 1.25, want_entropy, -100, "torch",
                True)
        torch.library.opcheck(torch.ops.srpo_core.linear_token_logprobs.default, args)


# -- what the fuzz found: logits that overflow; the one strict xfail left is a known limit (D150) --------------------
def test_linear_token_logprobs_logit_overflow_raises():
    """Found by the fuzz: hidden [[3e38]] @ weight [[3.8525]]ᵀ overflows the fp32 logit, and the result was NaN
    (float64 gives 0, V = 1). Logits beyond float32 are outside the op's domain: a clear error, not a NaN (D150)."""
    with pytest.raises(ValueError, match=r"linear_token_logprobs: the logits of row 0 are not finite"):
        linear_token_logprobs(torch.tensor([[3e38]]), torch.tensor([[3.8525]]), torch.tensor([0]))
    out = linear_token_logprobs(torch.tensor([[3e38]]), torch.tensor([[3.8525]]), torch.tensor([0]), check_ids=False)
    assert bool(torch.isnan(out).all()), out  # the documented escape hatch returns what the arithmetic gives


_W17 = [-0.5776, -0.1583, -0.3152, -0.1817, -0.0050, 0.0526, 0.0443, -0.2076, 0.0597, -0.0607, -0.1933, -0.3988,
        -0.1718, 0.3720, -0.1121, -0.2228, 0.1687]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_linear_token_logprobs_large_finite_logits_raise(backend, device):
    """Found by the fuzz: large finite fp32 logits (|x/τ| ≈ 2.5e38, within float32 but not once scaled to base 2)
    gave NaN on all backends, where torch in fp32 gives 0: now the library's error (D150)."""
    with pytest.raises(ValueError, match=r"linear_token_logprobs: the logits of row 0 are not finite"):
        linear_token_logprobs(torch.tensor([[-3e38]], device=device), torch.tensor(_W17, device=device)[:, None],
                              torch.tensor([0], device=device), temperature=0.7, backend=backend)


@pytest.mark.xfail(strict=True, reason="known limit (D150): |logit|/τ above ~1.6e38 overflows the base-2 tiles; -inf "
                                       "where torch in fp32 and the float64 reference both give -3.1984e38")
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_known_linear_token_logprobs_large_finite_logits_inf(backend, device):
    h = torch.tensor([[3e38, -0.29343, -2.1788, 0.56843, -1.0845, -1.3986, 0.40335, 0.83803]], device=device)
    w = torch.tensor([[-0.5776, -0.0933, -0.2652, 0.2499, -0.2210, -0.3189, -0.1558, -0.2166],
                      [0.0597, 0.1834, -0.3305, 0.3287, -0.3719, -0.1784, 0.1300, -0.2382],
                      [0.1687, 0.2617, 0.0386, -0.1875, -0.1808, 0.0216, -0.4366, 0.2603]], device=device)
    out = linear_token_logprobs(h, w, torch.tensor([0], device=device), temperature=0.7, backend=backend)
    assert bool(torch.isfinite(out).all()), out
