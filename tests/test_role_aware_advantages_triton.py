"""The role-weights Triton kernel (``kernels/role_aware_advantages.py``, two launches) under ``TRITON_INTERPRET=1``
against the float64 reference of SPEC steps 2-6, the SPEC properties on its output, the public op with
``backend="triton"``, determinism, and property 10 across two gloo ranks."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srpo_core import SRPOConfig, role_aware_advantages
from srpo_core._dispatch import interpreting
from srpo_core.kernels.role_aware_advantages import role_weights_triton
from srpo_core.reference.role_aware_advantages import RoleWeights
from srpo_core.reference.role_aware_advantages import role_weights as reference
from srpo_core.testing import assert_close

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
# Every test takes the `device` fixture (tests/conftest.py): the CPU under the interpreter, CUDA under `make gpu-check`.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # `device` is a constant: sharing it across examples is intended
CONFIGS = [SRPOConfig(), SRPOConfig(weight_map="linear", w_min=0.2), SRPOConfig(weight_map="sigmoid"),
           SRPOConfig(renorm="none"), SRPOConfig(standardize="none", u_max=1.5),
           SRPOConfig(beta_perception=1.3, beta_reasoning=0.0)]


@st.composite
def batches(draw, max_b=6, max_len=40):
    b = draw(st.integers(0, max_b))
    lens = draw(st.lists(st.integers(0, max_len), min_size=b, max_size=b))
    n = sum(lens)
    mix = draw(st.sampled_from(["mixed", "perception", "reasoning", "none"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    roles = {"mixed": torch.randint(0, 3, (n,), generator=g), "perception": torch.randint(0, 2, (n,), generator=g),
             "reasoning": 2 * torch.randint(0, 2, (n,), generator=g), "none": torch.zeros(n, dtype=torch.int64)}[mix]
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    signals = torch.randn(n, generator=g) * scale + draw(st.sampled_from([0.0, 3.0]))
    cu = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0)
    return torch.randn(b, generator=g), signals, roles, cu


def compare(adv, s, r, cu, config, device):
    got = role_weights_triton(adv.to(device), s.to(device), r.to(device), cu.to(device), config)
    want = reference(adv.double(), s.double(), r, cu, config)
    for name in ("advantages", "weights", "z", "baseline"):
        a = getattr(got, name)
        assert a.dtype == torch.float32, name
        assert bool(torch.isfinite(a).all()), f"{name}: a non-finite value (an unwritten, poisoned element?)"
        assert_close(a.cpu().double(), getattr(want, name), atol=1e-5, rtol=1e-5, name=name)
    count = want.role_stats[:, 0]
    assert torch.equal(got.role_stats[:, 0].cpu(), count)
    # μ and σ reduce up to n fp32 signals: the kernel's rounding grows with the signals' magnitude (|s| up to ~150
    # here) and a tree reduction's depth, not with μ itself (μ can be near 0 while |s| is large)
    s_max = max(1.0, float(s.abs().max()) if s.numel() else 0.0)
    eps_sum = torch.finfo(torch.float32).eps * s_max * math.ceil(math.log2(s.numel() + 1))
    for k_ in range(2):
        if count[k_] > 0:
            assert_close(got.role_stats[k_, 1:].cpu(), want.role_stats[k_, 1:], atol=1e-6 + eps_sum, rtol=1e-6,
                         name="mu, sigma")
    return got


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(batch=batches(), config=st.sampled_from(CONFIGS))
def test_kernel_matches_float64_reference(batch, config, device):
    compare(*batch, config, device)


@settings(max_examples=15, deadline=None, suppress_health_check=FIXTURE_OK)
@given(batch=batches(max_b=4, max_len=20), config=st.sampled_from(CONFIGS))
def test_properties_on_the_kernel_output(batch, config, device):
    adv, s, r, cu = batch
    on = [t.to(device) for t in batch]
    out = role_weights_triton(*on, config)
    got = RoleWeights(**{f.name: getattr(out, f.name).cpu() for f in dataclasses.fields(RoleWeights)
                         if getattr(out, f.name) is not None})  # clamped: None when the caller passes no flags
    seg = torch.repeat_interleave(torch.arange(adv.numel()), cu[1:] - cu[:-1])
    assert bool((got.weights > 0).all()) and bool(torch.isfinite(got.weights).all())  # property 1
    a_t = adv[seg]
    assert torch.equal(torch.sign(got.advantages), torch.sign(a_t))  # property 2
    if config.renorm == "mean":  # property 5
        n = (cu[1:] - cu[:-1]).double()
        mean = torch.zeros(adv.numel(), dtype=torch.float64).index_add_(0, seg, got.weights.double())
        nz = n > 0
        assert_close(mean[nz] / n[nz], torch.ones(int(nz.sum()), dtype=torch.float64), atol=0, rtol=1e-5)
    flat = role_weights_triton(*on, SRPOConfig(beta_perception=0.0, beta_reasoning=0.0, weight_map=config.weight_map))
    assert torch.equal(flat.advantages.cpu(), a_t)  # property 3: GRPO exactly


def test_long_trajectories_several_tiles(device):
    """Trajectories longer than a tile and tiles that straddle trajectories (launch 1 tiles ignore them)."""
    g = torch.Generator().manual_seed(1)
    lens = [2500, 0, 1, 1030, 3000]
    cu = torch.tensor([0, *lens]).cumsum(0)
    n = int(cu[-1])
    compare(torch.randn(5, generator=g), torch.randn(n, generator=g) * 4 + 1, torch.randint(0, 3, (n,), generator=g),
            cu, SRPOConfig(), device)


def test_constant_role_gives_sigma_zero_and_unit_weights(device):
    s = torch.full((12,), 0.37, device=device)
    r = torch.tensor([1] * 12, device=device)
    got = role_weights_triton(torch.tensor([2.0, -1.0], device=device), s, r, torch.tensor([0, 5, 12], device=device),
                              SRPOConfig())
    assert float(got.role_stats[0, 2]) == 0.0
    assert torch.equal(got.z.cpu(), torch.zeros(12)) and torch.equal(got.weights.cpu(), torch.ones(12))


def test_empty_batch(device):
    # float64 no longer reaches the launcher: the public entry refuses it for backend="triton" and sends "auto" to
    # the CPU path (tests/test_role_aware_advantages.py).
    got = role_weights_triton(torch.zeros(0, device=device), torch.zeros(0, device=device),
                              torch.zeros(0, dtype=torch.int64, device=device),
                              torch.zeros(1, dtype=torch.int64, device=device), SRPOConfig())
    assert got.advantages.shape == (0,) and got.baseline.shape == (0,)


def test_deterministic(device):
    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 700, 1500, 1501])
    args = (torch.randn(3, generator=g), torch.randn(1501, generator=g), torch.randint(0, 3, (1501,), generator=g), cu)
    args = tuple(t.to(device) for t in args)
    a, b = role_weights_triton(*args, SRPOConfig()), role_weights_triton(*args, SRPOConfig())
    for name in ("advantages", "weights", "z", "baseline", "role_stats"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_public_op_with_backend_triton(layout, device):
    g = torch.Generator().manual_seed(9)
    b, t = 4, 30
    mask = torch.rand(b, t, generator=g) < 0.8
    lp, lc, la = (-(torch.rand(b, t, generator=g) * 3) for _ in range(3))
    roles = torch.randint(0, 3, (b, t), generator=g)
    adv = torch.randn(b, generator=g)
    if layout == "packed":
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
        args, kw = (adv, lp[mask], lc[mask], la[mask], roles[mask]), {"cu_seqlens": cu}
    else:
        args, kw = (adv, lp, lc, la, roles), {"mask": mask}
    args, kw = tuple(t.to(device) for t in args), {k: v.to(device) for k, v in kw.items()}
    tri = role_aware_advantages(*args, **kw, backend="triton")
    ref = role_aware_advantages(*args, **kw, backend="reference")
    for name in ("advantages", "weights", "signals", "baseline"):
        assert_close(getattr(tri, name), getattr(ref, name), atol=2e-6, rtol=2e-6, name=name)
    for key, value in ref.stats.items():
        both_nan = value != value and tri.stats[key] != tri.stats[key]
        assert both_nan or abs(tri.stats[key] - value) <= 1e-5 * (1 + abs(value)), key


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_property10_across_two_ranks_with_the_kernel(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "OMP_NUM_THREADS": "1"}
    worker = pathlib.Path(__file__).with_name("dist_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(port), "16", "triton"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert "property10: OK 16" in proc.stdout
