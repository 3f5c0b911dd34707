"""Bad input gets a ValueError/TypeError naming the argument, what it got and what was expected (issue 2, "Bad
input"); edge cases that are NOT errors (empty batch, zero-length trajectories, garbage outside the mask) work."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from srpo_core import Role, SRPOConfig, contrast, grpo_advantages, role_aware_advantages

NAN, INF = math.nan, math.inf


@contextlib.contextmanager
def raises(exc, *fragments: str):
    """``pytest.raises`` that also requires every fragment (plain substrings, not regexes) in the message."""
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"


def padded(b=2, t=4, role=Role.PERCEPTION, dtype=torch.float32):
    """Keyword arguments for a small valid padded call (every token of role ``role``)."""
    return {
        "advantages": torch.ones(b, dtype=dtype),
        "logp": torch.full((b, t), -1.0, dtype=dtype),
        "logp_corrupt": torch.full((b, t), -2.0, dtype=dtype),
        "logp_ablated": torch.full((b, t), -3.0, dtype=dtype),
        "roles": torch.full((b, t), int(role), dtype=torch.int64),
        "mask": torch.ones(b, t, dtype=torch.bool),
    }


def packed(lengths=(4, 4), role=Role.PERCEPTION):
    n = sum(lengths)
    cu = [0]
    for k in lengths:
        cu.append(cu[-1] + k)
    return {
        "advantages": torch.ones(len(lengths)),
        "logp": torch.full((n,), -1.0),
        "logp_corrupt": torch.full((n,), -2.0),
        "logp_ablated": torch.full((n,), -3.0),
        "roles": torch.full((n,), int(role), dtype=torch.int64),
        "cu_seqlens": torch.tensor(cu),
    }


def call(kw, **changes):
    return role_aware_advantages(**{**kw, **changes})


# -- shapes, devices, dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["logp_corrupt", "logp_ablated", "roles", "mask"])
def test_mismatched_shape(name):
    kw = padded()
    with raises(ValueError, f"`{name}`", "shape of `logp` (2, 4)", "shape (2, 3)"):
        call(kw, **{name: kw[name][:, :3]})


def test_mismatched_precomputed_signal_shape():
    with raises(ValueError, "`perception_signal`", "(2, 4)", "shape (2, 5)"):
        call(padded(), perception_signal=torch.zeros(2, 5))


@pytest.mark.parametrize("name", ["advantages", "logp_corrupt", "logp_ablated", "roles", "mask"])
def test_mismatched_device(name):
    """The "meta" device stands in for a second device (no GPU needed)."""
    kw = padded()
    with raises(ValueError, f"`{name}`", "on cpu like `logp`", "on meta"):
        call(kw, **{name: kw[name].to("meta")})


def test_mismatched_device_cu_seqlens():
    kw = packed()
    with raises(ValueError, "`cu_seqlens`", "on cpu like `logp`", "on meta"):
        call(kw, cu_seqlens=kw["cu_seqlens"].to("meta"))


@pytest.mark.parametrize("name", ["logp", "logp_corrupt", "logp_ablated", "advantages"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=["int64", "int32", "bool"])
def test_non_float_inputs(name, dtype):
    kw = padded()
    with raises(TypeError, f"`{name}`", "floating-point", str(dtype)):
        call(kw, **{name: kw[name].to(dtype)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=["float32", "bool"])
def test_roles_must_be_integer(dtype):
    kw = padded()
    with raises(TypeError, "`roles`", "integer tensor", str(dtype)):
        call(kw, roles=kw["roles"].to(dtype))


def test_mask_must_be_bool():
    kw = padded()
    with raises(TypeError, "`mask`", "bool tensor", "torch.int64"):
        call(kw, mask=kw["mask"].long())


def test_logp_rank():
    with raises(ValueError, "`logp`", "1-D or 2-D", "shape (2, 2, 2)"):
        call(padded(), logp=torch.zeros(2, 2, 2))


def test_not_a_tensor():
    with raises(TypeError, "`logp`", "torch.Tensor", "list"):
        call(padded(), logp=[[0.0] * 4] * 2)


def test_config_type():
    with raises(TypeError, "`config`", "SRPOConfig", "dict"):
        call(padded(), config={"beta_perception": 0.5})


# -- roles ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [3, -1, -100, 255], ids=lambda v: f"role{v}")
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_roles_outside_0_1_2_at_valid_positions(value, layout):
    kw = padded() if layout == "padded" else packed()
    roles = kw["roles"].clone()
    roles.view(-1)[3] = value
    with raises(ValueError, "`roles`", "0 (OTHER), 1 (PERCEPTION) or 2 (REASONING)", f"got [{value}]"):
        call(kw, roles=roles)


def test_garbage_roles_outside_mask_are_fine():
    kw = padded()
    mask = kw["mask"].clone()
    mask[:, 2:] = False
    roles = kw["roles"].clone()
    roles[:, 2:] = -100
    out = call(kw, mask=mask, roles=roles)
    assert bool((out.weights[:, 2:] == 0).all())


# -- mask / cu_seqlens -----------------------------------------------------------------------------------------------
def test_padded_needs_mask():
    kw = padded()
    del kw["mask"]
    with raises(ValueError, "2-D (padded)", "need `mask: bool [2, 4]`"):
        call(kw)


def test_padded_rejects_cu_seqlens():
    with raises(ValueError, "2-D (padded)", "not `cu_seqlens`", "shape (3,)"):
        call(padded(), cu_seqlens=torch.tensor([0, 4, 8]))


def test_packed_needs_cu_seqlens():
    kw = packed()
    del kw["cu_seqlens"]
    with raises(ValueError, "1-D (packed)", "need `cu_seqlens: int [B+1]`"):
        call(kw)


def test_packed_rejects_mask():
    with raises(ValueError, "1-D (packed)", "not `mask`", "shape (8,)"):
        call(packed(), mask=torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize(
    ("cu", "fragments"),
    [
        pytest.param([1, 4, 8], ("must start at 0", "cu_seqlens[0] = 1"), id="not-starting-at-0"),
        pytest.param([0, 5, 4, 8], ("non-decreasing", "cu_seqlens[2] = 4 < cu_seqlens[1] = 5"), id="decreasing"),
        pytest.param([0, 4, 7], ("must end at N = 8", "cu_seqlens[-1] = 7"), id="short"),
        pytest.param([0, 4, 9], ("must end at N = 8", "cu_seqlens[-1] = 9"), id="long"),
        pytest.param([], ("B+1 >= 1 entries", "empty"), id="empty"),
    ],
)
def test_bad_cu_seqlens(cu, fragments):
    kw = packed()
    advantages = torch.ones(max(len(cu) - 1, 0))
    with raises(ValueError, "`cu_seqlens`", *fragments):
        call(kw, cu_seqlens=torch.tensor(cu, dtype=torch.int64), advantages=advantages)


def test_cu_seqlens_must_be_integer():
    with raises(TypeError, "`cu_seqlens`", "integer tensor", "torch.float32"):
        call(packed(), cu_seqlens=torch.tensor([0.0, 4.0, 8.0]))


def test_cu_seqlens_int32_is_fine():
    out = call(packed(), cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    assert out.weights.shape == (8,)


# -- advantages ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("b", [1, 3])
def test_advantages_wrong_length(layout, b):
    kw = padded() if layout == "padded" else packed()
    with raises(ValueError, "`advantages`", "one entry per trajectory (B = 2)", f"shape ({b},)"):
        call(kw, advantages=torch.ones(b))


def test_advantages_must_be_1d():
    with raises(ValueError, "`advantages`", "1-D", "shape (2, 1)"):
        call(padded(), advantages=torch.ones(2, 1))


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_advantages(bad):
    with raises(ValueError, "`advantages`", "must be finite", "1 non-finite", "first at index 1"):
        call(padded(), advantages=torch.tensor([0.5, bad]))


# -- NaN at valid role positions -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("logp", Role.PERCEPTION),
        ("logp", Role.REASONING),
        ("logp_corrupt", Role.PERCEPTION),
        ("logp_ablated", Role.REASONING),
    ],
)
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "+inf"])
def test_nan_at_valid_role_position_padded(name, role, bad):
    kw = padded(b=3, t=5, role=role)
    x = kw[name].clone()
    x[1, 2] = bad
    x[2, 0] = bad
    x[0, 4] = NAN  # outside the mask below: not counted
    mask = kw["mask"].clone()
    mask[0, 4] = False
    with raises(ValueError, f"`{name}`", "2 NaN/+inf", f"valid {role.name.lower()} positions",
                "first at index (1, 2)"):
        call(kw, mask=mask, **{name: x})


@pytest.mark.parametrize("name", ["perception_signal", "reasoning_signal"])
def test_nan_in_precomputed_signal_packed(name):
    role = Role.PERCEPTION if name == "perception_signal" else Role.REASONING
    kw = packed(lengths=(3, 0, 5), role=role)
    s = torch.zeros(8)
    s[[4, 6, 7]] = NAN
    with raises(ValueError, f"`{name}`", "3 non-finite", "first at index (4,)"):
        call(kw, **{name: s})


def test_neg_inf_log_probs_are_fine():
    kw = padded(role=Role.PERCEPTION)
    logp = kw["logp"].clone()
    logp[0, 0] = -INF
    corrupt = kw["logp_corrupt"].clone()
    corrupt[0, 1] = -INF
    out = call(kw, logp=logp, logp_corrupt=corrupt)
    assert bool(torch.isfinite(out.weights).all())


def test_neg_inf_precomputed_signal_is_an_error():
    s = torch.tensor([-INF, 1.0, 2.0])
    with raises(ValueError, "`perception_signal`"):
        role_aware_advantages(torch.ones(1), torch.zeros(3), None, None, torch.ones(3, dtype=torch.int64),
                              cu_seqlens=torch.tensor([0, 3]), perception_signal=s)


# -- missing inputs, contrast kinds, backend --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("role", "name", "given"),
    [(Role.PERCEPTION, "logp_corrupt", "perception_signal"), (Role.REASONING, "logp_ablated", "reasoning_signal")],
)
def test_missing_counterpart_log_probs(role, name, given):
    with raises(ValueError, f"`{name}` is None", f"8 {role.name.lower()} token(s)", f"`{given}`"):
        call(padded(role=role), **{name: None})


def test_missing_counterpart_is_fine_without_that_role():
    out = call(padded(role=Role.REASONING), logp_corrupt=None)
    assert out.weights.shape == (2, 4)


@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("role", [Role.PERCEPTION, Role.REASONING])
def test_kl_js_without_precomputed_signal(kind, role):
    label = role.name.lower()
    config = SRPOConfig(**{f"{label}_contrast": kind})
    with raises(ValueError, f"config.{label}_contrast={kind!r}", "token_contrast", f"`{label}_signal`"):
        call(padded(role=role), config=config)


def test_kl_with_precomputed_signal_works():
    kw = padded()
    out = call(kw, config=SRPOConfig(perception_contrast="kl"), perception_signal=torch.rand(2, 4))
    assert bool(torch.isfinite(out.weights).all())


def test_backend_triton_without_cuda(monkeypatch):
    """Without CUDA (and without the interpreter) ``backend="triton"`` raises and says why."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((RuntimeError, NotImplementedError)) as info:
        call(padded(), backend="triton")
    message = str(info.value)
    assert "role_aware_advantages" in message and ("Triton" in message or "triton" in message), message
    assert "backend='torch'" in message or "CUDA" in message, message


