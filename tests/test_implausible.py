"""Implausible inputs (issue 25): a log-prob above 0 where it is read is accepted, with one warning per argument that
names it, how many positions and the largest value (D191). Rounding above 0 and garbage where nothing is read stay
silent."""

from __future__ import annotations

import warnings

import pytest
import torch

from srpo_core import ImplausibleInputWarning, role_aware_advantages
from srpo_core._validate import _WARNED, logprob_tolerance
from srpo_core.presets import vppo_advantages


@pytest.fixture(autouse=True)
def fresh_warnings():
    _WARNED.clear()
    yield
    _WARNED.clear()


def batch(device, layout="padded"):
    """Three responses of 5 tokens: roles P R O P R / R R P O O / P P P P P, log-probs in [-3, -0.1]."""
    roles = torch.tensor([[1, 2, 0, 1, 2], [2, 2, 1, 0, 0], [1, 1, 1, 1, 1]], device=device)
    g = torch.Generator().manual_seed(0)
    lp, lc, la = (-(0.1 + 2.9 * torch.rand(3, 5, generator=g)).to(device) for _ in range(3))
    mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    mask[1, 3:] = False
    kw = {"advantages": torch.tensor([1.0, -0.5, 0.25], device=device), "logp": lp, "logp_corrupt": lc,
          "logp_ablated": la, "roles": roles, "mask": mask}
    if layout == "packed":
        kw = {k: (v if k == "advantages" else v[mask]) for k, v in kw.items() if k != "mask"}
        kw["cu_seqlens"] = torch.tensor([0, 5, 8, 13], device=device)
    return kw


def implausible(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ImplausibleInputWarning)]


def run(fn, **kw) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn(**kw)
    return implausible(record)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_positive_logp_warns_once(device, backend, layout):
    kw = batch(device, layout)
    at = (0, 0) if layout == "padded" else (0,)
    kw["logp"][at] = 5.0  # a perception token
    kw["logp"][(0, 1) if layout == "padded" else (1,)] = 0.5  # a reasoning token
    messages = run(role_aware_advantages, **kw, backend=backend)
    assert len(messages) == 1, messages
    for fragment in ("role_aware_advantages", "`logp`", "2 value(s) above 0", "largest +5", "log-probability is <= 0"):
        assert fragment in messages[0], (fragment, messages[0])
    assert run(role_aware_advantages, **kw, backend=backend) == []  # once per argument


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_each_argument_named(device, backend):
    kw = batch(device)
    kw["logp_corrupt"][2, 4] = 3.0  # perception: read
    kw["logp_ablated"][0, 1] = 2.0  # reasoning: read
    messages = run(role_aware_advantages, **kw, backend=backend)
    assert len(messages) == 2, messages
    assert "`logp_corrupt` has 1 value(s) above 0" in messages[0] and "largest +3" in messages[0]
    assert "`logp_ablated` has 1 value(s) above 0" in messages[1] and "largest +2" in messages[1]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_positive_where_not_read_is_silent(device, backend):
    kw = batch(device)
    kw["logp"][1, 4] = 5.0  # outside the mask
    kw["logp"][0, 2] = 5.0  # role OTHER
    kw["logp_corrupt"][0, 1] = 5.0  # a reasoning token: logp_corrupt is read at perception tokens only
    kw["logp_ablated"][0, 0] = 5.0  # a perception token: logp_ablated is read at reasoning tokens only
    assert run(role_aware_advantages, **kw, backend=backend) == []


def test_replaced_by_precomputed_signal_is_silent(device):
    kw = batch(device)
    kw["logp_corrupt"][0, 0] = 5.0
    kw["perception_signal"] = torch.rand(3, 5, device=device)
    assert run(role_aware_advantages, **kw) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rounding_above_zero_is_silent(device, dtype):
    kw = batch(device)
    kw["logp"] = kw["logp"].to(dtype)
    kw["logp"][0, 0] = logprob_tolerance(dtype) / 2  # what a log_softmax may round to
    assert run(role_aware_advantages, **kw) == []
    kw["logp"][0, 0] = 5.0
    assert len(run(role_aware_advantages, **kw)) == 1


def test_result_unchanged_by_the_check(device):
    kw = batch(device)
    kw["logp"][0, 0] = 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = role_aware_advantages(**kw)
    second = role_aware_advantages(**kw)  # already warned: the check is skipped
    assert torch.equal(first.advantages, second.advantages) and first.stats == second.stats
    assert first.stats["perception/count"] == 8 and first.stats["reasoning/count"] == 4


def test_warning_points_at_the_caller(device):
    kw = batch(device)
    kw["logp"][0, 0] = 5.0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        role_aware_advantages(**kw)
    (w,) = [w for w in record if issubclass(w.category, ImplausibleInputWarning)]
    assert w.filename == __file__


def test_vppo_positive_logp_warns_once(device):
    kw = batch(device)
    kw = {k: kw[k] for k in ("advantages", "logp", "logp_corrupt", "mask")}
    kw["logp_corrupt"][1, 4] = 9.0  # outside the mask: not read
    assert run(vppo_advantages, **kw) == []
    kw["logp_corrupt"][2, 2] = 4.0
    messages = run(vppo_advantages, **kw)
    assert len(messages) == 1 and "`logp_corrupt` has 1 value(s) above 0" in messages[0] and "+4" in messages[0]
    assert run(vppo_advantages, **kw) == []
