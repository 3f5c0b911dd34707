"""``linear_token_logprobs`` regressions from issues 11 and 17: ignored rows with huge logits (forward and backward,
both backends, fp32 / bf16), the backward kernel's safety for a row whose saved lse is not its logsumexp, every subset
of ``requires_grad`` (eager and compiled), a frozen-LM-head training step, autocast, and the GPU hazards that can be
checked without a GPU (device guard, int64 offsets, no host sync)."""

from __future__ import annotations

import os

import pytest
import torch

from srpo_core.linear_logprobs import linear_token_logprobs
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
    from srpo_core.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

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
