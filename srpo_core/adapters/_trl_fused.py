"""``SRPOTrainerOptions(fused_loss=True)``: TRL's GRPO loss computed by :func:`srpo_core.linear_policy_loss` from the
model's last hidden state (the way TRL's old ``use_liger_kernel`` path fed Liger's fused GRPO loss), so the LM head's
gradients are formed in the loss's own forward and SRPO's ``[B, T]`` advantages reach it as they are.

TRL 1.16's ``_compute_loss`` is reproduced for the settings it shares with the fused op (token-level importance
sampling, PPO-clip with ``epsilon_low``/``epsilon_high``, TRL's k3 KL with ``beta``, temperature) and its four clipped
loss types, each an aggregation of the op:

| TRL ``loss_type`` | ``loss_agg_mode`` | normaliser |
|---|---|---|
| ``grpo`` | ``seq-mean-token-mean`` | ÷ gradient-accumulation steps |
| ``bnpo`` | ``token-mean`` | ÷ gradient-accumulation steps |
| ``dr_grpo`` | ``seq-mean-token-sum-norm`` | ``B · max_completion_length`` · accumulation steps |
| ``dapo`` | ``seq-mean-token-sum-norm`` | TRL's ``num_items_in_batch`` normaliser |

Anything else (other loss types, sequence-level importance sampling, ``delta``, entropy masks or bonus, off-policy
masks, vLLM importance-sampling correction, MoE aux loss) is refused at construction with the setting's name.
"""

from __future__ import annotations

import torch

from srpo_core.adapters._trl_passes import _MM_KEYS as _MODEL_KEYS
from srpo_core.config import PolicyLossConfig
from srpo_core.ops.policy_loss import linear_policy_loss

LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
              "dapo": "seq-mean-token-sum-norm"}


def _head_transform(model) -> str:
    """A logit transform after the LM head that the fused loss would skip (Gemma-2's soft-capping, Cohere's scale)."""
    cfg = getattr(model, "config", None)
    for sub in (cfg, getattr(cfg, "text_config", None)):
        for name in ("final_logit_softcapping", "logit_scale"):
            value = getattr(sub, name, None)
            if value not in (None, 1.0):
                return f"{name}={value}"
    return ""


def check_supported(trainer) -> None:
    """Raise a ValueError naming the first TRL setting the fused loss does not reproduce."""
    args = trainer.args
    problems = [
        (trainer.loss_type not in LOSS_TYPES, f"loss_type={trainer.loss_type!r} (supported: {sorted(LOSS_TYPES)})"),
        (trainer.importance_sampling_level != "token",
         f"importance_sampling_level={trainer.importance_sampling_level!r}"),
        (getattr(args, "delta", None) is not None, f"delta={getattr(args, 'delta', None)!r}"),
        (trainer.top_entropy_quantile < 1.0, f"top_entropy_quantile={trainer.top_entropy_quantile!r}"),
        (getattr(trainer, "_entropy_bonus_enabled", False), "an entropy bonus (entropy_coef)"),
        (getattr(trainer, "off_policy_mask_threshold", None) is not None, "off_policy_mask_threshold"),
        (trainer.use_vllm and getattr(trainer, "vllm_importance_sampling_correction", False),
         "vllm_importance_sampling_correction"),
        (getattr(trainer, "aux_loss_enabled", False), "a MoE auxiliary loss"),
        # The fused path runs the backbone itself (model.base_model), outside DistributedDataParallel's forward,
        # whose reducer would then not all-reduce the gradients: one process only until that is wired and tested.
        (trainer.accelerator.num_processes > 1, f"multi-process training ({trainer.accelerator.num_processes} "
                                                "processes: the backbone would run outside DDP's forward)"),
        (hasattr(trainer.model, "peft_config"), "a PEFT model (its base_model is the adapter wrapper)"),
        (_head_transform(trainer.model), f"the model's logit transform ({_head_transform(trainer.model)}): the "
                                         "fused loss takes plain hidden @ lm_headᵀ logits"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"SRPOTrainerOptions(fused_loss=True) does not reproduce TRL's {what}; set "
                             f"fused_loss=False for it")


def compute_loss(trainer, model, inputs) -> torch.Tensor:
    """TRL's ``_compute_loss`` for one micro-batch, through the fused op (logs TRL's kl / entropy / clip metrics)."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    c = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    unwrapped = trainer.accelerator.unwrap_model(model)
    model_inputs = {k: inputs[k] for k in _MODEL_KEYS if inputs.get(k) is not None}
    with trainer.accelerator.autocast():
        out = unwrapped.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                   **model_inputs)
    hidden = out.last_hidden_state[:, -c - 1:-1]  # position t predicts completion token t
    head = unwrapped.get_output_embeddings()
    weight, bias = head.weight, head.bias
    hidden = hidden.to(weight.device)
    if trainer.args.cast_lm_head_to_fp32:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    mode = "train" if trainer.model.training else "eval"
    accum = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    agg = LOSS_TYPES[trainer.loss_type]
    # TRL's means over sequences count every row (B), verl's only the non-empty ones: say B (global_batch_size).
    scale_factor, divide, rows = None, accum, completion_ids.size(0)
    if trainer.loss_type == "dr_grpo":  # Σ loss / (B · max_completion_length · accum)
        scale_factor, divide = trainer.max_completion_length * accum, 1.0
    elif trainer.loss_type == "dapo":  # Σ loss / (TRL's token normaliser): one "sequence" of that many tokens
        scale_factor = float(inputs["num_items_in_batch"].clamp(min=1.0)) / trainer.accelerator.num_processes
        if mode == "train":
            scale_factor = scale_factor * accum / trainer.args.steps_per_generation
        divide, rows = 1.0, 1
    beta = trainer.beta
    res = linear_policy_loss(
        hidden, weight, completion_ids, inputs.get("old_per_token_logps"), inputs["advantages"],
        mask=mask.bool(), bias=bias, ref_logp=inputs["ref_per_token_logps"] if beta != 0.0 else None,
        config=PolicyLossConfig(
            epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high, beta=beta, kl_kind="k3",
            kl_ratio_correction=bool(getattr(trainer.args, "use_bias_correction_kl", False)),
            loss_agg_mode=agg, loss_scale_factor=scale_factor, global_batch_size=rows,
            temperature=trainer.temperature),
        return_entropy=True)
    loss = res.loss / divide if divide != 1.0 else res.loss

    def global_mean(x):
        n = mask.sum().float()
        totals = trainer.accelerator.reduce(torch.stack([x.detach().float() * n, n]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    m = res.metrics
    if beta != 0.0:
        trainer._metrics[mode]["kl"].append(global_mean(m["kl"]))
    trainer._metrics[mode]["entropy"].append(global_mean(m["entropy"]))
    trainer._metrics[mode]["clip_ratio/region_mean"].append(global_mean(m["clip_fraction"]))
    return loss