def test_backend_unknown():
    with raises(ValueError, "`backend`", "('auto', 'triton', 'torch', 'reference')", "'cuda'"):
        call(padded(), backend="cuda")


# -- contrast() ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_contrast_kl_js_need_logits(kind):
    with raises(ValueError, f"`kind`={kind!r}", "full logit rows", "token_contrast"):
        contrast(torch.zeros(3), torch.zeros(3), kind)


def test_contrast_unknown_kind():
    with raises(ValueError, "`kind`", "'logratio' or 'k3'", "'bogus'"):
        contrast(torch.zeros(3), torch.zeros(3), "bogus")


def test_contrast_nan():
    x = torch.zeros(2, 3)
    x[1, 2] = NAN
    with raises(ValueError, "`logp_other`", "1 NaN/+inf", "first at index (1, 2)"):
        contrast(torch.zeros(2, 3), x, "k3")


def test_contrast_shape_and_dtype():
    with raises(ValueError, "`logp_other`", "shape of `logp` (3,)", "shape (2,)"):
        contrast(torch.zeros(3), torch.zeros(2), "k3")
    with raises(TypeError, "`logp`", "floating-point", "torch.int64"):
        contrast(torch.zeros(3, dtype=torch.int64), torch.zeros(3), "k3")


# -- grpo_advantages() -----------------------------------------------------------------------------------------------
def test_grpo_errors():
    r, g = torch.ones(3), torch.zeros(3, dtype=torch.int64)
    with raises(TypeError, "`rewards`", "floating-point", "torch.int64"):
        grpo_advantages(r.long(), g)
    with raises(TypeError, "`group_ids`", "integer tensor", "torch.float32"):
        grpo_advantages(r, g.float())
    with raises(ValueError, "`group_ids`", "shape of `rewards` (3,)", "shape (2,)"):
        grpo_advantages(r, g[:2])
    with raises(ValueError, "`group_ids`", "on cpu", "on meta"):
        grpo_advantages(r, g.to("meta"))
    with raises(ValueError, "`norm`", "'std' or 'none'", "'mad'"):
        grpo_advantages(r, g, norm="mad")
    with raises(ValueError, "`eps`", "positive", "0"):
        grpo_advantages(r, g, eps=0.0)
    with raises(ValueError, "`rewards`", "must be finite", "first at index 1"):
        grpo_advantages(torch.tensor([0.0, NAN, 1.0]), g)


