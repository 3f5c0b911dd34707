"""The top-level surface of ``srpo_core``: the names it exports, and the clear error for each name that moved."""

from __future__ import annotations

import importlib

import pytest

import srpo_core

# What a trainer calls every step, and nothing else (the decision record says why each one is here).
TOP_LEVEL = {
    "role_aware_advantages", "RoleAwareAdvantages", "grpo_advantages", "SRPOConfig", "Role",
    "token_logprobs", "linear_token_logprobs", "token_contrast", "linear_token_contrast", "TokenContrast",
    "linear_policy_loss", "PolicyLossConfig", "PolicyLossOutput", "ImplausibleInputWarning",
}
# Exported at the top level in 0.1; the submodule each lives in from 0.2.
MOVED = {
    "vppo_advantages": "presets", "VPPOAdvantages": "presets", "papo_perception_kl": "presets",
    "roles_from_text": "roles", "roles_from_token_ids": "roles", "TokenRoles": "roles",
    "ablate_span": "ablation", "AblatedBatch": "ablation",
    "corrupt_images": "corruption", "corrupt_pixel_values": "corruption",
    "contrast": "advantages",
}


def test_all_is_the_small_surface_and_every_name_resolves():
    assert len(srpo_core.__all__) == len(set(srpo_core.__all__)), "duplicates in __all__"
    assert set(srpo_core.__all__) == TOP_LEVEL
    namespace = {}
    exec("from srpo_core import *", namespace)
    assert TOP_LEVEL <= set(namespace)
    assert not set(MOVED) & set(namespace), "a moved name is still exported"


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_name_lives_in_its_submodule(name):
    module = importlib.import_module(f"srpo_core.{MOVED[name]}")
    assert hasattr(module, name), f"srpo_core.{MOVED[name]} has no {name}"
    assert name not in vars(srpo_core), f"srpo_core.{name} is still bound at the top level"


def _expected(name: str) -> str:
    return f"srpo_core.{name} moved to srpo_core.{MOVED[name]}.{name} in 0.2; import it from there"


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_name_from_import_raises_pointing_to_new_place(name):
    with pytest.raises(ImportError) as info:
        exec(f"from srpo_core import {name}", {})
    assert _expected(name) in str(info.value)
    assert f"from srpo_core.{MOVED[name]} import {name}" in str(info.value)


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_name_attribute_raises_pointing_to_new_place(name):
    with pytest.raises(ImportError) as info:
        getattr(srpo_core, name)
    assert _expected(name) in str(info.value)


def test_unknown_name_is_a_plain_attribute_error():
    assert not hasattr(srpo_core, "unknown")
    with pytest.raises(AttributeError, match="module 'srpo_core' has no attribute 'unknown'"):
        srpo_core.unknown  # noqa: B018
    with pytest.raises(ImportError, match="cannot import name 'unknown'"):
        exec("from srpo_core import unknown", {})


def test_token_roles_is_exported_by_roles():
    from srpo_core import roles

    assert "TokenRoles" in roles.__all__ and "roles_from_token_ids" in roles.__all__
    assert all(hasattr(roles, n) for n in roles.__all__)
