"""``linear_token_logprobs`` regressions from issues 11 and 17: ignored rows with huge logits (forward and backward,
both backends, fp32 / bf16), the backward kernel's safety for a row whose saved lse is not its logsumexp, every subset
of ``requires_grad`` (eager and compiled), a frozen-LM-head training step, autocast, and the GPU hazards that can be
checked without a GPU (device guard, int64 offsets, no host sync)."""

from __future__ import annotations

import os

import pytest
import torch

from srpo_core.ops.linear_token_logprobs import linear_token_logprobs
from srpo_core.reference.linear_token_logprobs import linear_token_logprobs as reference
from srpo_core.testing import assert_close

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


def _skip_unless_runnable(backend, device):
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")


def _tol(dtype, peak):
    return (2e-5 + 1e-5 * peak) if dtype == torch.float32 else 2 ** -5 * (peak + 1)


def _reproducer(device, dtype, scale=30.0):
    """Issue 11's case: N=8, H=32, V=200, row 0 ignored and its hidden scaled ×30 (max logit ≈ 10² > 88.7)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 32, generator=g)
    weight = torch.randn(200, 32, generator=g)
    bias = torch.randn(200, generator=g)
    ids = torch.randint(0, 200, (8,), generator=g)
    ids[0] = -100
    ids[5] = -100
    hidden[0] *= scale
    hidden[5] *= scale
    return hidden.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype), ids.to(device)


def _fwd_bwd(hidden, weight, bias, ids, *, entropy, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = linear_token_logprobs(h, w, ids, bias=b, return_entropy=entropy, **kw)
    lp, ent = out if entropy else (out, None)
    g = torch.Generator().manual_seed(1)
    loss = (lp.double() * torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device)).sum()
    if entropy:
        loss = loss + (ent.double() * torch.randn(ent.shape, generator=g, dtype=torch.float64).to(lp.device)).sum()
    loss.backward()
    res = {"logp": lp, "grad_hidden": h.grad, "grad_weight": w.grad}
    if entropy:
        res["entropy"] = ent
    if b is not None:
        res["grad_bias"] = b.grad
    return res


# ---------------------------------------------------------------------------------------------------------------------
# issue 11: ignored rows


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ignored_rows_with_huge_logits(device, dtype, backend, entropy):
    """Forward and backward are finite, ignored rows give 0 and no gradient, and the rest equals the float64
    reference (which never sees the ignored rows' logits matter: they contribute nothing)."""
    _skip_unless_runnable(backend, device)
    hidden, weight, bias, ids = _reproducer(device, dtype)
    got = _fwd_bwd(hidden, weight, bias, ids, entropy=entropy, backend=backend)
    want = _fwd_bwd(hidden.double().cpu(), weight.double().cpu(), bias.double().cpu(), ids.cpu(), entropy=entropy,
                    backend="torch")
    ref = reference(hidden.double().cpu(), weight.double().cpu(), ids.cpu(), bias=bias.double().cpu())
    assert_close(want["logp"], ref, atol=1e-10, name="float64 path vs reference")
    ignored = (ids == -100).cpu()
    for name, x in got.items():
        assert torch.isfinite(x).all(), f"{name}: {int((~torch.isfinite(x)).sum())} non-finite entries"
        peak = float(want[name].detach().abs().max())
        assert_close(x, want[name], atol=_tol(dtype, peak), name=f"{name} [{backend}]")
    assert not got["logp"].cpu()[ignored].any() and not got["grad_hidden"].cpu()[ignored].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_equals_torch_on_issue_reproducer(device, dtype):
    """Issue 11's own check: grad_weight of the Triton backend is finite and equals the torch backend's."""
    _skip_unless_runnable("triton", device)
    hidden, weight, bias, ids = _reproducer(device, dtype)
    res = {be: _fwd_bwd(hidden, weight, None, ids, entropy=False, backend=be) for be in ("torch", "triton")}
    gw_t, gw_k = res["torch"]["grad_weight"], res["triton"]["grad_weight"]
    assert torch.isfinite(gw_k).all(), f"{int((~torch.isfinite(gw_k)).sum())} non-finite grad_weight entries"
    assert_close(gw_k, gw_t, atol=_tol(dtype, float(gw_t.abs().max())), name="grad_weight triton vs torch")


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logp-grad", "entropy-grad"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_is_safe_for_rows_whose_lse_is_not_theirs(device, dtype, entropy_grad):
    """The backward kernel itself (no compaction in front of it): a row with huge logits, ``lse = 0`` and zero
    upstream gradient (what an uncompacted ignored row carries) contributes exactly nothing, never inf·0."""
    _skip_unless_runnable("triton", device)
    from srpo_core.kernels.linear_token_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

    hidden, weight, bias, ids = _reproducer(device, dtype)
    ids_local = torch.where(ids == -100, torch.full_like(ids, -1), ids)
    lse, _, ent = linear_logprobs_fwd(hidden, weight, bias, ids_local, inv_tau=1.0, want_entropy=True)
    keep = ids != -100
    zero = torch.zeros((), device=device)
    lse = torch.where(keep, lse, zero)  # an ignored row's saved lse
    g_lp = torch.where(keep, torch.linspace(-1, 1, 8, device=device), zero)
    g_h = torch.where(keep, torch.linspace(0.5, -0.5, 8, device=device), zero) if entropy_grad else None
    gh, gw, gb = linear_logprobs_bwd(hidden, weight, bias, ids_local, lse, ent, g_lp, g_h, inv_tau=1.0,
                                     needs=(True, True, True))
    rows = torch.nonzero(keep)[:, 0]
    gh_k, gw_k, gb_k = linear_logprobs_bwd(hidden[rows], weight, bias, ids_local[rows], lse[rows], ent[rows],
                                           g_lp[rows], None if g_h is None else g_h[rows], inv_tau=1.0,
                                           needs=(True, True, True))
    for name, x, y in (("grad_hidden", gh[rows], gh_k), ("grad_weight", gw, gw_k), ("grad_bias", gb, gb_k)):
        assert torch.isfinite(x).all(), f"{name}: non-finite"
        assert_close(x, y, atol=_tol(dtype, float(y.abs().max())), name=name)
    assert not gh[~keep].any()


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_compute_no_inf_or_nan_on_any_lane(device, dtype, entropy):
    """Under the interpreter every lane is computed with numpy, masked or not, so numpy's overflow / invalid-value
    warnings reveal an ``exp2`` of an unshifted value or an ``inf·0`` that a masked store would hide. Uncompacted rows
    (``check_ids=False``), huge logits on ignored rows, a −inf bias entry, ragged blocks (N, V, H not multiples)."""
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("inspects the interpreter's numpy arithmetic")
    import warnings

    hidden, weight, bias, ids = _reproducer(device, dtype)
    bias[7] = -float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _fwd_bwd(hidden[:, :30], weight[:190, :30], bias[:190], ids, entropy=entropy, backend="triton",
                 check_ids=False)


# ---------------------------------------------------------------------------------------------------------------------
# issue 17 defect 1: any subset of hidden / weight / bias may need no gradient

SUBSETS = [pytest.param(s, id="+".join(n for n, f in zip(("h", "w", "b"), s, strict=True) if f) or "none")
           for s in [(a, b, c) for a in (False, True) for b in (False, True) for c in (False, True)]]


def _subset_step(hidden, weight, bias, ids, needs, backend, compiled):
    h, w, b = (x.detach().clone().requires_grad_(need) for x, need in zip((hidden, weight, bias), needs, strict=True))

    def step(h, w, b):
        lp, ent = linear_token_logprobs(h, w, ids, bias=b, return_entropy=True, temperature=0.9, backend=backend)
        return (lp * torch.linspace(-1, 1, lp.shape[0], device=lp.device)).sum() + 0.3 * ent.sum()

    fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
    loss = fn(h, w, b)
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", SUBSETS)
def test_every_requires_grad_subset(device, needs, backend, compiled):
    """The gradients asked for equal the float64 reference's, the others stay None (no "may not alias" error)."""
    _skip_unless_runnable(backend, device)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(7, 12, generator=g).to(device)
    weight = (torch.randn(45, 12, generator=g) / 3).to(device)
    bias = torch.randn(45, generator=g).to(device)
    ids = torch.tensor([0, 44, -100, 4, 7, 7, 30], device=device)
    torch._dynamo.reset()
    got = _subset_step(hidden, weight, bias, ids, needs, backend, compiled)
    want = _subset_step(hidden.double().cpu(), weight.double().cpu(), bias.double().cpu(), ids.cpu(), needs, "torch",
                        False)
    for name, x, y, need in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want, (True,) + needs,
                                strict=True):
        if not need:
            assert x is None, f"{name}: a gradient nobody asked for"
            continue
        assert_close(x, y, atol=1e-5 + 1e-5 * float(y.abs().max()), name=name)