def test_grpo_empty():
    out = grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0,)


# -- SRPOConfig ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("perception_contrast", "kl_div", "one of ('logratio', 'k3', 'kl', 'js')"),
        ("reasoning_contrast", None, "one of ('logratio', 'k3', 'kl', 'js')"),
        ("standardize", "group", "one of ('batch', 'none')"),
        ("weight_map", "tanh", "one of ('exp', 'linear', 'sigmoid')"),
        ("renorm", "sum", "one of ('mean', 'none')"),
        ("clamp", 0.0, "> 0"),
        ("clamp", NAN, "finite number"),
        ("k3_max", -1.0, "> 0"),
        ("eps", 0.0, "> 0"),
        ("u_max", 0.0, "> 0"),
        ("u_max", INF, "finite number"),
        ("beta_perception", -0.1, ">= 0"),
        ("beta_reasoning", INF, "finite number"),
        ("w_min", 0.0, "> 0"),
        ("w_min", "0.1", "finite number"),
        ("w_min", 1.5, "(0, 1]"),
        ("beta_perception", True, "finite number"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) or len(v) < 12 else v[:12],
)
def test_config_bad_values(field, value, fragment):
    with raises(ValueError, "SRPOConfig", f"`{field}`", fragment, f"got {value!r}"):
        SRPOConfig(**{field: value})


