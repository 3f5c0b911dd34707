"""srpo-core: role-aware token-level advantages (SRPO) for RL on vision-language models."""

from srpo_core._validate import ImplausibleInputWarning
from srpo_core.ablation import AblatedBatch, ablate_span
from srpo_core.advantages import contrast, grpo_advantages
from srpo_core.config import Role, SRPOConfig
from srpo_core.corruption import corrupt_images, corrupt_pixel_values
from srpo_core.ops.linear_token_contrast import linear_token_contrast
from srpo_core.ops.linear_token_logprobs import linear_token_logprobs
from srpo_core.ops.policy_loss import PolicyLossOutput, linear_policy_loss
from srpo_core.ops.role_aware_advantages import RoleAwareAdvantages, role_aware_advantages
from srpo_core.ops.token_contrast import TokenContrast, token_contrast
from srpo_core.ops.token_logprobs import token_logprobs
from srpo_core.presets import VPPOAdvantages, papo_perception_kl, vppo_advantages
from srpo_core.roles import roles_from_text, roles_from_token_ids

__all__ = [
    "ImplausibleInputWarning",
    "PolicyLossOutput",
    "linear_policy_loss",
    "linear_token_logprobs",
    "token_logprobs",
    "VPPOAdvantages",
    "papo_perception_kl",
    "vppo_advantages",
    "TokenContrast",
    "linear_token_contrast",
    "token_contrast",
    "AblatedBatch",
    "ablate_span",
    "corrupt_images",
    "corrupt_pixel_values",
    "roles_from_text",
    "roles_from_token_ids",
    "Role",
    "RoleAwareAdvantages",
    "SRPOConfig",
    "contrast",
    "grpo_advantages",
    "role_aware_advantages",
]
__version__ = "0.1.0"