def test_frozen_lm_head_lora_step(device):
    """TRL's frozen-head scenario end to end: a frozen ``lm_head`` without bias, a trainable LoRA-style adapter
    producing the hidden states, the fused op computing the loss, backward and an optimizer step — on both backends,
    with gradients and updated parameters equal to a naive materialised-logits step."""
    g = torch.Generator().manual_seed(5)
    n, d, v, r = 10, 16, 97, 4
    x = torch.randn(n, d, generator=g)
    ids = torch.randint(0, v, (n,), generator=g)
    ids[[1, 6]] = -100
    advantages = torch.randn(n, generator=g)
    base = torch.randn(d, d, generator=g) / 4  # frozen base projection
    lm_head = torch.randn(v, d, generator=g) / 4  # frozen, no bias
    lora_a0, lora_b0 = torch.randn(r, d, generator=g) / 4, torch.randn(d, r, generator=g) / 4

    def train(logp_fn, dev):
        a = lora_a0.clone().to(dev).requires_grad_()
        b = lora_b0.clone().to(dev).requires_grad_()
        head = lm_head.to(dev)
        opt = torch.optim.SGD([a, b], lr=0.5)
        hidden = x.to(dev) @ base.to(dev).T + (x.to(dev) @ a.T) @ b.T
        lp = logp_fn(hidden, head, ids.to(dev))
        keep = (ids != -100).to(dev)
        loss = -(advantages.to(dev) * lp * keep).sum() / keep.sum()
        loss.backward()
        grads = (a.grad.clone(), b.grad.clone())
        opt.step()
        return loss.detach(), grads, (a.detach(), b.detach()), head.grad

    def naive(hidden, head, ids):
        logsm = torch.log_softmax((hidden @ head.T).double(), -1)
        return torch.where(ids != -100, logsm.gather(-1, ids.clamp(min=0)[:, None])[:, 0], 0.0)

    want = train(naive, torch.device("cpu"))
    backends = ["torch"] + (["triton"] if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else [])
    for backend in backends:
        loss, grads, params, head_grad = train(
            lambda h, w, i, be=backend: linear_token_logprobs(h, w, i, backend=be), device)
        assert head_grad is None, "the frozen head got a gradient"
        assert_close(loss, want[0], atol=1e-5, name=f"loss [{backend}]")
        for name, got, exp in zip(("grad A", "grad B", "A after step", "B after step"), grads + params,
                              want[1] + want[2], strict=True):
            assert_close(got, exp, atol=1e-5 + 1e-5 * float(exp.abs().max()), name=f"{name} [{backend}]")


