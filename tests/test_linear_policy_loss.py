"""``linear_policy_loss``: parity with the materialised-logits reference (loss, every gradient, logp, entropy, metrics)
over hypothesis batches, both layouts, every aggregation and KL kind; bf16; requires_grad subsets; poison; the Triton
path (interpreter on CPU, the ``device`` fixture); torch.compile tracing; errors."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from srpo_core import PolicyLossConfig, linear_policy_loss
from srpo_core.ops.policy_loss import LOSS_AGG_MODES
from srpo_core.reference import policy_loss as ref
from srpo_core.reference.policy_loss import KL_KINDS
from srpo_core.tuning import TUNING


def naive_coef(lengths, valid_of_seq, mode, factor):
    """Per valid token, verl's ``agg_loss`` weights written out per sequence (independent of ``aggregation_coef``)."""
    b = len(lengths)
    g = sum(1 for v in valid_of_seq if sum(v) > 0)  # verl: fully masked sequences are not counted
    n_valid = sum(sum(v) for v in valid_of_seq)
    out = []
    for i in range(b):
        n_i = sum(valid_of_seq[i])
        for ok in valid_of_seq[i]:
            if not ok:
                continue
            if mode == "token-mean":
                out.append(1.0 / n_valid)
            elif mode == "seq-mean-token-sum":
                out.append(1.0 / g)
            elif mode == "seq-mean-token-mean":
                out.append(1.0 / (g * n_i))
            else:
                out.append(1.0 / (g * factor))
    return torch.tensor(out, dtype=torch.float64)


@st.composite
def batches(draw):
    b = draw(st.integers(0, 4))
    lengths = [draw(st.integers(0, 6)) for _ in range(b)]
    return {
        "lengths": lengths, "h": draw(st.integers(1, 9)), "v": draw(st.integers(1, 40)),
        "per_token": draw(st.booleans()), "mode": draw(st.sampled_from(LOSS_AGG_MODES)),
        "kl": draw(st.sampled_from((None,) + KL_KINDS)), "clip_c": draw(st.sampled_from([None, 3.0])),
        "entropy_coeff": draw(st.sampled_from([0.0, 0.01])), "temperature": draw(st.sampled_from([1.0, 0.7])),
        "regime": draw(st.sampled_from(["mixed", "none-clipped", "all-clipped"])),
        "layout": draw(st.sampled_from(["padded", "packed"])), "bias": draw(st.booleans()),
        "ignore": draw(st.booleans()), "chunk": draw(st.sampled_from([1, 2, 256])),
        "eps": (draw(st.sampled_from([0.1, 0.2])), draw(st.sampled_from([0.2, 0.28]))),
        "return_entropy": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)), "kl_corr": draw(st.booleans()),
    }


def build(c, dtype=torch.float32):
    """Master data in float64 over the valid tokens, the reference's results, and the op's inputs in ``dtype``."""
    g = torch.Generator().manual_seed(c["seed"])
    lengths, h, v = c["lengths"], c["h"], c["v"]
    b, n = len(lengths), sum(lengths)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 2 / math.sqrt(h)
    bias = torch.randn(v, generator=g, dtype=torch.float64) if c["bias"] else None
    ids = torch.randint(0, v, (n,), generator=g)
    if c["ignore"] and n:
        ids[torch.rand(n, generator=g) < 0.3] = -100
    keep = ids != -100
    seq_adv = torch.randn(b, generator=g, dtype=torch.float64)
    seq = torch.repeat_interleave(torch.arange(b), torch.tensor(lengths, dtype=torch.long), output_size=n)
    adv = (seq_adv[seq] * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))) if c["per_token"] else seq_adv[seq]
    with torch.no_grad():  # the current policy's log-probs, to place old_logp relative to them
        _, lp_true, _, _ = ref.linear_policy_loss(hid, w, bias, ids.clamp(min=0), adv, adv, None, adv, keep,
                                                 temperature=c["temperature"])
    if c["regime"] == "none-clipped":
        old = lp_true.clone()
    elif c["regime"] == "all-clipped":
        old = lp_true - 3.0 * torch.sign(adv)
    else:
        old = lp_true + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    ref_lp = lp_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) if c["kl"] else None
    t = max(lengths, default=0) + 1
    factor = float(t) if c["layout"] == "padded" else 7.5
    offs = [0]
    for L in lengths:
        offs.append(offs[-1] + L)
    valid_of_seq = [keep[offs[i]:offs[i + 1]].tolist() for i in range(b)]
    coef = naive_coef(lengths, valid_of_seq, c["mode"], factor)
    return {"hid": hid, "w": w, "bias": bias, "ids": ids, "keep": keep, "old": old, "adv": adv, "seq_adv": seq_adv,
            "ref_lp": ref_lp, "coef": coef, "t": t, "factor": factor, "seq": seq, "offs": offs}


def with_config(kw):
    """``kw`` with its loss options gathered as ``config=PolicyLossConfig(...)``, the other keywords as they are."""
    fields = {f.name for f in dataclasses.fields(PolicyLossConfig)}
    return {**{k: v for k, v in kw.items() if k not in fields},
            "config": PolicyLossConfig(**{k: v for k, v in kw.items() if k in fields})}


def kwargs_of(c):
    kw = {"epsilon_low": c["eps"][0], "epsilon_high": c["eps"][1], "clip_ratio_c": c["clip_c"],
          "entropy_coeff": c["entropy_coeff"], "temperature": c["temperature"]}
    if c["kl"]:
        kw.update(beta=0.1, kl_kind=c["kl"], kl_ratio_correction=c.get("kl_corr", False))
    return kw


def reference(c, d, dtype):
    """Reference on the valid tokens only, in ``dtype`` (float64: the truth; float32: torch's own error)."""
    k = d["keep"]
    hid = d["hid"][k].to(dtype).requires_grad_(True)
    w = d["w"].to(dtype).requires_grad_(True)
    bias = None if d["bias"] is None else d["bias"].to(dtype).requires_grad_(True)
    rl = None if d["ref_lp"] is None else d["ref_lp"][k].to(dtype)
    loss, lp, ent, m = ref.linear_policy_loss(hid, w, bias, d["ids"][k], d["old"][k].to(dtype), d["adv"][k].to(dtype),
                                              rl, d["coef"].to(dtype), torch.ones(int(k.sum()), dtype=torch.bool),
                                              **kwargs_of(c))
    # ∂L/∂logp_t and ∂L/∂H_t: the size of each token's gradient before (onehot − p) cancels it, which is what an fp32
    # result is rounded against (with V = 1 the cancellation is exact in the reference and only rounding remains)
    lp_, ent_ = lp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
    kw = {"beta": 0.0, "kl_kind": "k3", **{k_: v_ for k_, v_ in kwargs_of(c).items() if k_ != "temperature"}}
    per_tok, _ = ref.token_loss(lp_, d["old"][k].to(dtype), d["adv"][k].to(dtype), rl, ent_, **kw)
    g_tok = torch.autograd.grad((per_tok * d["coef"].to(dtype)).sum(), [lp_, ent_], allow_unused=True)
    c_tok = sum(g.abs() for g in g_tok if g is not None) / c["temperature"]
    grads = torch.autograd.grad(loss, [x for x in (hid, w, bias) if x is not None], allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (hid, w, bias), strict=False)]
    c_tok = c_tok.detach() if torch.is_tensor(c_tok) else torch.zeros(int(k.sum()), dtype=dtype)
    scales = [0.0, 0.0, 0.0, 0.0]
    if c_tok.numel():  # fp32 rounds each logit u to ~ulp(max|u|): log-probs and p move by that much, relatively
        u = hid.detach() @ w.detach().T + (0 if bias is None else bias.detach())
        grow = 1 + float(u.abs().max()) / c["temperature"]
        scales = [grow * float(x) for x in (c_tok.max() * w.detach().abs().max(),
                                            (c_tok[:, None] * hid.detach().abs()).sum(0).max(), c_tok.sum(),
                                            c_tok.sum() * c["temperature"])]
    return loss.detach(), lp.detach(), ent.detach(), m, grads, scales


