"""backend="reference": each log-prob op runs its reference (srpo_core/reference/X.py) and nothing else."""

from __future__ import annotations

import pytest
import torch

import srpo_core.ops.linear_token_contrast as ops_linear_contrast
import srpo_core.ops.linear_token_logprobs as ops_linear_logprobs
import srpo_core.ops.token_contrast as ops_contrast
import srpo_core.ops.token_logprobs as ops_logprobs
from srpo_core import linear_token_contrast, linear_token_logprobs, token_contrast, token_logprobs
from srpo_core.reference import linear_token_contrast as ref_linear_contrast
from srpo_core.reference import linear_token_logprobs as ref_linear_logprobs
from srpo_core.reference import token_contrast as ref_contrast
from srpo_core.reference import token_logprobs as ref_logprobs


def _forbid(monkeypatch, module, *names):
    def boom(*a, **k):
        raise AssertionError("backend='reference' ran a fast path")

    for name in names:
        monkeypatch.setattr(module, name, boom)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_token_logprobs_reference(monkeypatch, dtype):
    _forbid(monkeypatch, ops_logprobs, "_torch_fwd", "_torch_bwd")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 17, generator=g) * 3).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 17, (2, 5), generator=g)
    ids[0, 1] = -100
    lp, ent, lse = token_logprobs(x, ids, temperature=0.7, return_entropy=True, return_lse=True, backend="reference")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want_lp, want_ent = ref_logprobs.token_logprobs(x.detach().to(acc), ids, temperature=0.7, return_entropy=True)
    assert lp.dtype == acc and torch.equal(lp, want_lp) and torch.equal(ent, want_ent)
    want_lse = torch.logsumexp(x.detach().to(acc) / 0.7, -1)
    assert lse[0, 1] == 0 and torch.equal(lse[ids != -100], want_lse[ids != -100])
    (lp.sum() + ent.sum()).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    # [..., K] ids: each id scored against its row
    ids_k = torch.stack([ids, torch.zeros_like(ids)], -1)
    lp_k = token_logprobs(x.detach(), ids_k, temperature=0.7, backend="reference")
    assert torch.equal(lp_k[..., 0], want_lp)
    assert torch.equal(lp_k[..., 1], ref_logprobs.token_logprobs(x.detach().to(acc), torch.zeros_like(ids),
                                                                 temperature=0.7))


def test_token_contrast_reference(monkeypatch):
    _forbid(monkeypatch, ops_contrast, "_torch_path")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    ids = torch.tensor([0, 8, -100, 3])
    for kind in ("kl", "js"):
        out = token_contrast(x, y, ids, kind=kind, temperature=1.3, backend="reference")
        want = ref_contrast.token_contrast(x, y, ids, kind=kind, temperature=1.3)
        assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))


def test_linear_token_logprobs_reference(monkeypatch):
    _forbid(monkeypatch, ops_linear_logprobs, "_op", "_fwd", "_bwd")
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    w, b = torch.randn(11, 8, generator=g, requires_grad=True), torch.randn(11, generator=g)
    ids = torch.randint(0, 11, (2, 3), generator=g)
    ids[1, 2] = -100
    lp, ent = linear_token_logprobs(h, w, ids, bias=b, temperature=0.9, return_entropy=True, softcap=5.0,
                                    backend="reference")
    want_lp, want_ent = ref_linear_logprobs.linear_token_logprobs(h.detach().reshape(6, 8), w.detach(),
                                                                  ids.reshape(6), bias=b, temperature=0.9,
                                                                  return_entropy=True, softcap=5.0)
    assert torch.equal(lp, want_lp.view(2, 3)) and torch.equal(ent, want_ent.view(2, 3))
    lp.sum().backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_linear_token_contrast_reference(monkeypatch):
    _forbid(monkeypatch, ops_linear_contrast, "_contrast")
    g = torch.Generator().manual_seed(3)
    h, r, w = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(13, 8, generator=g)
    ids = torch.tensor([0, 12, -100, 4, 4])
    out = linear_token_contrast(h, r, w, ids, kind="js", backend="reference")
    want = ref_linear_contrast.linear_token_contrast(h, r, w, ids, kind="js")
    assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))


@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs", "linear_token_contrast"])
def test_reference_refuses_a_process_group(op):
    group = object()  # refused before any collective
    x, ids = torch.randn(3, 6), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=rf"{op}: backend='reference' computes one device's whole vocabulary"):
        if op == "token_logprobs":
            token_logprobs(x, ids, backend="reference", process_group=group)
        elif op == "linear_token_logprobs":
            linear_token_logprobs(x, torch.randn(5, 6), ids, backend="reference", process_group=group)
        else:
            linear_token_contrast(x, x, torch.randn(5, 6), ids, backend="reference", process_group=group)
