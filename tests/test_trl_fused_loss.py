"""``SRPOTrainerOptions(fused_loss=True)``: on the tiny Qwen2-VL of ``test_trl_e2e``, the fused loss equals TRL's own
``_compute_loss`` (loss and every parameter's gradient) on the same micro-batch, for each supported loss type."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("trl")


def _e2e():
    spec = importlib.util.spec_from_file_location("srpo_test_trl_e2e", pathlib.Path(__file__).with_name(
        "test_trl_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


E2E = _e2e()


@pytest.fixture(scope="module")
def trained():
    """One SRPO step with the fused loss; keeps the last micro-batch's inputs as ``_compute_loss`` saw them."""
    from srpo_core.adapters.trl import SRPOGRPOTrainer, SRPOTrainerOptions

    class Keeping(SRPOGRPOTrainer):
        def _compute_loss(self, model, inputs):
            self.kept = dict(inputs)
            return super()._compute_loss(model, inputs)

    processor = E2E.build_processor()
    args = E2E.grpo_args(processor.tokenizer, max_steps=1, beta=0.04)
    model = E2E.build_model(processor.tokenizer)
    ref_dir = tempfile.mkdtemp(prefix="srpo-trl-ref-")
    model.save_pretrained(ref_dir)  # beta > 0: TRL builds its reference model from the policy's path
    model.config._name_or_path = ref_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = Keeping(model=model, reward_funcs=E2E.rule_reward, args=args, train_dataset=E2E.build_dataset(),
                          processing_class=processor, srpo_options=SRPOTrainerOptions(fused_loss=True))
        trainer.train()
    return trainer


def _loss_and_grads(trainer, fused: bool, inputs):
    trainer.srpo_options = dataclasses.replace(trainer.srpo_options, fused_loss=fused)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_fused_loss_matches_trl(trained, loss_type):
    trainer, inputs = trained, trained.kept
    assert inputs["advantages"].dim() == 2, "SRPO's per-token advantages must reach the loss"
    assert "ref_per_token_logps" in inputs
    trainer.loss_type = loss_type
    try:
        loss_f, grads_f = _loss_and_grads(trainer, True, inputs)
        loss_t, grads_t = _loss_and_grads(trainer, False, inputs)
    finally:
        trainer.loss_type = "dapo"
        trainer.srpo_options = dataclasses.replace(trainer.srpo_options, fused_loss=True)
    torch.testing.assert_close(loss_f, loss_t, rtol=1e-5, atol=1e-7)
    assert grads_f.keys() == grads_t.keys() and len(grads_t) > 10
    scale = max(g.abs().max() for g in grads_t.values())
    for name, g in grads_t.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-5 * float(scale), msg=name)


def test_fused_loss_logs_trl_metrics(trained):
    # TRL clears its metrics when it logs, so the step's own entries are gone after train(): one more fused loss on
    # the kept micro-batch, on cleared metrics, must log them (this test depended on running after another before)
    trained.model.train()
    trained._metrics["train"].clear()
    trained._compute_loss(trained.model, trained.kept)
    metrics = trained._metrics["train"]
    for key in ("entropy", "kl", "clip_ratio/region_mean"):
        assert key in metrics and len(metrics[key]) > 0


def test_fused_loss_refuses_what_it_does_not_reproduce():
    from srpo_core.adapters.trl import SRPOGRPOTrainer, SRPOTrainerOptions

    processor = E2E.build_processor()
    args = E2E.grpo_args(processor.tokenizer, max_steps=1, loss_type="cispo")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="loss_type='cispo'"):
        warnings.simplefilter("ignore", FutureWarning)
        SRPOGRPOTrainer(model=E2E.build_model(processor.tokenizer), reward_funcs=E2E.rule_reward, args=args,
                        train_dataset=E2E.build_dataset(), processing_class=processor,
                        srpo_options=SRPOTrainerOptions(fused_loss=True))


@pytest.mark.parametrize("case, match", [
    ("ddp", "multi-process training"),
    ("peft", "a PEFT model"),
    ("softcap", "final_logit_softcapping=30.0"),
])
def test_fused_loss_refuses_what_it_would_get_wrong(case, match):
    """Settings where the fused path would silently differ from TRL: several processes (the backbone would run
    outside DDP's forward), a PEFT wrapper, a logit transform after the LM head."""
    from types import SimpleNamespace

    from srpo_core.adapters import _trl_fused

    model = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0 if case == "softcap" else None))
    if case == "peft":
        model.peft_config = {"default": None}
    trainer = SimpleNamespace(
        args=SimpleNamespace(delta=None), loss_type="grpo", importance_sampling_level="token",
        top_entropy_quantile=1.0, use_vllm=False, model=model,
        accelerator=SimpleNamespace(num_processes=2 if case == "ddp" else 1))
    with pytest.raises(ValueError, match=match):
        _trl_fused.check_supported(trainer)
    model.config.final_logit_softcapping = None
    trainer.accelerator.num_processes = 1
    if hasattr(model, "peft_config"):
        del model.peft_config
    _trl_fused.check_supported(trainer)  # the same trainer without the setting is accepted
