"""Regression tests for the findings of issue 14's fuzz run (one test per finding, in the issue's numbering; finding 4,
``token_contrast``'s NaN, belongs to that op's owners and is fuzzed in ``test_fuzz_logprob_ops.py``)."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

from srpo_core import (
    SRPOConfig,
    ablate_span,
    contrast,
    corrupt_images,
    corrupt_pixel_values,
    grpo_advantages,
    papo_perception_kl,
    role_aware_advantages,
    roles_from_text,
    roles_from_token_ids,
    vppo_advantages,
)
from srpo_core.rollouts import RolloutError, parse_lines

INF = math.inf


@contextlib.contextmanager
def raises(exc, *fragments: str):
    with pytest.raises(exc) as info:
        yield info
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, f"message {str(info.value)!r} lacks {missing}"


# -- 1. contrast validates clamp / k3_max ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clamp", "k3_max"])
@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan, INF, 1e300, "3", True, None])
def test_contrast_validates_clamp_and_k3_max(name, value):
    a, b = torch.zeros(3), torch.tensor([-1.0, -INF, 0.0])
    with raises(ValueError, "contrast", f"`{name}`"):
        contrast(a, b, "k3", **{name: value})


def test_contrast_accepts_its_bounds():
    out = contrast(torch.zeros(2), torch.tensor([-INF, -1.0]), "logratio", clamp=1e15)
    assert out.tolist() == [torch.tensor(1e15).item(), 1.0]  # 1e15 rounded to float32


# -- 2. corrupt_pixel_values -----------------------------------------------------------------------------------------
def _pixels(dtype=torch.float32):
    grid = torch.tensor([[1, 2, 2]])
    return torch.randn(4, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)).to(dtype), grid


@pytest.mark.parametrize("std", [(0.0, 0.5, 0.5), (-0.1, 0.5, 0.5), (math.nan, 0.5, 0.5), (INF, 0.5, 0.5)])
def test_corrupt_pixel_values_rejects_bad_std(std):
    pv, grid = _pixels()
    with raises(ValueError, "corrupt_pixel_values", "`image_std`"):
        corrupt_pixel_values(pv, grid, mode="black", p=1.0, image_std=std)


@pytest.mark.parametrize("name", ["merge_size", "patch_size", "temporal_patch_size"])
@pytest.mark.parametrize("value", [1.5, 0, -2, True, "2"])
def test_corrupt_pixel_values_rejects_bad_sizes(name, value):
    pv, grid = _pixels()
    with raises(ValueError, "corrupt_pixel_values", f"`{name}`"):
        corrupt_pixel_values(pv, grid, **{name: value})


def test_corrupt_pixel_values_never_writes_non_finite_pixels():
    pv, grid = _pixels(torch.float16)
    # -0.48 / 1e-6 is finite in float64 but not in float16: refused rather than written as -inf.
    with raises(ValueError, "corrupt_pixel_values", "not finite in torch.float16"):
        corrupt_pixel_values(pv, grid, mode="black", p=1.0, image_std=(1e-6, 0.5, 0.5))
    for mode in ("black", "mean", "noise"):
        out = corrupt_pixel_values(pv, grid, mode=mode, p=1.0, generator=torch.Generator().manual_seed(1))
        assert bool(torch.isfinite(out).all())


# -- 3. extreme configs: refused at construction, or finite weights > 0 -----------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"eps": 1e-300}, {"u_max": 1e30}, {"beta_perception": 1e300}, {"beta_reasoning": 1e7},
    {"beta_perception": 10.0, "u_max": 3.0}, {"w_min": 1e-300}, {"clamp": 1e16}, {"k3_max": 1e300},
])
def test_config_refuses_what_float32_cannot_keep_finite(kwargs):
    with raises(ValueError, "SRPOConfig", f"`{next(iter(kwargs))}`"):
        SRPOConfig(**kwargs)


EDGE_CONFIGS = [
    SRPOConfig(eps=1e-30, u_max=20.0, beta_perception=1.0, beta_reasoning=1.0, standardize=standardize,
               weight_map=weight_map, renorm=renorm, w_min=1e-6)
    for standardize, weight_map, renorm in itertools.product(("none", "batch"), ("exp", "linear", "sigmoid"),
                                                             ("mean", "none"))
] + [SRPOConfig(u_max=1e6, beta_perception=2e-5, beta_reasoning=0.0, clamp=1e15, k3_max=1e15, standardize="none"),
     SRPOConfig(u_max=1e-6, beta_perception=1e6, beta_reasoning=1e6)]


@pytest.mark.parametrize("config", EDGE_CONFIGS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("t", [0, 1, 5])
def test_extreme_accepted_configs_keep_weights_finite_and_positive(config, backend, t):
    g = torch.Generator().manual_seed(t)
    b = 3
    logp = -torch.rand(b, t, generator=g) * 30
    logp[:, :1] = -INF  # driven to the clamp
    kw = {
        "advantages": torch.tensor([1.0, -2.0, 0.5]),
        "logp": logp,
        "logp_corrupt": -torch.rand(b, t, generator=g) * 30,
        "logp_ablated": -torch.rand(b, t, generator=g) * 30,
        "roles": torch.randint(0, 3, (b, t), generator=g),
        "mask": torch.ones(b, t, dtype=torch.bool),
    }
    out = role_aware_advantages(**kw, config=config, backend=backend)
    assert bool(torch.isfinite(out.weights).all()) and bool((out.weights > 0).all())
    assert bool(torch.isfinite(out.advantages).all())
    assert torch.equal(torch.sign(out.advantages), torch.sign(kw["advantages"])[:, None].expand(b, t))


# -- 5 / 8. roles_from_text offsets and tags -------------------------------------------------------------------------
@pytest.mark.parametrize("offsets", [
    [(0, 0, 0), (0, 0, 0)], [(0.5, 1.7)], None, [0, 1, 2, 3], [(0, 1), (2,)], "0,1", [("0", "1")], [(True, 1)],
    torch.tensor([[0.0, 1.0]]), torch.zeros(2, 3, dtype=torch.int64), {(0, 1)},
])
def test_roles_from_text_refuses_bad_offsets(offsets):
    with raises(TypeError, "roles_from_text", "`offsets`"):
        roles_from_text("<think>ab</think>", offsets)


def test_roles_from_text_offsets_out_of_range_and_huge():
    with raises(ValueError, "roles_from_text", "`offsets`"):
        roles_from_text("abc", [(0, 4)])
    with raises(ValueError, "roles_from_text", "`offsets`"):
        roles_from_text("abc", [(0, 2**70)])
    assert roles_from_text("abc", []).roles.tolist() == []
    assert roles_from_text("abc", torch.tensor([[0, 3]])).roles.tolist() == [0]


@pytest.mark.parametrize("tags", [(None,), "think", ("",), (3,), None])
def test_roles_from_text_refuses_bad_tags(tags):
    with raises(TypeError, "roles_from_text", "`perception_tags`"):
        roles_from_text("<think>ab</think>", [(0, 1)], perception_tags=tags)


# -- 6 / 9. roles_from_token_ids ids against the vocabulary -----------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))


@pytest.mark.parametrize("bad", [3, -1, -100, 2**40])
def test_roles_from_token_ids_refuses_ids_outside_the_vocabulary(bad):
    ids = torch.tensor([[0, 1, bad]])
    with raises(ValueError, "roles_from_token_ids", "`token_ids`", "[0, 3)", "(0, 2)"):
        roles_from_token_ids(ids, _tokenizer())
    # Outside the mask the same id is never read.
    out = roles_from_token_ids(ids, _tokenizer(), mask=torch.tensor([[True, True, False]]))
    assert out.roles.tolist() == [[0, 0, 0]]


# -- 7. meta tensors are refused by every op that reads values (D88) ---------------------------------------------------
def _meta_calls():
    m = torch.device("meta")
    f, i, b = (lambda *s: torch.zeros(*s, device=m)), (lambda *s: torch.zeros(*s, dtype=torch.int64, device=m)), \
        (lambda *s: torch.ones(*s, dtype=torch.bool, device=m))
    return {
        "role_aware_advantages": lambda: role_aware_advantages(f(2), f(2, 3), f(2, 3), f(2, 3), i(2, 3), mask=b(2, 3)),
        "contrast": lambda: contrast(f(3), f(3)),
        "grpo_advantages": lambda: grpo_advantages(f(3), i(3)),
        "ablate_span": lambda: ablate_span(i(2, 3), i(2, 3), b(2, 3)),
        "corrupt_pixel_values": lambda: corrupt_pixel_values(f(4, 1176), torch.tensor([[1, 2, 2]], device=m)),
        "corrupt_images": lambda: corrupt_images(f(3, 8, 8)),
        "roles_from_token_ids": lambda: roles_from_token_ids(i(1, 3), _tokenizer()),
        "vppo_advantages": lambda: vppo_advantages(f(2), f(2, 3), f(2, 3), mask=b(2, 3)),
        "papo_perception_kl": lambda: papo_perception_kl(f(2, 3), f(2, 3), mask=b(2, 3)),
    }


@pytest.mark.parametrize("op", sorted(_meta_calls()))
def test_meta_tensors_are_refused_with_the_op_and_argument(op):
    with raises(ValueError, f"{op}: `", "is a meta tensor"):
        _meta_calls()[op]()


# -- 10. ablate_span ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", ["0", None, 1.0, True])
def test_ablate_span_pad_token_id_must_be_an_int(pad):
    ids = torch.tensor([[5, 6, 7]])
    with raises(TypeError, "ablate_span", "`pad_token_id`"):
        ablate_span(ids, torch.ones_like(ids), torch.tensor([[False, True, False]]), pad_token_id=pad)


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_ablate_span_outside_attention_mask_is_an_error(mode):
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]])
    attn = torch.tensor([[1, 1, 0], [0, 0, 0]])
    span = torch.tensor([[False, False, True], [True, True, True]])
    with raises(ValueError, "ablate_span", "`span_mask`", "`attention_mask`", "(0, 2)"):
        ablate_span(ids, attn, span, mode=mode)


def test_ablate_span_pad_token_id_must_fit_the_dtype():
    ids = torch.tensor([[5, 6, 7]], dtype=torch.int32)
    with raises(ValueError, "ablate_span", "`pad_token_id`"):
        ablate_span(ids, torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.bool), pad_token_id=2**40)


# -- 11. the rollouts reader -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [10**5, 10**6])
def test_rollouts_deeply_nested_json_names_the_line(depth):
    lines = ['', "[" * depth]
    with raises(RolloutError, "x.jsonl:2", "nested too deeply"):
        parse_lines(lines, "x.jsonl")


def test_ablate_span_every_token_in_the_span():
    """Found by the fuzz suite: a batch whose rows are all span leaves an empty ablated batch; gather gives the fill."""
    ab = ablate_span(torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.int64), torch.ones(1, 2, dtype=torch.bool),
                     mode="drop")  # the default is "mask" since D180; "drop" is the mode that empties the row
    assert ab.input_ids.shape == (1, 0)
    assert ab.gather(torch.zeros(1, 0), fill=-1.0).tolist() == [[-1.0, -1.0]]
