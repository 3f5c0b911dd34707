"""A miniature, reproducible grounded-reasoning study of SRPO's signals and weights (issue 13).

One idea per module: :mod:`~srpo_core.experiment.task` (the synthetic visual task), :mod:`~srpo_core.experiment.model`
(tiny Qwen2-VL and local tokenizer), :mod:`~srpo_core.experiment.sft` (warm start), :mod:`~srpo_core.experiment.
evaluate` (held-out metrics), :mod:`~srpo_core.experiment.signals` (signal validity), :mod:`~srpo_core.experiment.rl`
(GRPO / SRPO / ablations / VPPO / PAPO runs), :mod:`~srpo_core.experiment.study` (the phases) and
:mod:`~srpo_core.experiment.report` (``docs/experiment.md`` and plots from the JSON). Needs the ``trl`` extra.
"""

from srpo_core.experiment.study import FULL, QUICK, SMOKE, StudyConfig, run

__all__ = ["FULL", "QUICK", "SMOKE", "StudyConfig", "run"]
