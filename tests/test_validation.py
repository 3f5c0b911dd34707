"""What every entry point's validation shares: meta tensors are refused by every op that reads values, naming the op and
the argument; an input in an error message is described by type, shape, dtype and a few values, never printed whole."""

from __future__ import annotations

import pytest
import torch
from srpo_core_test_checks import _tokenizer, call, padded, raises  # tests/_checks.py

from srpo_core import SRPOConfig, grpo_advantages, role_aware_advantages
from srpo_core.ablation import ablate_span
from srpo_core.advantages import contrast
from srpo_core.corruption import corrupt_images, corrupt_pixel_values
from srpo_core.presets import papo_perception_kl, vppo_advantages
from srpo_core.roles import roles_from_token_ids


# -- meta tensors are refused by every op that reads values (D88) ----------------------------------------------------
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


# -- bounded messages: an input is described by type, shape, dtype and a few values, never printed whole -------------
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
