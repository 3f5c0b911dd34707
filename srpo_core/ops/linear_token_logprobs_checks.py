"""Moved: the checks of the log-prob ops live in :mod:`srpo_core._validate` (this module stays for one release, for
``srpo_core/ops/policy_loss.py`` until it imports them from there)."""

from srpo_core._validate import AUTOCAST_DEVICES, autocast_dtype

__all__ = ["AUTOCAST_DEVICES", "autocast_dtype"]