# ---------------------------------------------------------------------------------------------------------------------
# issue 17 defect 3: torch.autocast (D67)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_autocast_follows_f_linear(device, backend, with_bias):
    """Under ``torch.autocast(dtype=bf16)`` the op equals ``log_softmax(F.linear(h, W, b).float())`` computed under
    the same autocast, forward and gradients of the fp32 leaves. Inputs are multiples of 1/8, so every logit is an exact
    fp32 sum and both sides round it to the same bf16 value: a tight tolerance, which the fp32 result (unrounded
    logits) misses by ~10⁻²."""
    _skip_unless_runnable(backend, device)
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(8)
    hidden = (torch.randint(-16, 17, (9, 24), generator=g) / 8).to(device)
    weight = (torch.randint(-16, 17, (70, 24), generator=g) / 8).to(device)
    bias = (torch.randint(-16, 17, (70,), generator=g) / 8).to(device) if with_bias else None
    ids = torch.randint(0, 70, (9,), generator=g).to(device)
    ids[3] = -100
    keep = ids != -100

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight) + ((bias,) if with_bias else ())]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            lp, ent = fn(*leaves)
        assert lp.dtype == torch.float32
        ((lp * torch.linspace(-1, 1, 9, device=device)).sum() + 0.2 * ent.sum()).backward()
        return [lp.detach(), ent.detach()] + [x.grad for x in leaves]

    def naive(h, w, b=None):
        logsm = torch.log_softmax(F.linear(h, w, b).float(), -1)
        lp = torch.where(keep, logsm.gather(-1, ids.clamp(min=0)[:, None])[:, 0], 0.0)
        ent = torch.where(keep, -(logsm.exp() * logsm).sum(-1), 0.0)
        return lp, ent

    def ours(h, w, b=None):
        return linear_token_logprobs(h, w, ids, bias=b, return_entropy=True, backend=backend)

    want, got = grads(naive), grads(ours)
    for name, x, y in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), got, want, strict=False):
        atol = 1e-5 if name in ("logp", "entropy") else 2 ** -7 * (1 + float(y.abs().max()))
        assert x.dtype == y.dtype, name
        assert_close(x, y, atol=atol, name=f"{name} under autocast")
    fp32 = linear_token_logprobs(hidden, weight, ids, bias=bias, backend=backend)
    assert (fp32 - want[0]).abs().max() > 1e-3, "the case does not distinguish bf16 from fp32 logits"