def run_op(c, d, dtype, device="cpu", backend="torch", chunk=None, check_ids=True, phase=None):
    """The op in the drawn layout, with garbage (NaN, bad ids) at every position that is not a valid token.
    ``phase(name)`` is called with "forward" before the op, "backward" before its backward and None after."""
    phase = phase or (lambda name: None)
    lengths, t, n = c["lengths"], d["t"], d["hid"].shape[0]
    b = len(lengths)
    w = d["w"].to(device, dtype).requires_grad_(True)
    bias = None if d["bias"] is None else d["bias"].to(device, dtype).requires_grad_(True)
    nan = float("nan")
    if c["layout"] == "packed":
        hid = d["hid"].to(device, dtype).requires_grad_(True)
        place = lambda x: x.to(device)  # noqa: E731
        extra = {"cu_seqlens": torch.tensor(d["offs"], device=device)}
    else:
        mask = torch.zeros(b, t, dtype=torch.bool)
        for i, L in enumerate(lengths):
            mask[i, :L] = True

        def place(x, fill=nan):
            out = torch.full((b, t) + tuple(x.shape[1:]), fill, dtype=x.dtype)
            out[mask] = x
            return out.to(device)

        hid = place(d["hid"].to(dtype)).requires_grad_(True)
        extra = {"mask": mask.to(device)}
    ids = place(d["ids"]) if c["layout"] == "packed" else place(d["ids"], fill=-7)
    # packed with N == B: an [N] advantage reads as per token (D105), so a per-sequence one is passed expanded
    per_token = c["per_token"] or (c["layout"] == "packed" and n == b)
    adv = place(d["adv"].to(dtype)) if per_token else d["seq_adv"].to(device, dtype)
    rl = None if d["ref_lp"] is None else place(d["ref_lp"].to(dtype))
    kw = {**kwargs_of(c), "loss_agg_mode": c["mode"]}
    if c["mode"] == "seq-mean-token-sum-norm" and c["layout"] == "packed":
        kw["loss_scale_factor"] = d["factor"]
    old_chunk, old_tile = TUNING.policy_loss_token_chunk, TUNING.policy_loss_triton_tile_bytes
    TUNING.policy_loss_token_chunk = chunk or c["chunk"]
    TUNING.policy_loss_triton_tile_bytes = (chunk or c["chunk"]) * c["v"] * w.element_size()  # the Triton path's too
    old = place(d["old"].to(dtype))
    try:
        phase("forward")
        out = linear_policy_loss(hid, w, ids, old, adv, bias=bias, ref_logp=rl,
                                 return_entropy=c["return_entropy"], backend=backend, check_ids=check_ids, **extra,
                                 **with_config(kw))
        params = [x for x in (hid, w, bias) if x is not None]
        phase("backward")
        grads = torch.autograd.grad(out.loss, params) if out.loss.requires_grad else None
        phase(None)
    finally:
        TUNING.policy_loss_token_chunk, TUNING.policy_loss_triton_tile_bytes = old_chunk, old_tile
    flat = (lambda x: x.reshape(-1, *x.shape[2:])[extra["mask"].reshape(-1)]) if c["layout"] == "padded" else (
        lambda x: x)
    del n
    return out, [flat(grads[0])] + list(grads[1:]), flat


def close(name, x, r64, r32, rel=1e-5, atol=1e-12, scale=0.0):
    """``|x − r64| ≤ 2·|r32 − r64| + rel·max|r64| + atol + 4e-7·scale``. The fp32 reference's own error
    ``|r32 − r64|`` is a poor yardstick where it is exact by structure (V = 1: p = 1 and the gradient cancels to 0)
    or lucky; ``scale`` is what an fp32 result is rounded against: the size of each token's gradient before
    (onehot − p) cancels it, times 1 + max|u| (4e-7 ≈ 3 ulps)."""
    x, r64, r32 = (y.detach().double().cpu() for y in (x, r64, r32))
    assert x.shape == r64.shape, (name, x.shape, r64.shape)
    assert torch.isfinite(x).all(), f"{name}: non-finite values {x}"
    bound = 2 * (r32 - r64).abs() + rel * (r64.abs().max() if r64.numel() else 0) + atol + 4e-7 * scale
    bad = (x - r64).abs() > bound
    assert not bad.any(), (f"{name}: first mismatch at {torch.nonzero(bad)[0].tolist()}: got "
                           f"{x[bad][0].item()}, reference {r64[bad][0].item()} (bound {bound[bad][0].item()})")


def check(c, d, out, grads, flat, dtype_rel=1e-5):
    L64, lp64, ent64, m64, g64, scales = reference(c, d, torch.float64)
    L32, lp32, ent32, _, g32, _ = reference(c, d, torch.float32)
    k = d["keep"]
    close("loss", out.loss, L64, L32, dtype_rel, scale=scales[3])
    names = ["grad_hidden", "grad_weight", "grad_bias"]
    gh = grads[0][k.to(grads[0].device)]
    assert (grads[0][~k.to(grads[0].device)] == 0).all(), "grad_hidden must be 0 at ignored tokens"
    for name, x, r64, r32, sc in zip(names, [gh] + grads[1:], g64, g32, scales, strict=False):
        close(name, x, r64, r32, dtype_rel, scale=sc)
    lp = flat(out.logp)
    close("logp", lp[k.to(lp.device)], lp64, lp32, dtype_rel, atol=1e-6)  # log-probs: fp32 rounding of O(1) values
    assert (lp[~k.to(lp.device)] == 0).all()
    if c["return_entropy"]:
        close("entropy", flat(out.entropy)[k.to(lp.device)], ent64, ent32, dtype_rel, atol=1e-6)
    for key in ("ratio_mean", "approx_kl") + (("kl",) if c["kl"] else ()):
        assert abs(float(out.metrics[key]) - float(m64[key])) <= 1e-4 * (1 + abs(float(m64[key]))), key
    return m64


@given(batches())
def test_parity_with_reference_fp32(c):
    d = build(c)
    out, grads, flat = run_op(c, d, torch.float32)
    m64 = check(c, d, out, grads, flat)
    k = d["keep"]
    live = k & (d["adv"] != 0)
    if c["regime"] == "all-clipped" and bool(live.any()):
        assert float(out.metrics["clip_fraction"]) == pytest.approx(float(live.sum()) / float(k.sum()))
    if c["regime"] == "none-clipped":
        assert float(out.metrics["clip_fraction"]) == 0 and float(m64["clip_fraction"]) == 0


BASE = {"lengths": [5, 0, 3, 7], "h": 16, "v": 70, "per_token": True, "mode": "token-mean", "kl": "low_var_kl",
        "clip_c": 3.0, "entropy_coeff": 0.01, "temperature": 0.7, "regime": "mixed", "layout": "padded",
        "bias": True, "ignore": True, "chunk": 4, "eps": (0.2, 0.28), "return_entropy": True, "seed": 3}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_layouts_agree(layout):
    c = {**BASE, "layout": layout}
    d = build(c)
    out, grads, flat = run_op(c, d, torch.float32)
    check(c, d, out, grads, flat)


@pytest.mark.parametrize("h", [16, 2], ids=["one-chunk", "chunks"])  # n·10 B ≤ 8·H B: all tokens in one chunk (D152)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(dtype, h):
    """bf16/fp16: logits rounded in the input dtype (D48), fp32 accumulation; tolerance relative to torch's own error
    in that dtype (the reference run on the same low-precision inputs). With H = 2 the tokens take several chunks of
    3 and grad_weight is summed in fp32 across them; with H = 16 they fit one chunk."""
    c = {**BASE, "chunk": 3, "h": h}
    d = build(c)
    for x in ("hid", "w", "bias"):  # make the low-precision inputs exact in float64, so the reference sees the same
        d[x] = d[x].to(dtype).double()
    out, grads, flat = run_op(c, d, dtype)
    L64, _, _, _, g64, _ = reference(c, d, torch.float64)
    Llo, _, _, _, glo, _ = reference(c, d, dtype)
    close("loss", out.loss, L64, Llo, 1e-2)
    gh = grads[0][d["keep"]]
    for name, x, r64, rlo in zip(["gh", "gw", "gb"], [gh] + grads[1:], g64, glo, strict=True):
        close(name, x, r64, rlo, 2e-2)
    assert grads[1].dtype == dtype


