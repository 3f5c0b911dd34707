"""The fast path of ``role_aware_advantages`` (``backend="auto"`` on CPU, ``srpo_core/cpu/role_aware_advantages.py``)
against the reference (``backend="reference"``): every config variant, both layouts (right-padded, padded with holes
and left padding, packed with equal and unequal lengths), float32 and float64, eager and compiled, empty batches and
zero-length trajectories, and the same errors for invalid values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from srpo_core import SRPOConfig, role_aware_advantages
from srpo_core.common import chunked as _chunked
from srpo_core.cpu import role_aware_advantages as fast
from srpo_core.tuning import TUNING

CONFIGS = [
    SRPOConfig(),
    SRPOConfig(standardize="none", weight_map="linear", renorm="none", beta_perception=1.5, w_min=0.3),
    SRPOConfig(weight_map="sigmoid", perception_contrast="logratio", reasoning_contrast="k3", clamp=2.0,
               k3_max=0.5, eps=1e-3, u_max=1.0, beta_reasoning=2.0),
    SRPOConfig(weight_map="linear", renorm="mean", beta_perception=0.0, beta_reasoning=0.7),
    SRPOConfig(standardize="none", weight_map="exp", renorm="mean", perception_contrast="k3",
               reasoning_contrast="k3"),
]
LAYOUTS = ("right_padded", "holes", "left_padded", "packed_equal", "packed_unequal")


def make_batch(layout: str, *, b: int = 6, t: int = 11, dtype=torch.float32, signals: bool = False, seed: int = 0,
               neg_inf: bool = True) -> dict:
    """A batch in ``layout`` with garbage (NaN, ±inf, bad roles) wherever the SPEC never reads."""
    g = torch.Generator().manual_seed(seed)
    if layout in ("packed_equal",):
        lengths = torch.full((b,), t)
    else:
        lengths = torch.randint(0, t + 1, (b,), generator=g)
        lengths[0] = t
    pos = torch.arange(t)[None, :]
    if layout == "holes":
        mask = torch.rand(b, t, generator=g) < 0.7
    elif layout == "left_padded":
        mask = pos >= (t - lengths)[:, None]
    else:
        mask = pos < lengths[:, None]
    roles = torch.randint(0, 3, (b, t), generator=g)
    lp, lc, la = (-(torch.rand(b, t, generator=g, dtype=torch.float64) * 6).to(dtype) for _ in range(3))
    if neg_inf:
        lc[torch.rand(b, t, generator=g) < 0.05] = -float("inf")
    kw = {"advantages": torch.randn(b, generator=g, dtype=torch.float64).to(dtype), "logp": lp, "logp_corrupt": lc,
          "logp_ablated": la, "roles": roles}
    if signals:
        kw["perception_signal"] = torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype) * 3
        kw["reasoning_signal"] = torch.rand(b, t, generator=g, dtype=torch.float64).to(dtype)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30]).to(dtype)
    junk = garbage[torch.randint(0, 4, (b, t), generator=g)]
    for k in ("logp", "logp_corrupt", "logp_ablated", "perception_signal", "reasoning_signal"):
        if k in kw:
            kw[k] = torch.where(mask, kw[k], junk)
    kw["roles"] = torch.where(mask, roles, -100)
    if layout.startswith("packed"):
        packed = {k: (v if k == "advantages" else v[mask]) for k, v in kw.items()}
        packed["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
        return packed
    kw["mask"] = mask
    return kw


def same_stats(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if math.isnan(b[k]):
            assert math.isnan(a[k]), k
        else:
            assert abs(a[k] - b[k]) <= tol * (1 + abs(b[k])), (k, a[k], b[k])


def assert_close_outputs(got, want, dtype) -> None:
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name in ("advantages", "weights", "signals", "baseline"):
        x, y = getattr(got, name), getattr(want, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=lambda m, n=name: f"`{n}`: {m}")
    same_stats(got.stats, want.stats, tol)


def assert_identical(a, b) -> None:
    for name in ("advantages", "weights", "signals", "baseline"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.stats.keys() == b.stats.keys()
    for k in a.stats:
        assert a.stats[k] == b.stats[k] or (math.isnan(a.stats[k]) and math.isnan(b.stats[k])), k


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setattr(TUNING, "use_compile", False)


@pytest.fixture
def compiled(monkeypatch):
    """The compiled path even for tiny batches (needs a working C++ compiler; skipped without one)."""
    monkeypatch.setattr(TUNING, "role_advantages_min_compile_tokens", 0)
    monkeypatch.setattr(TUNING, "use_compile", True)
    _chunked.reset()
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=64):  # the tests compile more variants than a trainer would
        yield
    if _chunked._BROKEN is not None:
        reason = _chunked._BROKEN
        _chunked.reset()
        pytest.skip(f"torch.compile unavailable here: {reason[:200]}")


def packed_view(out, kw):
    if "mask" not in kw:
        return out
    m = kw["mask"]
    return type(out)(out.advantages[m], out.weights[m], out.signals[m], out.baseline, out.stats)


# -- fast (eager) == reference ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("signals", [False, True])
def test_fast_matches_reference(eager, layout, config, dtype, signals):
    kw = make_batch(layout, dtype=dtype, signals=signals, seed=hash((layout, signals)) % 1000)
    if signals:
        config = SRPOConfig(**{**config.__dict__, "perception_contrast": "kl", "reasoning_contrast": "js"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no compile attempt, no fallback warning
        got = role_aware_advantages(**kw, config=config)
    assert_close_outputs(got, role_aware_advantages(**kw, config=config, backend="reference"), dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_fast_layouts_agree_bit_for_bit(eager, config):
    """The same batch as right-padded, with holes, left-padded (all padded) and packed: identical results."""
    kw = make_batch("holes", seed=3, signals=False)
    mask = kw["mask"]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    packed = {k: (v if k in ("advantages", "mask") else v[mask]) for k, v in kw.items()}
    packed.pop("mask")
    ref = role_aware_advantages(**packed, cu_seqlens=cu, config=config)
    lengths = mask.sum(1)
    right = torch.arange(mask.shape[1] + 2)[None, :] < lengths[:, None]
    for m in (mask, right, right.flip(1)):
        padded = {k: (v if k == "advantages" else torch.zeros(m.shape, dtype=v.dtype).masked_scatter(m, v))
                  for k, v in packed.items()}
        assert_identical(packed_view(role_aware_advantages(**padded, mask=m, config=config), {"mask": m}), ref)


def test_fast_mixed_input_dtypes(eager):
    kw = make_batch("holes", dtype=torch.bfloat16)
    kw["advantages"] = kw["advantages"].float()
    kw["logp_ablated"] = kw["logp_ablated"].to(torch.float16)
    got = role_aware_advantages(**kw)
    assert got.weights.dtype == torch.float32
    assert_close_outputs(got, role_aware_advantages(**kw, backend="reference"), torch.float32)
    kw["advantages"] = kw["advantages"].double()
    got = role_aware_advantages(**kw)
    assert got.weights.dtype == torch.float64
    assert_close_outputs(got, role_aware_advantages(**kw, backend="reference"), torch.float64)


# -- exactness (SPEC properties 3 and 4) ------------------------------------------------------------------------
@pytest.mark.parametrize("weight_map", ["exp", "linear", "sigmoid"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_fast_zero_beta_is_grpo_exactly(request, mode, weight_map):
    request.getfixturevalue(mode)
    kw = make_batch("holes", seed=5)
    out = role_aware_advantages(**kw, config=SRPOConfig(beta_perception=0.0, beta_reasoning=0.0,
                                                        weight_map=weight_map))
    mask = kw["mask"]
    assert torch.equal(out.weights, mask.float())
    assert torch.equal(out.advantages, torch.where(mask, kw["advantages"][:, None], 0.0))


@pytest.mark.parametrize("standardize", ["none", "batch"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_fast_constant_signal_gives_unit_weights_exactly(request, mode, standardize):
    request.getfixturevalue(mode)
    kw = make_batch("right_padded", seed=6, signals=True)
    kw["roles"] = torch.where(kw["roles"] == 2, 1, kw["roles"])  # one role only: see decision D13
    kw["perception_signal"][2] = 3.25  # trajectory 2: a constant signal
    cfg = SRPOConfig(perception_contrast="kl", reasoning_contrast="js", standardize=standardize)
    out = role_aware_advantages(**kw, config=cfg)
    row = kw["mask"][2]
    assert bool((out.weights[2][row] == 1).all()), out.weights[2]


# -- compiled == eager ------------------------------------------------------------------------------------------
COMPILED_CASES = [  # few variants: each is a compile of a few seconds
    (CONFIGS[0], torch.float32, False),
    (CONFIGS[1], torch.float64, False),
    (CONFIGS[2], torch.float32, True),
]


@pytest.mark.parametrize("config,dtype,signals", COMPILED_CASES, ids=["default-fp32", "linear-fp64", "sigmoid-signals"])
def test_compiled_matches_eager_and_reference(compiled, monkeypatch, config, dtype, signals):
    if signals:
        config = SRPOConfig(**{**config.__dict__, "perception_contrast": "kl", "reasoning_contrast": "js"})
    results = {}
    for layout in LAYOUTS:
        kw = make_batch(layout, dtype=dtype, signals=signals, seed=11, b=9, t=37)
        got = role_aware_advantages(**kw, config=config)
        assert_close_outputs(got, role_aware_advantages(**kw, config=config, backend="reference"), dtype)
        with monkeypatch.context() as m:
            m.setenv(_chunked.NO_COMPILE_ENV, "1")
            m.setattr(TUNING, "use_compile", None)
            assert_close_outputs(got, role_aware_advantages(**kw, config=config), dtype)
        results[layout] = (got, kw)
    # compiled, both layouts of one batch: bit for bit
    kw = make_batch("holes", dtype=dtype, signals=signals, seed=12, b=9, t=37)
    mask = kw["mask"]
    packed = {k: (v if k == "advantages" else v[mask]) for k, v in kw.items() if k != "mask"}
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    assert_identical(packed_view(role_aware_advantages(**kw, config=config), kw),
                     role_aware_advantages(**packed, cu_seqlens=cu, config=config))


def test_no_compile_env_never_compiles(monkeypatch):
    monkeypatch.setattr(TUNING, "role_advantages_min_compile_tokens", 0)
    monkeypatch.setattr(TUNING, "use_compile", None)
    monkeypatch.setenv(_chunked.NO_COMPILE_ENV, "1")

    def boom(*args, **kwargs):
        raise AssertionError("compiled under SRPO_NO_COMPILE=1")

    monkeypatch.setattr(_chunked.Compiled, "__call__", boom)
    kw = make_batch("holes")
    assert_close_outputs(role_aware_advantages(**kw), role_aware_advantages(**kw, backend="reference"), torch.float32)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(TUNING, "role_advantages_min_compile_tokens", 0)
    monkeypatch.setattr(TUNING, "use_compile", True)
    _chunked.reset()

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_chunked.Compiled, "__call__", broken)
    kw = make_batch("packed_unequal")
    try:
        with pytest.warns(RuntimeWarning, match="falling back to eager"):
            got = role_aware_advantages(**kw)
        monkeypatch.setattr(TUNING, "use_compile", False)
        assert_identical(got, role_aware_advantages(**kw))
    finally:
        _chunked.reset()


# -- edge cases -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_empty_batch_and_zero_length_trajectories(eager, packed):
    for lengths in ([], [0], [0, 0, 0], [0, 3, 0, 1]):
        n, b = sum(lengths), len(lengths)
        t = max(lengths, default=0)
        adv = torch.randn(b)
        if packed:
            kw = {"logp": -torch.rand(n), "logp_corrupt": -torch.rand(n), "logp_ablated": -torch.rand(n),
                  "roles": torch.randint(0, 3, (n,)),
                  "cu_seqlens": torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])}
        else:
            mask = torch.arange(t)[None, :] < torch.tensor(lengths, dtype=torch.int64).view(b, 1)
            kw = {"logp": -torch.rand(b, t), "logp_corrupt": -torch.rand(b, t), "logp_ablated": -torch.rand(b, t),
                  "roles": torch.randint(0, 3, (b, t)), "mask": mask}
        got = role_aware_advantages(adv, **kw)
        assert_close_outputs(got, role_aware_advantages(adv, **kw, backend="reference"), torch.float32)


def test_very_uneven_lengths_take_the_reference_path_in_both_layouts(eager, monkeypatch):
    monkeypatch.setattr(TUNING, "role_advantages_max_grid_cells", 16)
    kw = make_batch("right_padded", b=16, t=40)
    kw["mask"][:] = False
    kw["mask"][0] = True
    kw["mask"][1:, 0] = True  # one trajectory of 40 tokens, fifteen of 1: B·L = 640 > 8·N = 440
    mask = kw.pop("mask")
    packed = {k: (v if k == "advantages" else v[mask]) for k, v in kw.items()}
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    calls = []
    real = fast.role_aware_advantages_cpu
    monkeypatch.setattr(fast, "role_aware_advantages_cpu", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    got = role_aware_advantages(**kw, mask=mask)
    got_packed = role_aware_advantages(**packed, cu_seqlens=cu)
    assert calls == []  # the entry routes both layouts to the reference; the fast path never sees them
    assert_identical(got, role_aware_advantages(**kw, mask=mask, backend="reference"))
    assert_identical(packed_view(got, {"mask": mask}), got_packed)


def test_reference_backend_is_the_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("fast path used for backend='reference'")

    monkeypatch.setattr(fast, "role_aware_advantages_cpu", boom)
    role_aware_advantages(**make_batch("holes"), backend="reference")


# -- errors: the same messages as the reference ----------------------------------------------------------------
def _invalid_batches():
    def put(name, value, role):
        def f(kw):
            sel = (kw["roles"] == role) & kw["mask"]
            i = int(torch.nonzero(sel.reshape(-1))[1, 0])
            kw[name].view(-1)[i] = value
        return f

    def bad_role(kw):
        kw["roles"][0, 3] = 5

    yield "nan-logp-perception", put("logp", float("nan"), 1), {}
    yield "inf-logp-reasoning", put("logp", float("inf"), 2), {}
    yield "nan-corrupt", put("logp_corrupt", float("nan"), 1), {}
    yield "inf-ablated", put("logp_ablated", float("inf"), 2), {}
    yield "bad-role", bad_role, {}
    yield "nonfinite-signal", put("perception_signal", -float("inf"), 1), {"signals": True}
    yield "nan-signal-and-role", lambda kw: (put("reasoning_signal", float("nan"), 2)(kw), bad_role(kw)), \
        {"signals": True}
    yield "corrupt-none", lambda kw: kw.update(logp_corrupt=None), {}
    yield "kl-without-signal", lambda kw: None, {"config": SRPOConfig(reasoning_contrast="kl")}


ERROR_CASES = [("eager", *c) for c in _invalid_batches()] + [  # compiled: two suffice (each one compiles)
    ("compiled", *c) for c in _invalid_batches() if c[0] in ("nan-logp-perception", "bad-role")]


@pytest.mark.parametrize("mode,name,spoil,opts", ERROR_CASES, ids=[f"{c[0]}-{c[1]}" for c in ERROR_CASES])
def test_errors_match_the_reference(request, mode, name, spoil, opts):
    request.getfixturevalue(mode)
    kw = make_batch("right_padded", signals=opts.get("signals", False), seed=2)
    kw["mask"][:, 3] = True
    spoil(kw)
    config = opts.get("config", SRPOConfig())
    if opts.get("signals"):
        config = SRPOConfig(perception_contrast="kl", reasoning_contrast="js")
    with pytest.raises(ValueError) as want:
        role_aware_advantages(**kw, config=config, backend="reference")
    with pytest.raises(ValueError) as got:
        role_aware_advantages(**kw, config=config)
    assert str(got.value) == str(want.value)
