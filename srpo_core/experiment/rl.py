"""RL from the warm start: TRL's ``GRPOTrainer`` (GRPO) and srpo-core's ``SRPOGRPOTrainer`` (SRPO, its β ablations,
and the VPPO and PAPO presets), same data, budget and seeds; then the held-out evaluation of each run.

The reward is answer correctness (1 or 0) parsed from the completion; nothing else (no format or length terms), so
every method optimises the same objective and differs only in how it spreads the sequence advantage over tokens (or,
for PAPO, in its extra loss terms).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import tempfile
import time
import warnings

import torch

from srpo_core.ablation import ABLATION_MODES, DEFAULT_ABLATION_MODE
from srpo_core.config import SRPOConfig
from srpo_core.experiment.evaluate import evaluate
from srpo_core.experiment.model import padding_side, prompt_messages, suppressed_ids
from srpo_core.experiment.task import Sample, parse

# "srpo" runs the default reasoning mode; "srpo_<mode>" each other one (issue 23)
OTHER_MODES = tuple(m for m in ABLATION_MODES if m != DEFAULT_ABLATION_MODE)
METHODS = ("grpo", "srpo", *(f"srpo_{m}" for m in OTHER_MODES), "srpo_beta_p0", "srpo_beta_r0", "vppo", "papo")


@dataclasses.dataclass(frozen=True)
class RLBudget:
    """The budget every method gets: ``steps`` optimizer steps of ``prompts × generations`` completions at a constant
    learning rate, KL coefficient ``beta`` to the warm start (issue 23 fixes G = 8, 8 prompts, lr 3e-4, β 0.02,
    240 steps)."""

    steps: int = 240
    prompts: int = 8
    generations: int = 8
    max_completion_length: int = 28
    lr: float = 3e-4
    temperature: float = 1.0
    beta: float = 0.02
    lr_scheduler: str = "constant"


def answer_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the ``<answer>`` span equals the ground truth, else 0.0."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(parse(t)[1] == a) for t, a in zip(texts, answer, strict=True)]


def dataset(samples: list[Sample]):
    import datasets

    return datasets.Dataset.from_list([{"prompt": prompt_messages(s.question), "image": s.image(),
                                        "answer": s.answer} for s in samples])


def trainer_for(method: str, model, processor, train, args):
    """The trainer of ``method`` (``GRPOTrainer`` for ``grpo``, ``SRPOGRPOTrainer`` otherwise)."""
    from trl import GRPOTrainer

    from srpo_core.adapters.trl import SRPOGRPOTrainer, SRPOTrainerOptions

    common = dict(model=model, reward_funcs=answer_reward, args=args, train_dataset=train, processing_class=processor)
    if method == "grpo":
        return GRPOTrainer(**common)
    config, options = SRPOConfig(), SRPOTrainerOptions()
    if method in tuple(f"srpo_{m}" for m in OTHER_MODES):
        options = SRPOTrainerOptions(ablation_mode=method[len("srpo_"):])
    elif method == "srpo_beta_p0":
        config = SRPOConfig(beta_perception=0.0)
    elif method == "srpo_beta_r0":
        config = SRPOConfig(beta_reasoning=0.0)
    elif method in ("vppo", "papo"):
        options = SRPOTrainerOptions.preset(method)
    elif method != "srpo":
        raise ValueError(f"trainer_for: `method` must be one of {METHODS}, got {method!r}")
    return SRPOGRPOTrainer(**common, srpo_config=config, srpo_options=options)


def _args(processor, budget: RLBudget, seed: int):
    from trl import GRPOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="srpo-exp-"),
            per_device_train_batch_size=budget.prompts * budget.generations, num_generations=budget.generations,
            max_completion_length=budget.max_completion_length,
            max_steps=budget.steps, learning_rate=budget.lr, lr_scheduler_type=budget.lr_scheduler, beta=budget.beta,
            temperature=budget.temperature, use_cpu=True, report_to=[],
            bf16=False, logging_steps=1, save_strategy="no", seed=seed, data_seed=seed, disable_tqdm=True,
            generation_kwargs={"suppress_tokens": suppressed_ids(processor.tokenizer)},
        )


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def _mean_logs(history: list[dict]) -> dict:
    """Mean over logged steps of every numeric metric (reward, SRPO weight statistics per role, VPPO/PAPO terms)."""
    sums: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch") and v == v:
                sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def run_method(method: str, warm_model, processor, train: list[Sample], test: list[Sample], *, seed: int,
               budget: RLBudget, eval_seed: int = 12345, sample_k: int = 4) -> dict:
    """One RL run from a copy of ``warm_model``; returns the held-out metrics, the logged means and step times."""
    model = copy.deepcopy(warm_model)
    if budget.beta:  # TRL loads its reference model from the config's path: the warm start, saved once per run
        ref_dir = tempfile.mkdtemp(prefix="srpo-exp-ref-")
        with contextlib.redirect_stderr(io.StringIO()):  # the save's progress bar
            warm_model.save_pretrained(ref_dir)
        model.config._name_or_path = ref_dir
    model.train()
    args = _args(processor, budget, seed)
    # TRL prints every log row when its progress bar is off: keep the study's own progress bars readable
    quiet = io.StringIO()
    # TRL left-pads prompt_ids but takes mm_token_type_ids from the processor's own padding (D238): left for RL
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), \
            padding_side(processor, "left"):
        warnings.simplefilter("ignore")
        trainer = trainer_for(method, model, processor, dataset(train), args)
        timer = _step_timer()
        trainer.add_callback(timer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    history = [row for row in trainer.state.log_history if "loss" in row or "reward" in row]
    metrics = evaluate(trainer.model, processor, test, corruption_seed=eval_seed, sample_k=sample_k)
    rewards = [row["reward"] for row in history if "reward" in row]
    del trainer
    torch.set_grad_enabled(True)
    return {"method": method, "seed": seed, "eval": metrics, "train_seconds": seconds,
            "step_seconds": timer.times, "logged": _mean_logs(history), "reward_curve": rewards}
