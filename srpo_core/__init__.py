"""srpo-core: role-aware token-level advantages (SRPO) for RL on vision-language models."""

from srpo_core.advantages import RoleAwareAdvantages, contrast, grpo_advantages, role_aware_advantages
from srpo_core.config import Role, SRPOConfig

__all__ = [
    "Role",
    "RoleAwareAdvantages",
    "SRPOConfig",
    "contrast",
    "grpo_advantages",
    "role_aware_advantages",
]
__version__ = "0.1.0"
