"""Fuzz (issue 14): ``role_aware_advantages``, ``contrast``, ``grpo_advantages``, ``SRPOConfig``, ``Role``,
``vppo_advantages``, ``papo_perception_kl``. Each case mixes one class of bad or extreme input (wrong shapes / dtypes,
bad roles / cu_seqlens, NaN where read, non-contiguous and meta tensors, extreme but valid values and configs,
garbage at masked positions) into a valid call, and must either raise the library's own error (a TypeError /
ValueError naming the op and an argument) or return a result that is finite where the SPEC promises it and within
STYLE's tolerance of the float64 reference."""

from __future__ import annotations

import math

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st

from srpo_core import (
    Role,
    SRPOConfig,
    contrast,
    grpo_advantages,
    papo_perception_kl,
    role_aware_advantages,
    vppo_advantages,
)
from srpo_core.reference import contrast as contrast_ref

NAN, INF = math.nan, math.inf
MUTATIONS = ("none", "none", "garbage", "dtype", "shape", "role_value", "nan", "cu", "noncontig", "meta", "list",
             "advantages", "layout")
BAD_ROLES = (3, -1, 100, -100, 2**40)


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other element of a buffer twice as long in the last dim)."""
    if x.dim() == 0:
        return x
    buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    buf[..., ::2] = x
    return buf[..., ::2]


def _mutate(draw, kw: dict, kind: str) -> dict:
    kw = dict(kw)
    per_token = [k for k in ("logp", "logp_corrupt", "logp_ablated", "perception_signal", "reasoning_signal", "roles")
                 if kw.get(k) is not None]
    valid = S.valid_mask(kw)
    if kind == "dtype":
        name = draw(st.sampled_from(per_token + ["advantages"] + (["mask"] if "mask" in kw else ["cu_seqlens"])))
        x = kw[name]
        kw[name] = x.float() if not x.is_floating_point() else x.long()
    elif kind == "shape":
        name = draw(st.sampled_from(per_token))
        x = kw[name]
        kw[name] = x[..., :-1] if x.shape[-1] else torch.zeros(*x.shape, 1, dtype=x.dtype)
    elif kind == "role_value" and bool(valid.any()):
        roles = kw["roles"].clone()
        idx = tuple(t[0] for t in torch.nonzero(valid, as_tuple=True))
        roles[idx] = draw(st.sampled_from(BAD_ROLES))
        kw["roles"] = roles
    elif kind == "nan" and bool(valid.any()):
        name = draw(st.sampled_from(per_token[:-1] or ["logp"]))
        x = kw[name].clone()
        x[valid] = draw(st.sampled_from((NAN, INF)))
        kw[name] = x
    elif kind == "cu" and "cu_seqlens" in kw:
        cu = kw["cu_seqlens"].clone()
        which = draw(st.sampled_from(("first", "last", "drop", "2d", "empty")))
        if which == "first":
            cu[0] = 1
        elif which == "last":
            cu[-1] += 1
        elif which == "drop" and cu.numel() > 2:
            cu[1] = cu[-1] + 1
        elif which == "2d":
            cu = cu[None]
        else:
            cu = cu[:0]
        kw["cu_seqlens"] = cu
    elif kind == "noncontig":
        for name in per_token + ["advantages"]:
            kw[name] = noncontiguous(kw[name])
    elif kind == "meta":
        name = draw(st.sampled_from(per_token + ["advantages"]))
        kw[name] = kw[name].to("meta")
    elif kind == "list":
        name = draw(st.sampled_from(per_token + ["advantages"]))
        kw[name] = kw[name].tolist()
    elif kind == "advantages":
        adv = kw["advantages"]
        kw["advantages"] = adv[:-1] if draw(st.booleans()) or not adv.numel() else torch.full_like(adv, NAN)
    elif kind == "layout":
        if "mask" in kw:
            kw["cu_seqlens"] = torch.tensor([0, int(kw["mask"].sum())])
        else:
            kw["mask"] = torch.ones(kw["logp"].shape, dtype=torch.bool)
    return kw


@st.composite
def raa_calls(draw):
    case = draw(S.cases(max_b=4, max_len=6, extreme=draw(st.booleans()), signals=None))
    dtype = draw(S.float_dtypes())
    kind = draw(st.sampled_from(MUTATIONS))
    if draw(st.booleans()):
        lay = draw(S.padded_layouts(case))
        kw = case.padded(dtype, **lay, garbage=draw(st.integers(1, 99)) if kind == "garbage" else None)
    else:
        kw = case.packed(dtype)
    if case.perception_signal is not None and draw(st.booleans()):
        kw["logp_corrupt"] = None
    return kind, _mutate(draw, kw, kind), draw(S.extreme_configs()), draw(st.sampled_from(_backends()))


def _backends() -> tuple[str, ...]:
    """``S.fuzz_backends()`` with ``"torch"`` (this op's reference until the backends were unified) as ``"reference"``:
    on the CPU ``"auto"`` already is the CPU path."""
    return tuple("reference" if b == "torch" else b for b in S.fuzz_backends())


def _as64(kw: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


@S.fuzz_settings()
@given(call=raa_calls())
def test_fuzz_role_aware_advantages(call):
    kind, kw, config, backend = call
    op = "role_aware_advantages"
    out = S.outcome(op, lambda: role_aware_advantages(**kw, config=config, backend=backend))
    if out is None:
        return
    valid = S.valid_mask(kw)
    w = out.weights
    # SPEC property 1 and 2, and nothing outside the mask.
    assert bool(torch.isfinite(w[valid]).all()) and bool((w[valid] > 0).all()), (kind, config, w)
    assert not bool(torch.isnan(out.advantages).any())
    assert bool((w[~valid] == 0).all()) and bool((out.advantages[~valid] == 0).all())
    seg = S.segment_of(kw)
    a_i = kw["advantages"].double()[seg.clamp(min=0)]
    assert torch.equal(torch.sign(out.advantages[valid].double()), torch.sign(a_i[valid]))
    # Against the float64 reference, with the same-dtype reference as the measure of rounding.
    same = role_aware_advantages(**kw, config=config, backend="reference")
    ref64 = role_aware_advantages(**_as64(kw), config=config, backend="reference")
    S.within_torch_error(w, same.weights, ref64.weights, atol=1e-6, what=f"{op} weights ({kind}, {config})")
    big = torch.finfo(out.advantages.dtype).max
    S.within_torch_error(torch.nan_to_num(out.advantages.double(), posinf=big, neginf=-big),
                         torch.nan_to_num(same.advantages.double(), posinf=big, neginf=-big),
                         ref64.advantages.clamp(-big, big), atol=1e-6, what=f"{op} advantages ({kind})")
    for key in ("perception/count", "reasoning/count", "perception/clamped", "reasoning/clamped"):
        assert out.stats[key] == ref64.stats[key], key


# -- contrast ------------------------------------------------------------------------------------------------------
LOGP = st.one_of(st.floats(-50, 5, width=32), st.sampled_from((-INF, 0.0, -1e30, -3e38, 1e-30)))
BAD_NUMBERS = (NAN, INF, -1.0, 0.0, 1e300, "1", True, None)


@st.composite
def contrast_calls(draw):
    n = draw(st.integers(0, 6))
    dtype = draw(S.float_dtypes())
    a = S.to_dtype(torch.tensor(draw(st.lists(LOGP, min_size=n, max_size=n)), dtype=torch.float64), dtype)
    b = S.to_dtype(torch.tensor(draw(st.lists(LOGP, min_size=n, max_size=n)), dtype=torch.float64), dtype)
    kwargs = {"kind": draw(st.sampled_from(("k3", "logratio", "k3", "logratio", "kl", "bogus"))),
              "clamp": draw(st.sampled_from((20.0, 0.5, 1e-6, 1e15))),
              "k3_max": draw(st.sampled_from((10.0, 1e-6, 1e15)))}
    kind = draw(st.sampled_from(("none", "none", "number", "nan", "shape", "dtype", "meta", "noncontig", "2d")))
    if kind == "number":
        kwargs[draw(st.sampled_from(("clamp", "k3_max")))] = draw(st.sampled_from(BAD_NUMBERS))
    elif kind == "nan" and n:
        a = a.clone()
        a[draw(st.integers(0, n - 1))] = draw(st.sampled_from((NAN, INF)))
    elif kind == "shape":
        b = b[:-1] if n else torch.zeros(1, dtype=dtype)
    elif kind == "dtype":
        b = b.long()
    elif kind == "meta":
        a = a.to("meta")
    elif kind == "noncontig":
        a, b = noncontiguous(a), noncontiguous(b)
    elif kind == "2d":
        a, b = a[None].expand(2, n), b[None].expand(2, n)
    return a, b, kwargs


@S.fuzz_settings()
@given(call=contrast_calls())
def test_fuzz_contrast(call):
    a, b, kwargs = call
    out = S.outcome("contrast", lambda: contrast(a, b, **kwargs))
    if out is None:
        return
    assert out.shape == a.shape and bool(torch.isfinite(out).all()), out
    ref64 = contrast_ref.contrast(a.double(), b.double(), kwargs["kind"], kwargs["clamp"], kwargs["k3_max"])
    # Rounding of the difference in the compute dtype, times the contrast's slope (1 for logratio, e^δ for k3).
    eps = torch.finfo(out.dtype).eps
    slope = 1.0 if kwargs["kind"] == "logratio" else ref64.abs() + 1.0 + kwargs["clamp"]
    tol = 4 * eps * ((a.double().abs() + b.double().abs()).clamp(max=1e38).nan_to_num(posinf=0.0) + ref64.abs()) \
        * slope + 1e-12
    err = (out.double() - ref64).abs()
    ok = (err <= tol) | (out.double() == ref64)
    assert bool(ok.all()), (a, b, kwargs, out, ref64)
    assert out.dtype == (a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32)


# -- grpo_advantages -----------------------------------------------------------------------------------------------
REWARDS = st.one_of(st.floats(-10, 10, width=32), st.sampled_from((0.0, 1.0, 1e30, -3e38, 3e38, 1e-30)))


@st.composite
def grpo_calls(draw):
    n = draw(st.integers(0, 8))
    dtype = draw(S.float_dtypes())
    r = S.to_dtype(torch.tensor(draw(st.lists(REWARDS, min_size=n, max_size=n)), dtype=torch.float64), dtype)
    g = torch.tensor(draw(st.lists(st.sampled_from((0, 1, 2, -5, 2**40)), min_size=n, max_size=n)), dtype=torch.int64)
    kwargs = {"norm": draw(st.sampled_from(("std", "none"))), "eps": draw(st.sampled_from((1e-6, 1e-4, 1.0))),
              "scale": draw(st.sampled_from(("group", "batch"))),
              "nan_rewards": draw(st.sampled_from(("raise", "zero")))}
    kind = draw(st.sampled_from(("none", "none", "nan", "inf", "option", "shape", "dtype", "meta", "noncontig")))
    if kind in ("nan", "inf") and n:
        r = r.clone()
        r[draw(st.integers(0, n - 1))] = NAN if kind == "nan" else -INF
    elif kind == "option":
        name = draw(st.sampled_from(sorted(kwargs)))
        kwargs[name] = draw(st.sampled_from(("bogus", NAN, 0.0, -1.0, None)))
    elif kind == "shape":
        g = g[:-1] if n else g[None]
    elif kind == "dtype":
        g = g.float()
    elif kind == "meta":
        r = r.to("meta")
    elif kind == "noncontig":
        r, g = noncontiguous(r), noncontiguous(g)
    return r, g, kwargs


@S.fuzz_settings()
@given(call=grpo_calls())
def test_fuzz_grpo_advantages(call):
    r, g, kwargs = call
    out = S.outcome("grpo_advantages", lambda: grpo_advantages(r, g, **kwargs))
    if out is None:
        return
    assert bool(torch.isfinite(out).all()), (r, g, kwargs, out)
    ref64 = grpo_advantages(r.double(), g, **kwargs)
    assert torch.equal(out, ref64.to(out.dtype)), (out, ref64)  # statistics in float64 either way
    if kwargs["nan_rewards"] == "zero":
        assert bool((out[torch.isnan(r)] == 0).all())


# -- SRPOConfig (every accepted config keeps property 1) and Role ---------------------------------------------------
FIELD_VALUES = {
    "clamp": (20.0, 1e15, 1e16, 0.0, -1.0, NAN, INF, "20", True, 1e-300),
    "k3_max": (10.0, 1e15, 1e300, 0.0, NAN, 1e-6),
    "eps": (1e-6, 1e-30, 1e-31, 1e-300, 0.0, INF, 1e10),
    "u_max": (3.0, 1e6, 1e7, 1e-300, 0.0, NAN),
    "beta_perception": (0.5, 0.0, 6.0, 20.0, 1e6, 1e300, -0.1, NAN),
    "beta_reasoning": (0.5, 0.0, 6.0, 1e-300, -1.0),
    "w_min": (0.1, 1e-6, 1e-7, 1.0, 1.5, 0.0),
    "standardize": ("batch", "none", "zscore", None),
    "weight_map": ("exp", "linear", "sigmoid", "softmax"),
    "renorm": ("mean", "none", "sum"),
    "role_stats": ("all", "unclamped", "robust"),
    "perception_contrast": ("k3", "logratio", "l1"),
}
PROBE = {
    "advantages": torch.tensor([1.0, -1e30, 0.5]),
    "logp": torch.tensor([[-INF, -1.0, -50.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [0.0, -3e38, -1.0, -2.0]]),
    "logp_corrupt": torch.tensor([[-1.0, -INF, -2.0, 0.0], [-1.0, -5.0, -1.0, -1.0], [-INF, -3e38, -1.0, -1.0]]),
    "logp_ablated": torch.tensor([[-2.0, -1.0, -INF, 0.0], [-1.0, -1.0, -9.0, -1.0], [0.0, 0.0, -1.0, -3.0]]),
    "roles": torch.tensor([[1, 2, 2, 0], [1, 1, 2, 2], [2, 1, 1, 2]]),
    "mask": torch.tensor([[True, True, True, True], [True, True, True, False], [True, False, True, True]]),
}


@S.fuzz_settings()
@given(fields=st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in FIELD_VALUES.items()}),
       backend=st.sampled_from(("auto", "reference")))
def test_fuzz_srpo_config(fields, backend):
    config = S.outcome("SRPOConfig", lambda: SRPOConfig(**fields))
    if config is None:
        return
    out = role_aware_advantages(**PROBE, config=config, backend=backend)
    w = out.weights[PROBE["mask"]]
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all()), (config, out.weights)
    assert not bool(torch.isnan(out.advantages).any())


@S.fuzz_settings(0.2)
@given(value=st.one_of(st.integers(-2**70, 2**70), st.sampled_from((0, 1, 2, "1", None, 1.0, True))))
def test_fuzz_role(value):
    role = S.outcome("Role", lambda: Role(value))
    if role is not None:
        assert int(role) in (0, 1, 2) and int(role) == value


# -- presets -------------------------------------------------------------------------------------------------------
@st.composite
def preset_calls(draw):
    kind, kw, _, _ = draw(raa_calls())
    for k in ("logp_ablated", "perception_signal", "reasoning_signal", "roles"):
        kw.pop(k, None)
    if kw.get("logp_corrupt") is None:
        kw["logp_corrupt"] = kw["logp"]
    opts = {"clamp": draw(st.sampled_from((20.0, 1e-6, 1e15, NAN, -1.0))),
            "k3_max": draw(st.sampled_from((10.0, 1e-6, 1e15, INF)))}
    return kind, kw, opts


@S.fuzz_settings()
@given(call=preset_calls())
def test_fuzz_vppo_advantages(call):
    kind, kw, opts = call
    out = S.outcome("vppo_advantages", lambda: vppo_advantages(**kw, **opts))
    if out is None:
        return
    valid = S.valid_mask(kw)
    assert bool(torch.isfinite(out.dependency[valid]).all()) and bool(torch.isfinite(out.alpha).all())
    assert not bool(torch.isnan(out.advantages).any())
    ref64 = vppo_advantages(**_as64(kw), **opts)
    assert bool((out.loss_mask[~valid] == 0).all())
    S.within_torch_error(out.alpha, out.alpha, ref64.alpha, atol=1e-5, what="vppo alpha")


@S.fuzz_settings()
@given(call=preset_calls())
def test_fuzz_papo_perception_kl(call):
    kind, kw, opts = call
    kw.pop("advantages", None)
    out = S.outcome("papo_perception_kl", lambda: papo_perception_kl(**kw, **opts))
    if out is None:
        return
    valid = S.valid_mask(kw)
    assert bool(torch.isfinite(out[valid]).all()) and bool((out[~valid] == 0).all())
    ref64 = papo_perception_kl(**_as64(kw), **opts)
    eps = torch.finfo(torch.float32).eps
    assert bool(((out.double() - ref64).abs() <= 8 * eps * (ref64.abs() + 1) * (ref64.abs() + 1)).all()), \
        (out, ref64)
