"""``linear_token_logprobs`` conventions from issue 17 and meta tensors from issue 14: ``[..., H]`` inputs (no copy),
``shift``, ``out_dtype``, mixed precision, ``return_lse``, ``logit_scale`` and ``softcap`` (forward and gradients, both
backends, against the float64 reference), meta tensors."""

from __future__ import annotations

import os

import pytest
import torch

import srpo_core.ops.linear_token_logprobs as L
from srpo_core.ops.linear_token_logprobs import linear_token_logprobs
from srpo_core.reference.linear_token_logprobs import linear_token_logprobs as reference
from srpo_core.testing import assert_close

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


def _skip_unless_runnable(backend, device):
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")


def _data(device, dtype=torch.float32, *, b=3, t=5, h=12, v=53, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * scale / 2
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    ids[1, 2] = -100
    return hidden.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype), ids.to(device)


def _grads(fn, leaves, seed=3):
    """``fn(*leaves)`` → outputs (a tensor or a tuple); backward of a random linear functional of all of them."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [x.grad for x in leaves]


def _close(got, want, dtype, names):
    for name, x, y in zip(names, got, want, strict=True):
        peak = float(y.abs().max()) if y.numel() else 0.0
        atol = 3e-5 + 3e-5 * peak if dtype == torch.float32 else 2 ** -5 * (1 + peak)
        assert_close(x, y, atol=atol, name=name)


# ---------------------------------------------------------------------------------------------------------------------
# leading dimensions and shift


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_equal_the_flat_call_without_a_copy(device, backend, monkeypatch):
    _skip_unless_runnable(backend, device)
    hidden, weight, bias, ids = _data(device)
    seen = []
    real = L._op

    def spy(h, *args):
        seen.append(h)
        return real(h, *args)

    monkeypatch.setattr(L, "_op", spy)
    lp, ent = linear_token_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, backend=backend)
    assert lp.shape == ids.shape and ent.shape == ids.shape
    assert seen[0].data_ptr() == hidden.data_ptr() and seen[0].shape == (15, 12), "[B, T, H] was copied"
    flat = linear_token_logprobs(hidden.reshape(-1, 12), weight, ids.reshape(-1), bias=bias, return_entropy=True,
                                 backend=backend)
    assert torch.equal(lp.reshape(-1), flat[0]) and torch.equal(ent.reshape(-1), flat[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_scores_the_next_token(device, backend):
    """``shift=True`` on ``[B, T, H]`` / ``[B, T]`` equals the sliced call ``hidden[:, :-1]`` with ``ids[:, 1:]``
    (values and gradients); the last position of every sequence is 0 with no gradient."""
    _skip_unless_runnable(backend, device)
    hidden, weight, bias, ids = _data(device)

    def shifted(h, w, b):
        return linear_token_logprobs(h, w, ids, bias=b, shift=True, return_entropy=True, backend=backend)

    def sliced(h, w, b):
        lp, ent = linear_token_logprobs(h[:, :-1], w, ids[:, 1:], bias=b, return_entropy=True, backend=backend)
        zero = torch.zeros(h.shape[0], 1, device=h.device)
        return torch.cat([lp, zero], 1), torch.cat([ent, zero], 1)

    got, want = _grads(shifted, (hidden, weight, bias)), _grads(sliced, (hidden, weight, bias))
    _close(got, want, torch.float32, ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"])
    assert not got[0][:, -1].any() and not got[2][:, -1].any()


def test_shift_needs_a_sequence_dimension():
    with pytest.raises(ValueError, match=r"`hidden` must be \[\.\.\., T, H\]"):
        linear_token_logprobs(torch.randn(4), torch.randn(3, 4), torch.tensor(1), shift=True)


# ---------------------------------------------------------------------------------------------------------------------
# out_dtype, mixed precision


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_out_dtype_casts_the_fp32_result(out_dtype):
    hidden, weight, bias, ids = _data(torch.device("cpu"))
    want = linear_token_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, return_lse=True)
    got = linear_token_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, return_lse=True,
                                out_dtype=out_dtype)
    for x, y in zip(got, want, strict=True):
        assert x.dtype == out_dtype and torch.equal(x, y.to(out_dtype))
    assert linear_token_logprobs(hidden, weight, ids).dtype == torch.float32  # the default stays fp32 (D10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", ["hidden", "weight+bias"], ids=["low-hidden", "low-weight"])
def test_mixed_precision_is_the_fp32_op_on_upcast_inputs(device, backend, low, which):
    """bf16/fp16 with fp32 (D69): exactly the fp32 op on the exactly upcast inputs; each gradient in its input's
    dtype (the fp32 one rounded once)."""
    _skip_unless_runnable(backend, device)
    hidden, weight, bias, ids = _data(device)
    if which == "hidden":
        hidden = hidden.to(low)
    else:
        weight, bias = weight.to(low), bias.to(low)

    def ours(h, w, b):
        return linear_token_logprobs(h, w, ids, bias=b, return_entropy=True, backend=backend)

    def upcast(h, w, b):
        return linear_token_logprobs(h.float(), w.float(), ids, bias=b.float(), return_entropy=True, backend=backend)

    got, want = _grads(ours, (hidden, weight, bias)), _grads(upcast, (hidden, weight, bias))
    for name, x, y, leaf in zip(["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"], got, want,
                                [None, None, hidden, weight, bias], strict=True):
        assert x.dtype == (torch.float32 if leaf is None else leaf.dtype), name
        assert torch.equal(x, y), name


def test_mixed_precision_refuses_other_mixes():
    hidden, weight, _, ids = _data(torch.device("cpu"))
    with pytest.raises(TypeError, match=r"`weight` must have the dtype of `hidden` \(torch.bfloat16\)"):
        linear_token_logprobs(hidden.bfloat16(), weight.half(), ids)
    with pytest.raises(TypeError, match=r"`weight` must have the dtype of `hidden` \(torch.float32\)"):
        linear_token_logprobs(hidden, weight.double(), ids)


# ---------------------------------------------------------------------------------------------------------------------
# return_lse, logit_scale, softcap against the float64 reference


CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"logit_scale": 0.37}, id="logit_scale"),
    pytest.param({"softcap": 3.0}, id="softcap"),
    pytest.param({"softcap": 2.5, "logit_scale": 1.7, "temperature": 0.8}, id="softcap+scale+tau"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", CASES)
def test_lse_scale_softcap_match_reference(device, backend, opts, dtype):
    """Values and gradients of ``(logp, entropy, lse)`` — a z-loss on ``lse`` included — with ``logit_scale`` and
    ``softcap``, against the float64 reference on the same (rounded) inputs. Large logits (weights ×4) so the
    softcap saturates part of the vocabulary."""
    _skip_unless_runnable(backend, device)
    hidden, weight, bias, ids = _data(device, dtype, scale=4.0, seed=1)
    hidden, ids = hidden.reshape(-1, 12), ids.reshape(-1)

    def ours(h, w, b):
        return linear_token_logprobs(h, w, ids, bias=b, return_entropy=True, return_lse=True, backend=backend,
                                     **opts)

    def ref(h, w, b):
        return reference(h, w, ids.cpu(), bias=b, return_entropy=True, return_lse=True, **opts)

    got = _grads(ours, (hidden, weight, bias))
    want = _grads(ref, (hidden.double().cpu(), weight.double().cpu(), bias.double().cpu()))
    _close(got, want, dtype, ["logp", "entropy", "lse", "grad_hidden", "grad_weight", "grad_bias"])
    assert not got[2].cpu()[ids.cpu() == -100].any()


def test_softcap_bounds_the_logits():
    """With a softcap every logit is within (−c, c)/τ, so lse − log V ≤ c/τ even for huge raw logits."""
    hidden, weight, bias, ids = _data(torch.device("cpu"), scale=1e4)
    lp, lse = linear_token_logprobs(hidden, weight, ids, bias=bias, softcap=5.0, temperature=0.5, return_lse=True)
    assert torch.isfinite(lp).all() and (lse <= 10.0 + torch.log(torch.tensor(53.0)) + 1e-4).all()
    assert (lp >= -20.0 - torch.log(torch.tensor(53.0)) - 1e-4).all()


@pytest.mark.parametrize("name,value,exc", [
    pytest.param("logit_scale", 0.0, ValueError, id="logit_scale=0"),
    pytest.param("softcap", -1.0, ValueError, id="softcap<0"),
    pytest.param("softcap", "3", TypeError, id="softcap str"),
    pytest.param("out_dtype", torch.int64, TypeError, id="out_dtype int"),
    pytest.param("return_lse", 1, TypeError, id="return_lse int"),
    pytest.param("check_ids", None, TypeError, id="check_ids None"),
])
def test_bad_options(name, value, exc):
    hidden, weight, _, ids = _data(torch.device("cpu"))
    with pytest.raises(exc, match=f"`{name}`"):
        linear_token_logprobs(hidden, weight, ids, **{name: value})


# ---------------------------------------------------------------------------------------------------------------------
# meta tensors (issue 14, D70)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_meta_tensors_infer_shapes(backend):
    """On meta tensors shapes and dtypes are inferred (the custom op's fake kernel) and value checks are skipped;
    backward works too."""
    hidden = torch.empty(2, 7, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.empty(1000, 16, device="meta", dtype=torch.float32, requires_grad=True)
    ids = torch.empty(2, 7, device="meta", dtype=torch.int64)
    lp, ent, lse = linear_token_logprobs(hidden, weight, ids, shift=True, return_entropy=True, return_lse=True,
                                         softcap=30.0, backend=backend)
    for x in (lp, ent, lse):
        assert x.device.type == "meta" and x.shape == (2, 7) and x.dtype == torch.float32
    (lp.sum() + ent.sum() + lse.sum()).backward()
    assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == torch.bfloat16
    assert weight.grad.shape == weight.shape and weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Triton configs per (arch, dtype) and opt-in autotuning (issue 11, D71)


def test_pinned_configs_per_arch_and_dtype():
    K = pytest.importorskip("srpo_core.kernels.linear_token_logprobs")
    assert K.default_config(torch.bfloat16, 9) == K.CONFIGS[(9, "low")]
    assert K.default_config(torch.float16, 8) == K.CONFIGS[(8, "low")]
    assert K.default_config(torch.bfloat16, None) == K.DEFAULT and K.default_config(torch.bfloat16, 7) == K.DEFAULT
    assert all(K.default_config(torch.float32, a) == K.DEFAULT_FP32 for a in (None, 8, 9))
    assert [K.n_bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025, 40000)] == [1, 1, 2, 4, 1024, 1024, 2048, 65536]


def test_autotune_is_opt_in_and_keyed_on_v_h_and_the_n_bucket(monkeypatch):
    """SRPO_AUTOTUNE=1 on a GPU times every candidate once per (kernel, arch, dtype, V, H, bucket of N) and keeps the
    fastest; N moving inside its bucket reuses it; off (or on the interpreter) the pinned config is used, untimed."""
    K = pytest.importorskip("srpo_core.kernels.linear_token_logprobs")
    monkeypatch.setattr(K, "_TUNED", {})
    timed = []
    fastest = K.CANDIDATES["low"][3]

    def fake_bench(fn, x):
        cfg = fn()
        timed.append(cfg)
        return 1.0 if cfg == fastest else 2.0

    monkeypatch.setattr(K, "_bench", fake_bench)
    monkeypatch.setattr(K, "_arch", lambda x: 9)

    def hidden(n):
        return torch.empty(n, 64, dtype=torch.bfloat16)

    W, F = torch.empty(5000, 64, dtype=torch.bfloat16), {"WANT_ENTROPY": False, "HAS_BIAS": False, "SOFTCAP": False}

    monkeypatch.delenv("SRPO_AUTOTUNE", raising=False)
    assert K._config("fwd", hidden(1000), W, 5000, lambda c: c, None, F) == K.CONFIGS[(9, "low")] and not timed
    monkeypatch.setenv("SRPO_AUTOTUNE", "1")
    assert K._config("fwd", hidden(1000), W, 5000, lambda c: c, None, F) == fastest
    assert len(timed) == len(K.CANDIDATES["low"])
    assert K._config("fwd", hidden(1017), W, 5000, lambda c: c, None, F) == fastest  # same bucket: no timing
    assert len(timed) == len(K.CANDIDATES["low"])
    K._config("fwd", hidden(1025), W, 5000, lambda c: c, None, F)  # next bucket
    K._config("fwd", hidden(1000), W, 5001, lambda c: c, None, F)  # another V
    K._config("bwd", hidden(1000), W, 5000, lambda c: c, None, F)  # the other kernel
    assert len(timed) == 4 * len(K.CANDIDATES["low"])
    assert K._config("fwd", hidden(1000), W, 5000, lambda c: c, {"BLOCK_N": 16}, F)["BLOCK_N"] == 16  # explicit wins
    monkeypatch.setattr(K, "_arch", lambda x: None)  # interpreter: never timed
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert K._config("fwd", hidden(7), W, 9, lambda c: c, None, F) == K.DEFAULT


def test_autotuned_launch_gives_the_same_result(device, monkeypatch):
    """The tuned path launches what it picked: results equal the torch backend's (interpreter, or a GPU)."""
    _skip_unless_runnable("triton", device)
    K = pytest.importorskip("srpo_core.kernels.linear_token_logprobs")
    monkeypatch.setattr(K, "_TUNED", {})
    monkeypatch.setenv("SRPO_AUTOTUNE", "1")
    if device.type == "cpu":
        monkeypatch.setattr(K, "_arch", lambda x: 8)
        monkeypatch.setattr(K, "_bench", lambda fn, x: (fn(), float(len(K._TUNED)))[1])
    hidden, weight, bias, ids = _data(device, torch.bfloat16)

    got, want = _grads(lambda h, w, b: linear_token_logprobs(h, w, ids, bias=b, backend="triton"),
                       (hidden, weight, bias)), \
        _grads(lambda h, w, b: linear_token_logprobs(h, w, ids, bias=b, backend="torch"), (hidden, weight, bias))
    _close(got, want, torch.bfloat16, ["logp", "grad_hidden", "grad_weight", "grad_bias"])
    assert len(K._TUNED) == 2  # one forward and one backward entry


def test_autotune_key_holds_every_flag_that_changes_the_kernel(monkeypatch, device):
    """Issue 22: the tuning key omitted WANT_ENTROPY, HAS_BIAS, SOFTCAP (a timing of one variant was reused for
    another). The key differs per flag and per operand strides, each variant is timed once, and the launchers pass
    their flags (the fused ops' forward and backward, with and without each option)."""
    K = pytest.importorskip("srpo_core.kernels.linear_token_logprobs")
    h, w = torch.empty(100, 64, dtype=torch.bfloat16), torch.empty(500, 64, dtype=torch.bfloat16)
    base = {"WANT_ENTROPY": False, "HAS_BIAS": False, "SOFTCAP": False}
    keys = {K.tuning_key("fwd", h, w, 500, base)}
    for flag in base:
        keys.add(K.tuning_key("fwd", h, w, 500, {**base, flag: True}))
    keys.add(K.tuning_key("bwd", h, w, 500, {"HAS_ENTROPY_GRAD": True, "HAS_BIAS": False, "SOFTCAP": False}))
    keys.add(K.tuning_key("bwd", h, w, 500, {"HAS_ENTROPY_GRAD": False, "HAS_BIAS": False, "SOFTCAP": False}))
    keys.add(K.tuning_key("fwd", torch.empty(64, 100, dtype=torch.bfloat16).t(), w, 500, base))  # column-major
    assert len(keys) == 7
    assert K.tuning_key("fwd", h, w, 500, base) == K.tuning_key("fwd", torch.empty(120, 64, dtype=torch.bfloat16),
                                                                 w, 500, dict(reversed(list(base.items()))))

    monkeypatch.setattr(K, "_TUNED", {})
    monkeypatch.setenv("SRPO_AUTOTUNE", "1")
    monkeypatch.setattr(K, "_arch", lambda x: 9)
    timed = []
    monkeypatch.setattr(K, "_bench", lambda fn, x: timed.append(1) or 1.0)
    for flags in ({**base, "WANT_ENTROPY": True}, base, {**base, "SOFTCAP": True}, base):
        K._config("fwd", h, w, 500, lambda c: c, None, flags)
    assert len(timed) == 3 * len(K.CANDIDATES["low"])  # three variants, the repeat is cached

    if os.environ.get("TRITON_INTERPRET") != "1":
        return  # the launcher half below runs the kernels (interpreter; a GPU run keeps the key half)
    import srpo_core.kernels.linear_token_logprobs as LK

    seen = []
    real = LK._config
    monkeypatch.setattr(LK, "_config", lambda kind, *a: seen.append((kind, a[-1])) or real(kind, *a))
    monkeypatch.delenv("SRPO_AUTOTUNE")
    monkeypatch.setattr(K, "_arch", lambda x: None)
    hid, wt, b = torch.randn(4, 8), torch.randn(11, 8), torch.randn(11)
    ids = torch.tensor([0, 3, 10, 5])
    LK.linear_logprobs_fwd(hid, wt, b, ids, inv_tau=1.0, want_entropy=True, softcap=30.0)
    LK.linear_logprobs_fwd(hid, wt, None, ids, inv_tau=1.0, want_entropy=False)
    lse, _, ent = LK.linear_logprobs_fwd(hid, wt, b, ids, inv_tau=1.0, want_entropy=True)
    LK.linear_logprobs_bwd(hid, wt, b, ids, lse, ent, torch.ones(4), torch.ones(4), inv_tau=1.0,
                           needs=(True, True, True))
    assert seen == [("fwd", {"WANT_ENTROPY": True, "HAS_BIAS": True, "SOFTCAP": True}),
                    ("fwd", {"WANT_ENTROPY": False, "HAS_BIAS": False, "SOFTCAP": False}),
                    ("fwd", {"WANT_ENTROPY": True, "HAS_BIAS": True, "SOFTCAP": False}),
                    ("bwd", {"HAS_ENTROPY_GRAD": True, "HAS_BIAS": True, "SOFTCAP": False})]


def test_autotune_times_inside_the_device_guard(monkeypatch):
    """Issue 22: ``do_bench`` ran outside ``device_guard``, so on ``cuda:1`` tensors its events and flushes went to
    the current device. The timing now runs inside ``device_guard`` of the tensor being tuned."""
    K = pytest.importorskip("srpo_core.kernels.linear_token_logprobs")
    import contextlib

    import triton.testing

    state = {"inside": None, "calls": []}

    @contextlib.contextmanager
    def guard(x):
        state["inside"] = x
        yield
        state["inside"] = None

    def do_bench(fn, **kw):
        state["calls"].append(state["inside"])
        return 1.0

    monkeypatch.setattr(K, "device_guard", guard)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    x = torch.empty(3, 4)
    assert K._bench(lambda: None, x) == 1.0
    assert len(state["calls"]) == 1 and state["calls"][0] is x