# ---------------------------------------------------------------------------------------------------------------------
# issue 11 hazards that a CPU can check: device guard, fp32 grad_hidden accumulation, no host sync


def test_every_launch_runs_inside_the_device_guard(device, monkeypatch):
    """Both kernels are launched only inside ``_dispatch.device_guard(hidden)`` (patched here to record)."""
    _skip_unless_runnable("triton", device)
    import contextlib

    from srpo_core import _dispatch
    from srpo_core.kernels import linear_token_logprobs as K

    state = {"inside": 0, "guarded": [], "launches": []}
    real_guard = _dispatch.device_guard

    @contextlib.contextmanager
    def guard(x):
        state["guarded"].append(x.device)
        state["inside"] += 1
        try:
            with real_guard(x):
                yield
        finally:
            state["inside"] -= 1

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                state["launches"].append((self.name, state["inside"] > 0))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(_dispatch, "device_guard", guard)
    for name in ("linear_logprobs_fwd_kernel", "linear_logprobs_bwd_kernel"):
        monkeypatch.setattr(K, name, Spy(getattr(K, name), name))
    hidden, weight, bias, ids = _reproducer(device, torch.float32)
    _fwd_bwd(hidden, weight, bias, ids, entropy=True, backend="triton")
    kinds = {name for name, _ in state["launches"]}
    assert kinds == {"linear_logprobs_fwd_kernel", "linear_logprobs_bwd_kernel"}, state["launches"]
    assert all(inside for _, inside in state["launches"]), state["launches"]
    assert all(d == hidden.device for d in state["guarded"])


