"""srpo-core: role-aware token-level advantages (SRPO) for RL on vision-language models.

The top level holds what a trainer calls every step: the advantages (SRPO's and GRPO's baseline), their options and
role labels, the log-prob and contrast ops a trainer feeds them, and the fused policy loss. Everything else lives in a
named submodule: ``srpo_core.roles`` (labelling tokens), ``srpo_core.presets`` (VPPO, PAPO), ``srpo_core.ablation``
and ``srpo_core.corruption`` (the contrast passes' inputs), ``srpo_core.advantages`` (the elementwise ``contrast``).
"""

from srpo_core._validate import ImplausibleInputWarning
from srpo_core.advantages import grpo_advantages
from srpo_core.config import PolicyLossConfig, Role, SRPOConfig
from srpo_core.ops.linear_token_contrast import linear_token_contrast
from srpo_core.ops.linear_token_logprobs import linear_token_logprobs
from srpo_core.ops.policy_loss import PolicyLossOutput, linear_policy_loss
from srpo_core.ops.role_aware_advantages import RoleAwareAdvantages, role_aware_advantages
from srpo_core.ops.token_contrast import TokenContrast, token_contrast
from srpo_core.ops.token_logprobs import token_logprobs

__all__ = [
    # advantages and their options
    "role_aware_advantages",
    "RoleAwareAdvantages",
    "grpo_advantages",
    "SRPOConfig",
    "Role",
    # the ops a trainer feeds them
    "token_logprobs",
    "linear_token_logprobs",
    "token_contrast",
    "linear_token_contrast",
    "TokenContrast",
    # the fused policy loss
    "linear_policy_loss",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "ImplausibleInputWarning",
]
__version__ = "0.2.0"

# Names the top level exported in 0.1, and the submodule each lives in since 0.2. Importing one from the top level
# raises ImportError naming the new place for one release; then the entries go.
_MOVED = {
    "vppo_advantages": "presets",
    "VPPOAdvantages": "presets",
    "papo_perception_kl": "presets",
    "roles_from_text": "roles",
    "roles_from_token_ids": "roles",
    "TokenRoles": "roles",
    "ablate_span": "ablation",
    "AblatedBatch": "ablation",
    "corrupt_images": "corruption",
    "corrupt_pixel_values": "corruption",
    "contrast": "advantages",
}


def __getattr__(name: str):
    # ImportError, not AttributeError: `from srpo_core import x` turns an AttributeError from here into its own
    # "cannot import name" message and drops ours.
    if name in _MOVED:
        where = f"srpo_core.{_MOVED[name]}"
        raise ImportError(f"srpo_core.{name} moved to {where}.{name} in 0.2; import it from there "
                          f"(`from {where} import {name}`)", name=name)
    raise AttributeError(f"module 'srpo_core' has no attribute {name!r}")
