"""The one entry of ``role_aware_advantages`` (``srpo_core/ops/role_aware_advantages.py``): each backend runs exactly
one path (``"torch"`` the CPU path, ``"reference"`` the reference, ``"triton"`` the kernel path), the calls a fast
path does not take are routed to the reference by the entry, float64 never reaches the kernel, the CPU path never
hands a batch back, and the moved public names say where they went."""

from __future__ import annotations

import pytest
import torch

from srpo_core import SRPOConfig, role_aware_advantages
from srpo_core._dispatch import interpreting
from srpo_core.cpu import role_aware_advantages as cpu
from srpo_core.reference import role_aware_advantages as reference
from srpo_core.testing import assert_close

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                  reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")


def batch(device="cpu", dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 9
    kw = {"advantages": torch.randn(b, generator=g, dtype=dtype),
          "logp": -torch.rand(b, t, generator=g, dtype=dtype) * 3,
          "logp_corrupt": -torch.rand(b, t, generator=g, dtype=dtype) * 3,
          "logp_ablated": -torch.rand(b, t, generator=g, dtype=dtype) * 3,
          "roles": torch.randint(0, 3, (b, t), generator=g),
          "mask": torch.rand(b, t, generator=g) < 0.8}
    return {k: v.to(device) for k, v in kw.items()}


def spy(monkeypatch, module, name) -> list:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))
    return calls


@pytest.mark.parametrize("backend,path", [("torch", "cpu"), ("reference", "reference"), ("auto", "cpu")])
def test_each_backend_runs_one_path(monkeypatch, backend, path):
    cpu_calls = spy(monkeypatch, cpu, "role_aware_advantages_cpu")
    ref_calls = spy(monkeypatch, reference, "role_aware_advantages")
    out = role_aware_advantages(**batch(), backend=backend)
    assert (len(cpu_calls), len(ref_calls)) == ((1, 0) if path == "cpu" else (0, 1))
    assert_close(out.advantages, role_aware_advantages(**batch(), backend="reference").advantages, atol=1e-6,
                 rtol=1e-6, name="advantages")


@pytest.mark.parametrize("layout", ["empty", "no_tokens"])
def test_batches_the_cpu_path_does_not_take_go_to_the_reference(monkeypatch, layout):
    cpu_calls = spy(monkeypatch, cpu, "role_aware_advantages_cpu")
    ref_calls = spy(monkeypatch, reference, "role_aware_advantages")
    kw = batch()
    if layout == "empty":
        kw = {k: v[:0] for k, v in kw.items()}
    else:
        kw["mask"][:] = False
    out = role_aware_advantages(**kw, backend="torch")
    assert (cpu_calls, ref_calls) == ([], ["role_aware_advantages"])
    assert out.weights.shape == kw["logp"].shape and not bool(out.weights.any())


def test_cpu_path_raises_instead_of_handing_back(monkeypatch):
    """An invalid value makes the CPU path raise (never return None), and the entry reports the detailed error."""
    kw = batch()
    at = tuple(int(i) for i in torch.nonzero(kw["mask"] & (kw["roles"] == 1))[0])
    kw["logp_corrupt"][at] = float("nan")
    lengths = kw["mask"].sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    with pytest.raises(cpu.InvalidValues):
        cpu.role_aware_advantages_cpu(kw["advantages"], kw["logp"], kw["logp_corrupt"], kw["logp_ablated"],
                                      kw["roles"], None, None, mask=kw["mask"], cu=cu, max_len=int(lengths.max()),
                                      config=SRPOConfig(), group=None, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"`logp_corrupt` has 1 NaN/\+inf value\(s\) at valid perception positions; "
                                         rf"first at index \({at[0]}, {at[1]}\)"):
        role_aware_advantages(**kw, backend="torch")


@needs_triton
@pytest.mark.parametrize("name", ["advantages", "logp", "logp_ablated"])
def test_float64_with_backend_triton_raises(device, name):
    kw = batch(device)
    kw[name] = kw[name].double()
    with pytest.raises(TypeError, match=rf"role_aware_advantages: backend='triton' takes fp32/bf16/fp16 inputs, got "
                                        rf".*`{name}` torch.float64"):
        role_aware_advantages(**kw, backend="triton")


def test_float64_auto_takes_the_cpu_path(monkeypatch, device):
    cpu_calls = spy(monkeypatch, cpu, "role_aware_advantages_cpu")
    kw = batch(device, dtype=torch.float64)
    out = role_aware_advantages(**kw)
    assert cpu_calls == ["role_aware_advantages_cpu"] and out.advantages.dtype == torch.float64
    want = role_aware_advantages(**kw, backend="reference")
    assert_close(out.advantages, want.advantages, atol=1e-12, rtol=1e-12, name="advantages")


@needs_triton
def test_unclamped_with_backend_triton_takes_the_reference(monkeypatch, device):
    ref_calls = spy(monkeypatch, reference, "role_aware_advantages")
    kw = batch(device)
    config = SRPOConfig(role_stats="unclamped", clamp=1.0)
    out = role_aware_advantages(**kw, config=config, backend="triton")
    assert ref_calls == ["role_aware_advantages"]
    assert out.stats == role_aware_advantages(**kw, config=config, backend="reference").stats


@needs_triton
def test_backend_triton_runs_the_kernel_path(monkeypatch, device):
    from srpo_core.kernels import role_aware_advantages as kernel

    calls = spy(monkeypatch, kernel, "role_aware_advantages_triton")
    ref_calls = spy(monkeypatch, reference, "role_aware_advantages")
    cpu_calls = spy(monkeypatch, cpu, "role_aware_advantages_cpu")
    role_aware_advantages(**batch(device), backend="triton")
    assert (calls, ref_calls, cpu_calls) == (["role_aware_advantages_triton"], [], [])


@pytest.mark.parametrize("name", ["role_aware_advantages", "RoleAwareAdvantages"])
def test_moved_names_point_to_the_new_place(name):
    import srpo_core.advantages

    with pytest.raises(ImportError, match=rf"srpo_core.advantages.{name} moved to srpo_core.ops.role_aware_advantages"):
        exec(f"from srpo_core.advantages import {name}", {})
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        srpo_core.advantages.nothing_here  # noqa: B018
