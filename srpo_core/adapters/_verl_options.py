"""The verl adapter's options: ``config.algorithm.srpo``, read into :class:`AdapterOptions` with every error naming
the Hydra key, and the estimator name of ``algorithm.adv_estimator``. Shared by the legacy and the v1 trainer's passes
(``_verl_passes``, ``_verl_v1``) and by :mod:`srpo_core.adapters.verl`; imports no verl."""

from __future__ import annotations

from srpo_core.adapters._common import AdapterOptions

CONFIG_KEY = "algorithm.srpo"


def options_from_config(config) -> AdapterOptions:
    """Options from ``config.algorithm.srpo`` (pass ``config.algorithm``: an OmegaConf node or a mapping; absent →
    defaults), every value parsed and checked, errors naming the Hydra key (``algorithm.srpo.corruption_p``)."""
    node = None
    if config is not None:
        node = config.get("srpo", None) if hasattr(config, "get") else getattr(config, "srpo", None)
    if node is not None and not isinstance(node, dict):
        try:
            from omegaconf import OmegaConf

            node = OmegaConf.to_container(node, resolve=True)
        except ImportError:  # pragma: no cover - verl always brings omegaconf
            node = dict(node)
    return AdapterOptions.from_mapping(node, where="srpo (verl)", spell=lambda k: f"{CONFIG_KEY}.{k}")


def _check_options(config) -> AdapterOptions:
    """Read ``config.algorithm.srpo`` once where the trainer is built, so a bad value fails before any rollout."""
    algorithm = config.get("algorithm", None) if hasattr(config, "get") else getattr(config, "algorithm", None)
    return options_from_config(algorithm)


def _estimator_name(adv_estimator) -> str:
    return str(getattr(adv_estimator, "value", adv_estimator))