def test_addmm_fp32_accumulates_without_low_precision_partials(device):
    """``addmm_fp32`` (grad_hidden's accumulation across vocabulary chunks): bf16 operands whose products are exact
    fp32 numbers, summed over 64 chunks, give the exact float64 sum; rounding each chunk's partial to bf16 (the old
    ``acc += mm(bf16, bf16)``) does not."""
    K = pytest.importorskip("srpo_core.kernels.linear_token_logprobs")
    g = torch.Generator().manual_seed(9)
    parts = [((torch.randint(-64, 65, (6, 8), generator=g) / 16).to(device, torch.bfloat16),
              (torch.randint(-64, 65, (8, 5), generator=g) / 16).to(device, torch.bfloat16)) for _ in range(64)]
    acc = torch.zeros(6, 5, device=device)
    old = torch.zeros(6, 5, device=device)
    exact = torch.zeros(6, 5, dtype=torch.float64)
    for a, b in parts:
        K.addmm_fp32(acc, a, b)
        old += torch.mm(a, b)
        exact += a.double().cpu() @ b.double().cpu()
    assert acc.dtype == torch.float32
    assert torch.equal(acc.double().cpu(), exact)
    assert not torch.equal(old.double().cpu(), exact), "the case does not tell bf16 partials from fp32 ones"


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_check_ids_false_has_no_host_sync(device, monkeypatch, entropy):
    """With ``check_ids=False`` the Triton path reads no tensor value on the host (``Tensor.item`` / ``__bool__`` /
    ``nonzero`` would sync a GPU and break CUDA-graph capture), forward and backward; results equal the default's."""
    _skip_unless_runnable("triton", device)
    hidden, weight, bias, ids = _reproducer(device, torch.float32)
    want = _fwd_bwd(hidden, weight, bias, ids, entropy=entropy, backend="triton")
    calls = []

    def forbid(name, real):
        def f(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return f

    for name in ("item", "__bool__", "nonzero", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", forbid("torch.nonzero", torch.nonzero))
    got = _fwd_bwd(hidden, weight, bias, ids, entropy=entropy, backend="triton", check_ids=False)
    monkeypatch.undo()
    assert not calls, f"host reads with check_ids=False: {sorted(set(calls))}"
    for name, x in got.items():
        assert_close(x, want[name], atol=1e-5 + 1e-5 * float(want[name].detach().abs().max()), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias_reads_as_its_values(device, backend):
    """A bias view with stride 2 (``randn(2V)[::2]``) gives the float64 reference's log-probs and gradients: the
    kernels read the bias with unit stride, so the launchers hand them a contiguous copy (it read the wrong entries)."""
    _skip_unless_runnable(backend, device)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 16, generator=g)
    weight = torch.randn(40, 16, generator=g)
    full = torch.randn(80, generator=g) * 3
    ids = torch.tensor([0, 39, -100, 4, 7, 20])
    g_lp = torch.randn(6, generator=g, dtype=torch.float64)
    h, w, full_d = (x.to(device).clone().requires_grad_() for x in (hidden, weight, full))
    bias = full_d[::2]
    assert bias.stride() == (2,)
    lp = linear_token_logprobs(h, w, ids.to(device), bias=bias, backend=backend)
    (lp.double() * g_lp.to(device)).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b64 = full.double()[::2].clone().requires_grad_()
    lp64 = reference(h64, w64, ids, bias=b64)
    (lp64 * g_lp).sum().backward()
    assert_close(lp, lp64, atol=1e-5, name="logp")
    assert_close(h.grad, h64.grad, atol=1e-5, name="grad_hidden")
    assert_close(w.grad, w64.grad, atol=1e-5, name="grad_weight")
    assert_close(full_d.grad[::2], b64.grad, atol=1e-5, name="grad_bias")
    assert not bool(full_d.grad[1::2].any()), "the skipped entries get no gradient"