def test_config_defaults_match_spec():
    c = SRPOConfig()
    assert (c.perception_contrast, c.reasoning_contrast, c.clamp, c.k3_max) == ("k3", "logratio", 20.0, 10.0)
    assert (c.standardize, c.eps, c.u_max, c.beta_perception, c.beta_reasoning) == ("batch", 1e-6, 3.0, 0.5, 0.5)
    assert (c.weight_map, c.w_min, c.renorm) == ("exp", 0.1, "mean")
    with pytest.raises(AttributeError):
        c.u_max = 1.0  # frozen


# -- edge cases that must work ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 3])
def test_empty_batch_padded(t):
    kw = padded(b=0, t=t)
    out = call(kw)
    assert out.advantages.shape == (0, t) and out.weights.shape == (0, t) and out.signals.shape == (0, t)
    assert out.baseline.shape == (0,)
    assert out.stats["perception/count"] == 0 and out.stats["reasoning/count"] == 0


def test_empty_batch_packed():
    out = call(packed(lengths=()))
    assert out.advantages.shape == (0,) and out.baseline.shape == (0,)


def test_zero_length_trajectories():
    kw = packed(lengths=(0, 3, 0, 1, 0))
    kw["advantages"] = torch.tensor([5.0, -1.0, 7.0, 2.0, 3.0])
    kw["roles"] = torch.tensor([1, 2, 0, 1])
    out = call(kw)
    assert out.advantages.shape == (4,) and out.baseline.shape == (5,)
    assert bool(torch.isfinite(out.weights).all()) and bool((out.weights > 0).all())
    assert out.baseline[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    # A trajectory of one token has mean weight 1: its weight is 1.
    assert out.weights[3].item() == pytest.approx(1.0)


def test_all_zero_length_padded():
    kw = padded(b=3, t=4)
    kw["mask"] = torch.zeros(3, 4, dtype=torch.bool)
    kw["logp"] = torch.full((3, 4), NAN)  # nothing is read
    out = call(kw)
    assert bool((out.weights == 0).all()) and bool((out.advantages == 0).all())
    assert out.baseline.tolist() == [0.0, 0.0, 0.0]


# Bounded messages (issue 25): an input is described by type, shape, dtype and a few values, never printed whole.
BIG = [[-0.5] * 512 for _ in range(64)]  # the reproducer: a Python list of 64×512 numbers as `logp`
MAX_MESSAGE = 400


def _message(fn) -> str:
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("entry", [
    pytest.param(lambda: call(padded(b=64, t=512), logp=BIG), id="role_aware_advantages-logp"),
    pytest.param(lambda: contrast(BIG, torch.zeros(64, 512)), id="contrast-logp"),
    pytest.param(lambda: grpo_advantages(BIG[0], torch.zeros(512, dtype=torch.long)), id="grpo_advantages-rewards"),
])
def test_list_input_message_is_bounded(entry):
    message = _message(entry)
    assert len(message) <= MAX_MESSAGE, f"{len(message)} characters: {message[:300]}..."
    assert "must be a torch.Tensor" in message and "list" in message
    assert "64×512" in message or "512" in message  # the shape, not the values


def test_reproducer_names_argument_and_shape():
    message = _message(lambda: call(padded(b=64, t=512), logp=BIG))
    assert len(message) <= MAX_MESSAGE
    for fragment in ("role_aware_advantages", "`logp`", "must be a torch.Tensor", "nested list (64×512 of float)",
                     "-0.5", "torch.as_tensor"):
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("field", ["beta_perception", "weight_map"])
def test_config_value_message_is_bounded(field):
    message = _message(lambda: SRPOConfig(**{field: BIG}))
    assert len(message) <= MAX_MESSAGE and f"`{field}`" in message and "64×512" in message


def test_long_string_option_is_bounded():
    message = _message(lambda: grpo_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), norm="x" * 10_000))
    assert len(message) <= MAX_MESSAGE and "`norm`" in message and "'std' or 'none'" in message


def test_short_values_still_shown_exactly():
    message = _message(lambda: SRPOConfig(weight_map="blur"))
    assert "got 'blur'" in message