@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias", "all"])
def test_requires_grad_subsets(frozen):
    c = {**BASE, "layout": "packed"}
    d = build(c)
    w = d["w"].float().requires_grad_(frozen not in ("weight", "all"))
    h = d["hid"].float().requires_grad_(frozen not in ("hidden", "all"))
    bias = d["bias"].float().requires_grad_(frozen not in ("bias", "all"))
    kw = kwargs_of(c)
    out = linear_policy_loss(h, w, d["ids"], d["old"].float(), d["adv"].float(), bias=bias,
                             ref_logp=d["ref_lp"].float(), cu_seqlens=torch.tensor(d["offs"]), **with_config(kw))
    full_c = {**c, "return_entropy": False}
    out_all, grads_all, _ = run_op(full_c, d, torch.float32)
    assert float(out.loss.detach()) == pytest.approx(float(out_all.loss.detach()), rel=1e-6)
    if frozen == "all":
        assert not out.loss.requires_grad
        return
    out.loss.backward()
    for name, x, g in zip(("hidden", "weight", "bias"), (h, w, bias), grads_all, strict=True):
        if name == frozen:
            assert x.grad is None
        else:
            torch.testing.assert_close(x.grad, g, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # no grad mode: same loss, nothing to backpropagate
        out_ng = linear_policy_loss(h, w, d["ids"], d["old"].float(), d["adv"].float(), bias=bias,
                                    ref_logp=d["ref_lp"].float(), cu_seqlens=torch.tensor(d["offs"]), **with_config(kw))
    assert float(out_ng.loss) == pytest.approx(float(out.loss.detach()), rel=1e-6) and not out_ng.loss.requires_grad


def test_no_bias_and_upstream_scale():
    c = {**BASE, "bias": False, "layout": "packed"}
    d = build(c)
    h = d["hid"].float().requires_grad_(True)
    w = d["w"].float().requires_grad_(True)
    out = linear_policy_loss(h, w, d["ids"], d["old"].float(), d["adv"].float(), ref_logp=d["ref_lp"].float(),
                             cu_seqlens=torch.tensor(d["offs"]), **with_config(kwargs_of(c)))
    (2.5 * out.loss).backward()
    _, grads, _ = run_op(c, d, torch.float32)
    torch.testing.assert_close(h.grad, 2.5 * grads[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, 2.5 * grads[1], rtol=1e-6, atol=1e-7)


def test_poisoned_allocations_are_all_written(monkeypatch):
    """Under SRPO_POISON=1 every fresh buffer starts as NaN: any element the chunked path forgot would show."""
    monkeypatch.setenv("SRPO_POISON", "1")
    for chunk in (1, 3, 256):
        c = {**BASE, "chunk": chunk}
        d = build(c)
        out, grads, _ = run_op(c, d, torch.float32)
        for x in [out.loss, out.logp, out.entropy, *out.metrics.values(), *grads]:
            assert torch.isfinite(x).all()


def test_empty_batch_and_no_valid_token():
    for lengths, ignore_all in (([], False), ([0, 0], False), ([2, 1], True)):
        c = {**BASE, "lengths": lengths, "layout": "packed"}
        d = build(c)
        if ignore_all:
            d["ids"][:] = -100
            d["keep"][:] = False
            d["coef"] = d["coef"][:0]
        out, grads, _ = run_op(c, d, torch.float32)
        assert float(out.loss) == 0 and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_path(device, layout):
    """The Triton path (library GEMMs + token_logprobs' row kernels, chunks of 4 tokens) against the reference."""
    c = {**BASE, "layout": layout, "lengths": [5, 0, 4], "v": 70}
    d = build(c)
    out, grads, flat = run_op(c, d, torch.float32, device=device, backend="triton")
    grads = [g.cpu() for g in grads]
    check(c, d, out, grads, flat=lambda x: flat(x).cpu())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches())
def test_triton_parity_fp32(device, c):
    """The Triton path over the same hypothesis batches as the torch path (chunks of 1, 2 or all tokens)."""
    d = build(c)
    out, grads, flat = run_op(c, d, torch.float32, device=device, backend="triton")
    check(c, d, out, [g.cpu() for g in grads], lambda x: flat(x).cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("chunk", [3, 256], ids=["chunks", "one-chunk"])
def test_triton_low_precision(device, chunk, dtype):
    """bf16/fp16 on the Triton path: logits tiles in the input dtype, fp32 accumulation, grad_weight of several chunks
    summed in fp32; tolerance relative to torch's own error in that dtype (the reference on the same inputs)."""
    c = {**BASE, "chunk": chunk}
    d = build(c)
    for x in ("hid", "w", "bias"):
        d[x] = d[x].to(dtype).double()
    out, grads, _ = run_op(c, d, dtype, device=device, backend="triton")
    grads = [g.cpu() for g in grads]
    L64, _, _, _, g64, _ = reference(c, d, torch.float64)
    Llo, _, _, _, glo, _ = reference(c, d, dtype)
    close("loss", out.loss, L64, Llo, 1e-2)
    for name, x, r64, rlo in zip(["gh", "gw", "gb"], [grads[0][d["keep"]]] + grads[1:], g64, glo, strict=True):
        close(name, x, r64, rlo, 2e-2)
    assert grads[1].dtype == dtype


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_triton_requires_grad_subsets(device, frozen):
    c = {**BASE, "layout": "packed"}
    d = build(c)
    w = d["w"].float().to(device).requires_grad_(frozen != "weight")
    h = d["hid"].float().to(device).requires_grad_(frozen != "hidden")
    on = {k: d[k].to(device) for k in ("ids", "old", "adv", "bias", "ref_lp")}
    out = linear_policy_loss(h, w, on["ids"], on["old"].float(), on["adv"].float(), bias=on["bias"].float(),
                             ref_logp=on["ref_lp"].float(), cu_seqlens=torch.tensor(d["offs"], device=device),
                             backend="triton", **with_config(kwargs_of(c)))
    _, grads_all, _ = run_op({**c, "return_entropy": False}, d, torch.float32)
    out.loss.backward()
    live, ref_grad = (h, grads_all[0]) if frozen == "weight" else (w, grads_all[1])
    torch.testing.assert_close(live.grad.cpu(), ref_grad, rtol=1e-5, atol=1e-7)
    assert (w if frozen == "weight" else h).grad is None


@pytest.mark.parametrize("check_ids", [True, False])
def test_torch_compile_traces_the_op(check_ids):
    c = {**BASE, "chunk": 256}
    d = build(c)
    _, grads_eager, _ = run_op(c, d, torch.float32)
    b, t = len(c["lengths"]), d["t"]
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, L in enumerate(c["lengths"]):
        mask[i, :L] = True

    def pad(x, fill=0):
        out = torch.full((b, t) + tuple(x.shape[1:]), fill, dtype=x.dtype)
        out[mask] = x
        return out

    h = pad(d["hid"].float()).requires_grad_(True)
    w = d["w"].float().requires_grad_(True)
    bias = d["bias"].float().requires_grad_(True)

    opts = with_config(kwargs_of(c))

    def step(h, w, bias):
        out = linear_policy_loss(h, w, pad(d["ids"], -100), pad(d["old"].float()), pad(d["adv"].float()),
                                 mask=mask, bias=bias, ref_logp=pad(d["ref_lp"].float()), check_ids=check_ids,
                                 **opts)
        return out.loss

    torch.compile(step, backend="aot_eager", fullgraph=True)(h, w, bias).backward()
    # the traced op keeps the padded rows (sync-free) where eager compacts them: another fp32 summation order in the
    # gradient GEMMs, so the bound is fp32 rounding of the gradient's scale, not of each entry
    for got, want in ((h.grad[mask], grads_eager[0]), (w.grad, grads_eager[1])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def _args(n=4, v=11, hd=3):
    return (torch.randn(n, hd), torch.randn(v, hd), torch.randint(0, v, (n,)), torch.zeros(n), torch.ones(n))


@pytest.mark.parametrize("change, match", [
    ({"mask": torch.ones(4, dtype=torch.bool)}, "exactly one of `mask`"),
    ({"cu_seqlens": None}, "exactly one of `mask`"),
    ({"loss_agg_mode": "seq-mean"}, "`loss_agg_mode` must be one of"),
    ({"kl_kind": "k4"}, "`kl_kind` must be one of"),
    ({"clip_ratio_c": 1.0}, "`clip_ratio_c` must be > 1"),
    ({"beta": 0.1}, "`beta` = 0.1 needs `ref_logp`"),
    ({"loss_agg_mode": "seq-mean-token-sum-norm"}, "needs `loss_scale_factor`"),
    ({"temperature": 0.0}, "`temperature` must be > 0"),
    ({"cu_seqlens": torch.tensor([0, 3])}, "`cu_seqlens` must end at N = 4"),
])
def test_errors(change, match):
    h, w, ids, old, adv = _args()
    kw = {"cu_seqlens": torch.tensor([0, 1, 4]), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        linear_policy_loss(h, w, ids, old, adv, **with_config(kw))


def test_value_errors_name_the_argument():
    h, w, ids, old, adv = _args()
    cu = torch.tensor([0, 4])
    with pytest.raises(ValueError, match=r"`ids` must lie in \[0, V\) = \[0, 11\)"):
        linear_policy_loss(h, w, torch.tensor([0, 11, 2, 3]), old, adv, cu_seqlens=cu)
    with pytest.raises(ValueError, match="`old_logp` must be finite"):
        linear_policy_loss(h, w, ids, torch.tensor([0.0, float("nan"), 0, 0]), adv, cu_seqlens=cu)
    with pytest.raises(ValueError, match="`advantages` must be per token"):
        linear_policy_loss(h, w, ids, old, torch.ones(3), cu_seqlens=cu)
    with pytest.raises(ValueError, match="`weight` must be"):
        linear_policy_loss(h, torch.randn(11, 5), ids, old, adv, cu_seqlens=cu)
    with pytest.raises(TypeError, match="`weight` must be torch.float32"):
        linear_policy_loss(h, w.double(), ids, old, adv, cu_seqlens=cu)


def test_logits_far_above_the_sampled_token():
    """The fp32 path shifts each row by its sampled token's logit; a row with another logit more than 127 bits above
    it overflows 2^x and is redone with the row max (and must still match the reference)."""
    c = {**BASE, "bias": False, "ignore": False, "kl": None, "entropy_coeff": 0.01, "return_entropy": True}
    d = build(c)
    d["w"] = d["w"] * 60  # logits spread over hundreds of nats
    d["old"] = ref.linear_policy_loss(d["hid"], d["w"], None, d["ids"], d["adv"], d["adv"], None, d["adv"],
                                      d["keep"], temperature=c["temperature"])[1].detach() + 0.1
    u = (d["hid"] @ d["w"].T) / c["temperature"]
    gap = (u.max(1).values - u.gather(1, d["ids"][:, None])[:, 0]) * 1.4426950408889634
    assert bool((gap > 127).any()) and bool((gap < 127).any()), "the case must exercise both paths"
    out, grads, flat = run_op(c, d, torch.float32)
    check(c, d, out, grads, flat)


@pytest.mark.parametrize("entropy_coeff", [0.0, 0.01])
@pytest.mark.parametrize("gap_bits", [70.0, 110.0, 121.0, 124.0, 126.5])
def test_a_row_far_below_its_max_is_exact(gap_bits, entropy_coeff):
    """The fp32 path shifts a row by its sampled token's logit. With another logit 121-127 bits above it, Σ 2^x is
    finite but Σ 2^x·x (the entropy) overflowed, and from far less the backward's 1/Σ 2^x fell into fp32's subnormals
    (found by review): the loss, the entropy and both gradients must match the float64 reference."""
    g = torch.Generator().manual_seed(1)
    n, hd, v = 3, 16, 37
    h = torch.randn(n, hd, generator=g, dtype=torch.float64)
    w = torch.randn(v, hd, generator=g, dtype=torch.float64)
    h[1] = w[5] * (gap_bits * math.log(2) / w[5].norm() ** 2)
    # small advantages, as a token-mean over many tokens gives: coefficients times 1/Σ 2^x then reach the subnormals
    ids, adv, cu = torch.tensor([3, 3, 3]), torch.full((n,), 1e-5, dtype=torch.float64), torch.tensor([0, n])
    cfg = PolicyLossConfig(entropy_coeff=entropy_coeff * 1e-5)
    ent = entropy_coeff != 0  # without the entropy, nothing overflows: only the precision of 1/Σ 2^x is at stake
    h64, w64 = h.float().double().requires_grad_(True), w.float().double().requires_grad_(True)
    ref64 = linear_policy_loss(h64, w64, ids, None, adv, cu_seqlens=cu, return_entropy=ent, config=cfg,
                               backend="reference")
    ref64.loss.backward()
    h32, w32 = h.float().requires_grad_(True), w.float().requires_grad_(True)
    got = linear_policy_loss(h32, w32, ids, None, adv.float(), cu_seqlens=cu, return_entropy=ent, config=cfg,
                             backend="torch")
    got.loss.backward()
    if ent:
        torch.testing.assert_close(got.entropy.double(), ref64.entropy.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss.double(), ref64.loss.detach(), rtol=1e-4, atol=1e-6)
    for mine, want in ((h32.grad, h64.grad), (w32.grad, w64.grad)):
        torch.testing.assert_close(mine.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_aggregation_divisor_verl_and_trl():
    """verl 0.9.1's agg_loss divides the sequence means by the sequences that have a valid token; TRL's ``.mean()``
    counts every row, which ``global_batch_size=B`` gives. Three sequences, the middle one empty."""
    from srpo_core.ops.policy_loss import aggregation_coef

    valid = torch.tensor([True, True, True, False, True])  # seq 0: 2 tokens, seq 1: none, seq 2: 2 valid of 3
    seq = torch.tensor([0, 0, 2, 2, 2])
    verl = aggregation_coef(valid, seq, 3, "seq-mean-token-mean", None)
    trl = aggregation_coef(valid, seq, 3, "seq-mean-token-mean", None, global_batch_size=3)
    assert torch.allclose(verl, torch.tensor([1 / 4, 1 / 4, 1 / 4, 0, 1 / 4], dtype=torch.float64))
    assert torch.allclose(trl, torch.tensor([1 / 6, 1 / 6, 1 / 6, 0, 1 / 6], dtype=torch.float64))
    norm = aggregation_coef(valid, seq, 3, "seq-mean-token-sum-norm", 4.0)
    assert torch.allclose(norm, valid.double() / (2 * 4.0))  # verl: seq-mean of token sums, then ÷ the constant


def test_forward_without_backward_frees_its_gradients():
    """The gradients formed in the forward are non-differentiable outputs held by the node: dropping the loss
    without a backward frees them (no reference cycle through ctx)."""
    import gc
    import weakref

    w = torch.randn(50, 8, requires_grad=True)
    h = torch.randn(4, 8, requires_grad=True)
    out = linear_policy_loss(h, w, torch.randint(0, 50, (4,)), None, torch.randn(4), cu_seqlens=torch.tensor([0, 4]))
    node = weakref.ref(out.loss.grad_fn)
    del out
    gc.collect()
    assert node() is None


def test_double_backward_through_a_differentiable_seed():
    """``autograd.grad(loss · s, w, create_graph=True)`` with ``s = 1`` that requires grad: the gradients stay a
    function of ``s`` (the backward skips its in-place scale only for a plain seed of 1)."""
    c = {**BASE, "kl": None, "entropy_coeff": 0.0, "return_entropy": False, "bias": False}
    d = build(c)
    w = d["w"].float().requires_grad_(True)
    hid = d["hid"].float()
    out = linear_policy_loss(hid, w, d["ids"].clamp(min=0), d["old"].float(), d["adv"].float(),
                             cu_seqlens=torch.tensor(d["offs"]))
    s = torch.tensor(1.0, requires_grad=True)
    (gw,) = torch.autograd.grad(out.loss * s, w, create_graph=True)
    assert gw.requires_grad
    (ds,) = torch.autograd.grad((gw * gw).sum(), s)
    assert torch.allclose(ds, 2 * (gw.detach() ** 2).sum(), rtol=1e-5)


@pytest.mark.parametrize("dtype,seed", [(torch.float16, 65536.0), (torch.bfloat16, 1 / 3)])
def test_backward_scales_by_the_seed_in_fp32(dtype, seed):
    """The upstream scale multiplies the low-precision gradients as given: an fp16 65536 (DeepSpeed's initial loss
    scale) is not cast to inf first, a bf16 1/3 is not rounded to 0.334 first."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(20, 32, generator=g) * 0.5).to(dtype).requires_grad_(True)
    w = (torch.randn(64, 32, generator=g) * 0.2).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 64, (20,), generator=g)
    args = (h, w, ids, torch.randn(20, generator=g) * 0.1 - 4, torch.randn(20, generator=g))
    (g1,) = torch.autograd.grad(linear_policy_loss(*args, cu_seqlens=torch.tensor([0, 20])).loss, w)
    (gs,) = torch.autograd.grad(linear_policy_loss(*args, cu_seqlens=torch.tensor([0, 20])).loss * seed, w)
    assert torch.isfinite(gs).all()
    want = g1.double() * seed
    rel = torch.finfo(dtype).eps
    # fp16 stores its gradients times a power of two (D171): where g1 fell into fp16's subnormals, gs keeps the bits
    # g1 lost there (half a subnormal spacing, 2^-25, times the seed)
    sub = seed * 2.0 ** -25 if dtype == torch.float16 else 0.0
    assert ((gs.double() - want).abs() <= rel * want.abs() + sub + 1e-30).all()
    live = g1.double().abs() >= torch.finfo(dtype).tiny  # no systematic bias: a rounded 1/3 scales every element by
    # +0.19% (over g1's normal values: its subnormal ones carry their own rounding)
    assert abs(float(((gs.double() - want)[live] / want[live]).mean())) < 5e-4


# ------------------------------------------------------------------- bf16 logits, autocast, grad_weight accumulator
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_logp_is_log_softmax_of_the_bf16_logits(backend, temperature, device):
    """bf16 inputs: the logits are rounded to bf16 once (as the LM head computes them), then scaled by 1/τ in fp32:
    logp equals log_softmax(bf16 logits / τ) in float64 to fp32 accuracy, with logits of std ≈ 10 (where a second
    rounding of x/τ to bf16 moves logp by ~0.1 nats)."""
    g = torch.Generator().manual_seed(5)
    n, h, v = 12, 16, 300
    hid = torch.randn(n, h, generator=g).bfloat16().to(device)
    w = (torch.randn(v, h, generator=g) * 10 / math.sqrt(h)).bfloat16().to(device)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    out = linear_policy_loss(hid, w, ids, None, torch.ones(n, device=device),
                             cu_seqlens=torch.tensor([0, n], device=device),
                             config=PolicyLossConfig(temperature=temperature), backend=backend)
    logits = (hid @ w.T).double()  # bf16 GEMM on the same device, rounded to bf16 once
    want = torch.log_softmax(logits / temperature, -1).gather(1, ids[:, None])[:, 0]
    assert (out.logp.double() - want).abs().max() < 2e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_follows_f_linear(backend, device):
    """fp32 parameters under torch.autocast(bf16): the op computes as F.linear would (inputs cast to bf16), and the
    gradients reach the fp32 parameters through the casts: the same as calling it on explicitly cast inputs."""
    c = {**BASE, "layout": "packed", "bias": False, "chunk": 3}
    d = build(c)
    kw = {"cu_seqlens": torch.tensor(d["offs"], device=device), "ref_logp": d["ref_lp"].float().to(device),
          **kwargs_of(c)}
    args = (d["ids"].to(device), d["old"].float().to(device), d["adv"].float().to(device))

    def grads(cast):
        h = d["hid"].float().to(device).requires_grad_(True)
        w = d["w"].float().to(device).requires_grad_(True)
        if cast:
            out = linear_policy_loss(h.bfloat16(), w.bfloat16(), *args, backend=backend, **with_config(kw))
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = linear_policy_loss(h, w, *args, backend=backend, **with_config(kw))
        out.loss.backward()
        return out.loss.detach(), h.grad, w.grad

    auto, explicit = grads(False), grads(True)
    assert auto[1].dtype == auto[2].dtype == torch.float32
    for a, b in zip(auto, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_grad_weight_is_summed_in_fp32_across_chunks(backend, monkeypatch, device):
    """128 chunks of 4 tokens: grad_weight summed in fp32 stays as accurate as one chunk of all 512 (a bf16 running
    sum rounds once per chunk: about 2.4× the error here)."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 512, 16, 64
    h0, w0 = torch.randn(n, h, generator=g).bfloat16(), (torch.randn(v, h, generator=g) * 0.5).bfloat16()
    ids = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g).abs() + 0.5
    h0, w0, ids, adv = (t.to(device) for t in (h0, w0, ids, adv))

    def grad_weight(dtype, chunk):
        monkeypatch.setattr(TUNING, "policy_loss_token_chunk", chunk)
        monkeypatch.setattr(TUNING, "policy_loss_triton_tile_bytes", chunk * v * 2)
        w = w0.to(dtype).clone().requires_grad_(True)  # a fresh leaf: w0 itself would accumulate
        out = linear_policy_loss(h0.to(dtype), w, ids, None, adv.to(dtype),
                                 cu_seqlens=torch.tensor([0, n], device=device),
                                 backend="torch" if dtype == torch.float64 else backend)
        out.loss.backward()
        return w.grad.double()

    truth = grad_weight(torch.float64, n)
    err = {k: float((grad_weight(torch.bfloat16, k) - truth).norm() / truth.norm()) for k in (4, n)}
    assert err[4] <= 1.5 * err[n], err


def test_triton_path_without_gradients(device):
    """No parameter needs a gradient (no_grad): the Triton path still gives the loss, logp and metrics."""
    c = {**BASE, "layout": "packed"}
    d = build(c)
    kw = {"cu_seqlens": torch.tensor(d["offs"], device=device), "ref_logp": d["ref_lp"].float().to(device),
          "bias": d["bias"].float().to(device), "return_entropy": True, **kwargs_of(c)}
    args = tuple(t.to(device) for t in (d["hid"].float(), d["w"].float(), d["ids"], d["old"].float(),
                                        d["adv"].float()))
    with torch.no_grad():
        tri = linear_policy_loss(*args, backend="triton", **with_config(kw))
        tor = linear_policy_loss(*args, backend="torch", **with_config(kw))
    assert not tri.loss.requires_grad
    torch.testing.assert_close(tri.loss, tor.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tri.logp, tor.logp, rtol=1e-5, atol=1e-6)
    for k in tor.metrics:
        torch.testing.assert_close(tri.metrics[k], tor.metrics[k], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------- fp16, host reads
def _fp16_case(device):
    """Token-mean's coefficient at N = 16,384 (``1/16384``, here as ``seq-mean-token-sum`` over 16,384 sequences) on
    64 tokens, V = 3000: ``coef·p`` of most vocabulary entries is below fp16's smallest subnormal (6e-8). The inputs
    are bf16 values inside fp16's normal range, exact in both dtypes, so the float64 reference sees the same."""
    g = torch.Generator().manual_seed(7)
    n, v, hd = 64, 3000, 32
    h = torch.randn(n, hd, generator=g, dtype=torch.float64).bfloat16().double()
    w = (torch.randn(v, hd, generator=g, dtype=torch.float64) / hd ** 0.5).bfloat16().double()
    ids = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g).double()
    old = (torch.log_softmax(h @ w.T, -1).gather(1, ids[:, None])[:, 0]
           + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).float().double()
    kw = {"cu_seqlens": torch.tensor([0, n], device=device), "loss_agg_mode": "seq-mean-token-sum",
          "global_batch_size": 16384.0}
    return h, w, ids, old, adv, kw


@pytest.mark.parametrize("chunk, entropy", [(None, 0.0), (16, 0.01)], ids=["one-chunk", "chunks-entropy"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_gradients_as_accurate_as_bf16(device, backend, chunk, entropy, monkeypatch):
    """Issue 22: fp16's ``G`` used to be written into the fp16 tile as is and underflowed (grad_hidden 11× bf16's
    error here, 11% of grad_weight exactly 0); with the power-of-two scaling both gradients are within 2× bf16's
    relative error (norm-wise, against float64), in one chunk and in chunks of 16 tokens (grad_weight summed in fp32)
    with an entropy bonus."""
    h, w, ids, old, adv, kw = _fp16_case(device)
    kw["entropy_coeff"] = entropy
    if chunk is not None:
        monkeypatch.setattr(TUNING, "policy_loss_token_chunk", chunk)
        # as a chunk size set through the environment (D152)
        monkeypatch.setattr(TUNING, "user_set", frozenset({"policy_loss_token_chunk"}))
        monkeypatch.setattr(TUNING, "policy_loss_triton_tile_bytes", chunk * w.shape[0] * 2)

    def grads(dtype, be):
        hh = h.to(device, dtype).clone().requires_grad_(True)
        ww = w.to(device, dtype).clone().requires_grad_(True)
        lo = torch.float64 if dtype == torch.float64 else torch.float32
        out = linear_policy_loss(hh, ww, ids.to(device), old.to(device, lo), adv.to(device, lo), backend=be,
                                 **with_config(kw))
        out.loss.backward()
        return hh.grad.double().cpu(), ww.grad.double().cpu()

    truth = grads(torch.float64, "torch")
    err = {}
    for dtype in (torch.float16, torch.bfloat16):
        got = grads(dtype, backend)
        err[dtype] = [float((x - t).norm() / t.norm()) for x, t in zip(got, truth, strict=True)]
        assert all(torch.isfinite(x).all() for x in got)
    for i, name in enumerate(("grad_hidden", "grad_weight")):
        assert err[torch.float16][i] <= 2 * err[torch.bfloat16][i], (name, err)


def test_fp16_scaling_keeps_large_gradients_finite(device):
    """The other side of the scaling: an aggregation weight that puts the largest gradient entry at 2e4 (fp16's
    largest finite value is 65504), where the scale must go below 1; nothing overflows and both paths stay within
    fp16's accuracy of the float64 gradients."""
    g = torch.Generator().manual_seed(3)
    n, v, hd = 40, 5, 8
    h, w = torch.randn(n, hd, generator=g).half(), torch.randn(v, hd, generator=g).half()
    ids = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g) * 100

    def grads(dtype, be, dev, gbs):
        hh, ww = h.to(dev, dtype).clone().requires_grad_(True), w.to(dev, dtype).clone().requires_grad_(True)
        lo = torch.float64 if dtype == torch.float64 else torch.float32
        linear_policy_loss(hh, ww, ids.to(dev), None, adv.to(dev, lo), cu_seqlens=torch.tensor([0, n], device=dev),
                           config=PolicyLossConfig(loss_agg_mode="seq-mean-token-sum", global_batch_size=gbs),
                           backend=be).loss.backward()
        return hh.grad.double().cpu(), ww.grad.double().cpu()

    gbs = max(float(x.abs().max()) for x in grads(torch.float64, "torch", "cpu", 1.0)) / 2e4
    truth = grads(torch.float64, "torch", "cpu", gbs)
    assert 1.9e4 < max(float(x.abs().max()) for x in truth) < 2.1e4
    for be in ("torch", "triton"):
        for x, t in zip(grads(torch.float16, be, device, gbs), truth, strict=True):
            assert torch.isfinite(x).all(), be
            assert float((x - t).norm() / t.norm()) < 5e-3, be


class HostReads(TorchFunctionMode):
    """Counts the calls that read tensor values on the host (a device sync on CUDA) while ``phase`` is set: ``bool``/
    ``int``/``float``/``index`` of a tensor, ``item``, ``tolist``, ``cpu``, ``numpy``, ``nonzero``, ``argwhere``,
    ``masked_select``, ``unique``, ``index_put`` with a bool mask, ``repeat_interleave`` without ``output_size``,
    from any Python code but Triton's own (its interpreter emulates the GPU on the host); and, as a
    ``TorchFunctionMode``, indexing with a bool mask (a data-dependent shape) outside custom ops.

    The reads are counted by patching the ``torch.Tensor`` methods and ``torch`` functions: a ``TorchFunctionMode``
    does not see the calls made inside a ``torch.library`` custom op's implementation, nor in the autograd backward
    (checked on torch 2.13: ``bool(valid.all())`` in the op and the backward's ``bool(g == 1)`` went uncounted).
    ``__getitem__``/``__setitem__`` are left to the mode: a Python ``__getitem__`` set on the class, even once
    removed, leaves tensors passing ``PySequence_Check`` (``torch.tensor([t0, t1])`` of 0-d tensors then fails)."""

    METHODS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero",
               "argwhere", "masked_select", "unique", "index_put_", "index_put", "repeat_interleave")
    FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "repeat_interleave")

    def __init__(self):
        super().__init__()
        try:
            import triton

            self.skip = os.path.dirname(triton.__file__)
        except ImportError:
            self.skip = None
        self.phase, self.calls, self.saved = None, [], []

    @staticmethod
    def _counts(name, args, kwargs):
        def masked(x):
            items = x if isinstance(x, (tuple, list)) else (x,)
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)

        if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            return len(args) > 1 and masked(args[1])
        if name == "repeat_interleave":
            reps = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(reps, torch.Tensor) and reps.numel() > 1 and kwargs.get("output_size") is None
        return True

    def _record(self, name, args, kwargs, depth):
        if self.phase is not None and self._counts(name, args, kwargs):
            f = sys._getframe(depth)
            if self.skip is None or not f.f_code.co_filename.startswith(self.skip):
                self.calls.append((self.phase, name, f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("__getitem__", "__setitem__"):
            self._record(name, args, kwargs, 2)
        return func(*args, **kwargs)

    def __enter__(self):
        def wrap(orig, name):
            def counted(*args, **kwargs):
                self._record(name, args, kwargs, 2)
                return orig(*args, **kwargs)

            return counted

        for owner, names in ((torch.Tensor, self.METHODS), (torch, self.FUNCTIONS)):
            for name in names:
                self.saved.append((owner, name, owner.__dict__.get(name, None), name in owner.__dict__))
                setattr(owner, name, wrap(getattr(owner, name), name))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, orig, own in reversed(self.saved):
                if own:
                    setattr(owner, name, orig)
                else:  # inherited from the C base: remove the override (a setattr would leave a generic slot)
                    delattr(owner, name)
            self.saved.clear()

    def set(self, phase):
        self.phase = phase

    def of(self, phase):
        return [c for c in self.calls if c[0] == phase]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_check_ids_false_reads_nothing_on_the_host(device, backend, layout, dtype):
    """Issue 22: ``check_ids=False`` makes no host read in the forward or the backward, on both layouts and both
    paths (with NaN hidden states and out-of-range ids at the masked positions of the padded layout), and gives the
    default path's results; the default path's reads are counted (the counter works)."""
    c = {**BASE, "layout": layout, "lengths": [5, 0, 4, 3], "chunk": 3}
    d = build(c)
    if dtype == torch.float16:
        for x in ("hid", "w", "bias"):
            d[x] = d[x].half().double()
    with HostReads() as reads:
        out_c, grads_c, flat = run_op(c, d, dtype, device=device, backend=backend, phase=reads.set)
    assert any(where.endswith(" in _flat") for *_, where in reads.of("forward")), \
        "the counter must see the default path's reads inside the custom op (its compaction)"
    if device.type == "cpu" and dtype != torch.float16:  # the backward's seed-of-1 test reads a CPU scalar (never a
        assert reads.of("backward"), "the counter must see calls in the backward"  # CUDA one; fp16 never: D171)
    with HostReads() as reads:
        out, grads, _ = run_op(c, d, dtype, device=device, backend=backend, check_ids=False, phase=reads.set)
    assert reads.calls == [], reads.calls
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-5}
    for x, y in zip([out.loss, flat(out.logp), flat(out.entropy), *grads],
                    [out_c.loss, flat(out_c.logp), flat(out_c.entropy), *grads_c], strict=True):
        torch.testing.assert_close(x, y, **tol)
    for key in out_c.metrics:
        torch.testing.assert_close(out.metrics[key], out_c.metrics[key], rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:  # (fp16: the default path's results, compared above, are test_low_precision's)
        check(c, d, out, [g.cpu() for g in grads], lambda x: flat(x).cpu())


def test_check_ids_false_runs_under_cuda_sync_debug_mode(device):
    """On CUDA, the sync-free forward and backward (not the test's own copies of the inputs to the device) run under
    ``torch.cuda.set_sync_debug_mode("error")``, where a synchronising call raises; elsewhere the same call without
    it."""
    c = {**BASE, "layout": "padded", "chunk": 3}
    d = build(c)
    backend = "triton" if device.type == "cuda" else "torch"
    cuda = device.type == "cuda"
    prev = torch.cuda.get_sync_debug_mode() if cuda else None

    def phase(name):
        if cuda:
            torch.cuda.set_sync_debug_mode("error" if name is not None else prev)

    try:
        out, grads, flat = run_op(c, d, torch.float32, device=device, backend=backend, check_ids=False, phase=phase)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(prev)
    check(c, d, out, [g.cpu() for g in grads], lambda x: flat(x).cpu())


def test_check_ids_false_gives_nan_for_an_out_of_range_id():
    """Without the check an id outside [0, V) at a valid token is not an error: the loss and gradients are NaN."""
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(11, 3, requires_grad=True)
    out = linear_policy_loss(h, w, torch.tensor([0, 11, 2, 3]), None, torch.ones(4), cu_seqlens=torch.tensor([0, 4]),
                             check_ids=False)
    out.loss.backward()
    assert torch.isnan(out.loss) and torch.isnan(w.grad).all()
    with pytest.raises(TypeError, match="`check_ids` must be a bool"):
        linear_policy_loss(h, w, torch.tensor([0, 1, 2, 3]), None, torch.ones(4), cu_seqlens=torch.tensor([0, 4]),
                           check_ids=1)


def test_triton_bf16_parity_with_the_torch_path_over_chunks(device):
    """bf16 on the Triton path in chunks of 4 tokens (4 chunks) against the torch path on the same device: both
    within 2× of each other's error against float64, and close elementwise."""
    c = {**BASE, "lengths": [5, 0, 4, 3, 4], "chunk": 4, "layout": "packed"}
    d = build(c)
    for x in ("hid", "w", "bias"):
        d[x] = d[x].bfloat16().double()
    assert int(d["keep"].sum()) > 2 * c["chunk"], "the case must take several chunks"
    tri, g_tri, _ = run_op(c, d, torch.bfloat16, device=device, backend="triton")
    tor, g_tor, _ = run_op(c, d, torch.bfloat16, device=device, backend="torch")
    _, _, _, _, g64, _ = reference(c, d, torch.float64)
    k = d["keep"]
    for name, a, b, t in zip(("gh", "gw", "gb"), g_tri, g_tor, g64, strict=True):
        a, b = a.double().cpu(), b.double().cpu()
        if name == "gh":
            a, b = a[k], b[k]
        e_a, e_b = float((a - t).norm() / t.norm()), float((b - t).norm() / t.norm())
        assert e_a <= 2 * e_b + 1e-3 and e_b <= 2 * e_a + 1e-3, (name, e_a, e_b)
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(t.abs().max()))
    torch.testing.assert_close(tri.loss, tor.loss, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(tri.logp, tor.logp, rtol=0, atol=1e-2)


@pytest.mark.parametrize("backend, n, v", [("triton", 8192, 8192), ("torch", 16384, 32000)])
def test_fp16_at_the_issue_shapes_on_cuda(device, backend, n, v):
    """Issue 22's reproducer shapes (H = 64, token-mean, ids uniform, old_logp ≈ −ln V): fp16 within 2× bf16's error
    against float64. CUDA only (``make gpu-check``): on the CPU the fp16 GEMMs and the interpreter take minutes (the
    CPU numbers are in docs/policy_loss.md)."""
    if device.type != "cuda":
        pytest.skip("issue-sized fp16 check: needs SRPO_TEST_DEVICE=cuda (the CPU measurement is in the docs)")
    g = torch.Generator().manual_seed(0)
    hd = 64
    h = torch.randn(n, hd, generator=g, dtype=torch.float64).bfloat16().double().to(device)
    w = (torch.randn(v, hd, generator=g, dtype=torch.float64) / hd ** 0.5).bfloat16().double().to(device)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    adv = torch.randn(n, generator=g).to(device)
    old = (-math.log(v) + 0.1 * torch.randn(n, generator=g)).to(device)
    cu = torch.tensor([0, n], device=device)

    def grads(dtype, be):
        hh, ww = h.to(dtype).clone().requires_grad_(True), w.to(dtype).clone().requires_grad_(True)
        lo = torch.float64 if dtype == torch.float64 else torch.float32
        linear_policy_loss(hh, ww, ids, old.to(lo), adv.to(lo), cu_seqlens=cu, backend=be).loss.backward()
        return hh.grad.double(), ww.grad.double()

    truth = grads(torch.float64, "torch")
    err = {dt: [float((x - t).norm() / t.norm()) for x, t in zip(grads(dt, backend), truth, strict=True)]
           for dt in (torch.float16, torch.bfloat16)}
    assert all(a <= 2 * b for a, b in zip(err[torch.float16], err[torch.bfloat16], strict=True)), err


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_loss_scale_recovers_subnormal_gradients(device, backend):
    """A GradScaler seed (2^16) on fp16 gradients that a seed of 1 rounds into fp16's subnormals (grad_hidden mostly
    below 6.1e-5 here): the stored gradients carry a power-of-two scale applied with the seed (D171), so
    ``grad / seed`` is as accurate as fp16's normal range allows, several times better than with a seed of 1."""
    h, w, ids, old, adv, kw = _fp16_case(device)

    def grads(dtype, seed):
        hh = h.to(device, dtype).clone().requires_grad_(True)
        ww = w.to(device, dtype).clone().requires_grad_(True)
        lo = torch.float64 if dtype == torch.float64 else torch.float32
        out = linear_policy_loss(hh, ww, ids.to(device), old.to(device, lo), adv.to(device, lo),
                                 backend="torch" if dtype == torch.float64 else backend, **with_config(kw))
        (out.loss * seed).backward()
        return [x.double().cpu() / seed for x in (hh.grad, ww.grad)]

    truth = grads(torch.float64, 1.0)
    assert float((truth[0].abs() < 6.1e-5).double().mean()) > 0.9, "grad_hidden must lie in fp16's subnormals"
    err = {seed: [float((x - t).norm() / t.norm()) for x, t in zip(grads(torch.float16, seed), truth, strict=True)]
           for seed in (1.0, 65536.0)}
    assert err[65536.0][0] <= err[1.0][0] / 3, err
    assert err[65536.0][1] <= err[1.0][1], err


# ------------------------------------------------------------ CUDA's rule for a 0-dim device operand (fix_pl review)
_CUDA_RULE_METHODS = ("mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__",
                      "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__isub__",
                      "addcmul", "addcmul_")
_CUDA_RULE_FUNCTIONS = ("mul", "div", "add", "sub", "addcmul")


def _cuda_scalar_rule(fn, hits):
    """``fn`` as CUDA computes it: a 0-dim operand that is not a CPU scalar (on CPU: any 0-dim tensor) joining
    dimensioned tensors of the same category is cast to their common dtype before the kernel reads it; only a CPU
    scalar is read in the computation dtype (opmath). So an fp32 factor times an fp16 tensor is rounded to fp16."""
    def wrapped(*args, **kwargs):
        ts = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        dims = [x for x in ts if x.dim() > 0]
        if dims and all(x.is_floating_point() for x in ts):
            common = dims[0].dtype
            for x in dims[1:]:
                common = torch.promote_types(common, x.dtype)
            on_cpu = dims[0].device.type == "cpu"

            def cast(x):
                if isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype != common and (
                        on_cpu or x.device.type != "cpu"):
                    hits.append((x.dtype, common))
                    return x.to(common)
                return x
            args = tuple(cast(x) for x in args)
            kwargs = {k: cast(x) for k, x in kwargs.items()}
        return fn(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("chunk", [None, 16], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision_gradients_under_cudas_scalar_rule(device, backend, chunk, monkeypatch):
    """On CUDA a 0-dim *device* fp32 factor (the backward's ``seed·inv``, GEMM 3's ``R``) multiplying an fp16/bf16
    tensor is rounded to fp16/bf16 first: below 2^-24 it is 0 in fp16 (every grad_hidden entry was 0 here), in bf16
    the seed 1/3 became 0.334. With that rule emulated (every 0-dim operand cast to the low-precision dtype), the
    fp16 and bf16 gradients are bit for bit those computed without it, and fp16 stays within 2× bf16's error of the
    float64 gradients."""
    h, w, ids, old, adv, kw = _fp16_case(device)
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64).bfloat16().double()
    if chunk is not None:
        monkeypatch.setattr(TUNING, "policy_loss_token_chunk", chunk)
        monkeypatch.setattr(TUNING, "user_set", frozenset({"policy_loss_token_chunk"}))
        monkeypatch.setattr(TUNING, "policy_loss_triton_tile_bytes", chunk * w.shape[0] * 2)
    hits = []

    def grads(dtype, seed, emulate):
        hh, ww, bb = (x.to(device, dtype).clone().requires_grad_(True) for x in (h, w, bias))
        lo = torch.float64 if dtype == torch.float64 else torch.float32
        with monkeypatch.context() as m:
            if emulate:
                for name in _CUDA_RULE_METHODS:
                    m.setattr(torch.Tensor, name, _cuda_scalar_rule(getattr(torch.Tensor, name), hits))
                for name in _CUDA_RULE_FUNCTIONS:
                    m.setattr(torch, name, _cuda_scalar_rule(getattr(torch, name), hits))
            out = linear_policy_loss(hh, ww, ids.to(device), old.to(device, lo), adv.to(device, lo), bias=bb,
                                     backend="torch" if dtype == torch.float64 else backend, **with_config(kw))
            (out.loss * seed).backward()
        return [x.grad.double().cpu() / seed for x in (hh, ww, bb)]

    truth = grads(torch.float64, 1.0, False)
    err = {}
    for dtype, seed in ((torch.float16, 1.0), (torch.float16, 65536.0), (torch.bfloat16, 1 / 3)):
        plain = grads(dtype, seed, False)
        emulated = grads(dtype, seed, True)
        for name, x, y in zip(("grad_hidden", "grad_weight", "grad_bias"), emulated, plain, strict=True):
            assert torch.equal(x, y), (dtype, seed, name, float((x - y).abs().max()))
        err[dtype] = [float((x - t).norm() / t.norm()) for x, t in zip(emulated, truth, strict=True)]
    probe = _cuda_scalar_rule(torch.Tensor.mul_, hits)  # the emulation itself does what CUDA does
    ones = torch.ones(2, dtype=torch.float16, device=device)
    assert float(probe(ones, torch.tensor(2.0 ** -30, device=device))[0]) == 0
    assert all(a <= 2 * b for a, b in zip(err[torch.float16], err[torch.bfloat16], strict=True)), err


@pytest.mark.parametrize("chunk", [None, 64], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_grad_weight_with_an_outlier_hidden_column(device, backend, chunk, monkeypatch):
    """One hidden column 4096× the others (an outlier feature): GEMM 3's ``h`` is scaled per column (D206), so the
    other columns' grad_weight stays clear of fp16's subnormals, within half bf16's error of float64 (one ``R`` for
    all columns gave 2.6× (torch) and 5.8× (Triton) bf16's error here), in one chunk (grad_weight stored with a
    factor per column) and in chunks (summed in fp32)."""
    g = torch.Generator().manual_seed(0)
    n, v, hd = 256, 256, 64
    h = torch.randn(n, hd, generator=g, dtype=torch.float64).half().double()
    h[:, 0] *= 4096
    w = (torch.randn(v, hd, generator=g, dtype=torch.float64) / hd ** 0.5).half().double()
    ids = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    if chunk is not None:
        monkeypatch.setattr(TUNING, "policy_loss_token_chunk", chunk)
        monkeypatch.setattr(TUNING, "user_set", frozenset({"policy_loss_token_chunk"}))
        monkeypatch.setattr(TUNING, "policy_loss_triton_tile_bytes", chunk * v * 2)

    def grad_weight(dtype, be):
        ww = w.to(device, dtype).clone().requires_grad_(True)
        lo = torch.float64 if dtype == torch.float64 else torch.float32
        out = linear_policy_loss(h.to(device, dtype), ww, ids.to(device), None, adv.to(device, lo), backend=be,
                                 cu_seqlens=torch.tensor([0, n], device=device))
        out.loss.backward()
        return ww.grad.double().cpu()[:, 1:]

    truth = grad_weight(torch.float64, "torch")
    err = {dt: float((grad_weight(dt, backend) - truth).norm() / truth.norm())
           for dt in (torch.float16, torch.bfloat16)}
    assert err[torch.float16] <= err[torch.bfloat16] / 2, err


@pytest.mark.parametrize("name, value", [("epsilon_high", 0.28), ("beta", 0.1), ("loss_agg_mode", "token-mean"),
                                         ("temperature", 0.7)])
def test_a_loss_keyword_of_the_previous_release_points_to_the_config(name, value):
    h, w, ids, old, adv = _args()
    with pytest.raises(TypeError, match=rf"`{name}` is now a field .*config=PolicyLossConfig\({name}=\.\.\.\)"):
        linear_policy_loss(h, w, ids, old, adv, cu_seqlens=torch.tensor([0, 4]), **{name: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        linear_policy_loss(h, w, ids, old, adv, cu_seqlens=torch.tensor([0, 4]), epsilon=0.2)
    with pytest.raises(TypeError, match="`config` must be a srpo_core.PolicyLossConfig, got dict"):
        linear_policy_loss(h, w, ids, old, adv, cu_seqlens=torch.tensor([0, 4]), config={name: value})


@pytest.mark.parametrize("fields, error, match", [
    ({"epsilon_low": -0.1}, ValueError, "`epsilon_low` must be >= 0, got -0.1"),
    ({"epsilon_high": float("nan")}, TypeError, "`epsilon_high` must be a finite float, got nan"),
    ({"beta": "0.1"}, TypeError, "`beta` must be a finite float, got '0.1'"),
    ({"entropy_coeff": True}, TypeError, "`entropy_coeff` must be a finite float, got True"),
    ({"global_batch_size": 0}, ValueError, "`global_batch_size` must be > 0, got 0"),
    ({"loss_scale_factor": -2.0}, ValueError, "`loss_scale_factor` must be > 0, got -2.0"),
    ({"kl_ratio_correction": 1}, TypeError, "`kl_ratio_correction` must be a bool, got 1"),
])
def test_policy_loss_config_names_the_bad_field(fields, error, match):
    with pytest.raises(error, match=f"PolicyLossConfig: {match}"):
        PolicyLossConfig(**fields)


@pytest.mark.parametrize("check_ids", [True, False])
def test_reference_backend_is_the_reference(check_ids):
    """``backend="reference"`` runs the materialised-logits math: the same loss, gradients, logp and metrics as the
    fused path within fp32 rounding, and the entropy only when asked for."""
    c = {**BASE, "kl": "k3", "entropy_coeff": 0.01, "return_entropy": True, "bias": True}
    d = build(c)
    outs = {}
    for backend in ("torch", "reference"):
        h, w, bias = (d[x].float().requires_grad_(True) for x in ("hid", "w", "bias"))
        out = linear_policy_loss(h, w, d["ids"].clamp(min=0), d["old"].float(), d["adv"].float(), bias=bias,
                                 ref_logp=d["ref_lp"].float(), cu_seqlens=torch.tensor(d["offs"]), backend=backend,
                                 return_entropy=True, check_ids=check_ids, **with_config(kwargs_of(c)))
        outs[backend] = (out, torch.autograd.grad(out.loss, (h, w, bias)))
    (a, ga), (b, gb) = outs["torch"], outs["reference"]
    assert b.loss.requires_grad and not b.logp.requires_grad and a.metrics.keys() == b.metrics.keys()
    for x, y in [(a.loss, b.loss), (a.logp, b.logp), (a.entropy, b.entropy), *zip(ga, gb, strict=True),
                 *((a.metrics[k], b.metrics[k]) for k in a.metrics)]:
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
