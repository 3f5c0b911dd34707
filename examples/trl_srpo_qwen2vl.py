"""SRPO with TRL's GRPO on Qwen2/2.5-VL, geometry3k-style data. The script a user runs on a GPU.

Lines that differ from a plain TRL GRPO vision-language script are marked ``# SRPO``: one import, the prompt format
(``<perception>…</perception><think>…</think>\\boxed{}``, so that the trainer can tell perception tokens from
reasoning tokens), ``SRPOGRPOConfig`` in place of ``GRPOConfig`` (SRPO's settings as ``--srpo_*`` flags or YAML keys)
and ``SRPOGRPOTrainer`` in place of ``GRPOTrainer``.

    pip install ".[trl]"        # in a clone of srpo-core (see its README)
    accelerate launch examples/trl_srpo_qwen2vl.py \\
        --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --dataset_name hiyouga/geometry3k \\
        --output_dir srpo-qwen2.5vl-3b --bf16 --dtype bfloat16 --per_device_train_batch_size 8 --num_generations 8 \\
        --max_completion_length 1024 --learning_rate 1e-6 --gradient_checkpointing --logging_steps 1 \\
        --srpo_beta_perception 0.5 --srpo_beta_reasoning 0.5 --srpo_corruption_p 0.5

Assumed columns (as in hiyouga/geometry3k): ``images`` (a list with one PIL image), ``problem`` (text, may contain an
``<image>`` placeholder) and ``answer``.
"""

from __future__ import annotations

import re

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser

from srpo_core.adapters.trl import SRPOGRPOConfig, SRPOGRPOTrainer  # SRPO

SYSTEM_PROMPT = (  # SRPO: perception first, then reasoning, then the boxed answer
    "First describe what you see in the image that matters for the question inside <perception> </perception> "
    "tags, then think step by step inside <think> </think> tags, and finally give the answer as \\boxed{...}."
)


def make_conversation(example):
    problem = example["problem"].replace("<image>", "").strip()
    return {
        "prompt": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]},
        ],
    }


BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
FORMAT = re.compile(r"^\s*<perception>.+?</perception>\s*<think>.+?</think>.*\\boxed\{.+\}\s*$", re.DOTALL)


def _text(completion):
    return completion[0]["content"] if isinstance(completion, list) else completion


def _normalise(s: str) -> str:
    return re.sub(r"\s+|\\!|\\,|\$|^\{|\}$", "", s).lower()


def format_reward(completions, **kwargs):
    """1 when the response follows <perception>…</perception><think>…</think>…\\boxed{…}."""
    return [1.0 if FORMAT.match(_text(c)) else 0.0 for c in completions]


def accuracy_reward(completions, answer, **kwargs):
    """1 when the last \\boxed{} equals the reference answer after light normalisation."""
    rewards = []
    for c, ref in zip(completions, answer, strict=True):
        boxed = BOXED.findall(_text(c))
        rewards.append(1.0 if boxed and _normalise(boxed[-1]) == _normalise(str(ref)) else 0.0)
    return rewards


def main():
    parser = TrlParser((ScriptArguments, SRPOGRPOConfig, ModelConfig))  # SRPO: SRPOGRPOConfig for GRPOConfig
    script_args, training_args, model_args = parser.parse_args_and_config()
    training_args.model_init_kwargs = {"dtype": model_args.dtype or "bfloat16",
                                       "attn_implementation": model_args.attn_implementation}

    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    dataset = dataset.map(make_conversation)
    train_dataset = dataset[script_args.dataset_train_split]
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None

    trainer = SRPOGRPOTrainer(  # SRPO: instead of GRPOTrainer
        model=model_args.model_name_or_path,
        args=training_args,
        reward_funcs=[format_reward, accuracy_reward],
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
