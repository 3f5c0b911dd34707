"""The token-weight view in the trainer's loggers (``explain_every`` with ``report_to`` naming tensorboard or wandb).

Neither tensorboard nor wandb is installed here: a recording ``SummaryWriter`` (as ``torch.utils.tensorboard``) and a
recording ``wandb`` module are put where transformers' ``TensorBoardCallback`` / ``WandbCallback`` import them, and
their availability checks report them present, so ``report_to`` builds the real callbacks around the fakes.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import pathlib
import sys
import types
import warnings
from unittest import mock

import pytest
import torch

pytest.importorskip("trl")
integration_utils = pytest.importorskip("transformers.integrations.integration_utils")

from srpo_core import Role  # noqa: E402
from srpo_core.adapters.trl import SRPOGRPOTrainer, SRPOTrainerOptions  # noqa: E402


def _e2e():
    spec = importlib.util.spec_from_file_location("srpo_test_trl_e2e", pathlib.Path(__file__).with_name(
        "test_trl_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


E2E = _e2e()


@pytest.fixture
def tensorboard(monkeypatch):
    """``torch.utils.tensorboard.SummaryWriter`` replaced by a recorder; returns the list of its calls."""
    calls = []

    class SummaryWriter:
        def __init__(self, log_dir=None, **kwargs):
            calls.append(("init", log_dir))

        def add_text(self, tag, text, global_step=None):
            calls.append(("text", tag, text, global_step))

        def add_scalar(self, tag, value, global_step=None):
            calls.append(("scalar", tag, value, global_step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: True)
    return calls


@pytest.fixture
def wandb(monkeypatch):
    """A ``wandb`` module recording ``log``; ``Html`` keeps the page it wraps."""

    class Html:
        def __init__(self, data, inject=True):
            self.html = data

    module = mock.MagicMock(name="wandb")
    module.Html = Html
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # importlib.util.find_spec reads it (TRL does)
    monkeypatch.setitem(sys.modules, "wandb", module)
    config_util = types.ModuleType("wandb.sdk.lib.config_util")  # WandbCallback.setup imports its ConfigError
    config_util.ConfigError = type("ConfigError", (Exception,), {})
    for name in ("wandb.sdk", "wandb.sdk.lib"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "wandb.sdk.lib.config_util", config_util)
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    # TRL's modules imported wandb at their own import when it was there; it was not, so they get it now
    for name in ("trl.extras.profiling", "trl.trainer.grpo_trainer", "trl.trainer.base_trainer"):
        monkeypatch.setattr(importlib.import_module(name), "wandb", module, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return module


def train(report_to, explain_every, tmp_path, steps=2):
    processor = E2E.build_processor()
    args = E2E.grpo_args(processor.tokenizer, report_to=report_to, max_steps=steps, output_dir=str(tmp_path))
    opts = SRPOTrainerOptions(roles_fn=E2E.half_perception_half_reasoning, explain_every=explain_every,
                              explain_dir=str(tmp_path / "rollouts"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SRPOGRPOTrainer(model=E2E.build_model(processor.tokenizer), reward_funcs=E2E.rule_reward,
                                  args=args, train_dataset=E2E.build_dataset(), processing_class=processor,
                                  srpo_options=opts)
        trainer.train()
    return trainer


def test_tensorboard_gets_an_annotated_table_per_explained_step(tensorboard, tmp_path):
    trainer = train(["tensorboard"], 1, tmp_path)
    views = [c for c in tensorboard if c[0] == "text" and c[1] == "srpo/token_weights"]
    assert [c[3] for c in views] == [1, 2], tensorboard  # one per logged step, at the trainer's global step
    text = views[-1][2]
    last = trainer._srpo_last
    # the last view shows the first response of the last step with the trainer's own weights, role by role
    mask, roles, w = last.mask[0], last.scored_roles[0], last.result.weights[0]
    row = next(line for line in text.splitlines() if line.startswith("| 0 #r0-0 "))
    marks = [f"⟨{'P' if r == Role.PERCEPTION else 'R'} {x:.2f}⟩" for r, x in zip(roles[mask].tolist(),
                                                                                 w[mask].tolist(), strict=True)
             if r != Role.OTHER]
    assert marks and all(m in row for m in marks), (marks, row)
    assert f"{float(last.sequence_advantages[0]):+.3f}" in row
    assert "| perception |" in text and "| reasoning |" in text
    assert any(c[0] == "scalar" and c[1] == "train/srpo/w_std" for c in tensorboard)  # TRL's own logs still flow


def test_wandb_gets_the_html_page(wandb, tmp_path):
    trainer = train(["wandb"], 2, tmp_path, steps=3)
    logged = [c.args[0] for c in wandb.log.call_args_list if "srpo/token_weights" in c.args[0]]
    assert [d["train/global_step"] for d in logged] == [1, 3]  # explain_every=2: generation steps 1 and 3
    page = logged[-1]["srpo/token_weights"].html
    assert page.startswith("<!doctype html>") and "#r0-0" in page
    last = trainer._srpo_last
    first = last.mask[0] & (last.scored_roles[0] != Role.OTHER)
    weight = float(last.result.weights[0][first][0])
    assert f"w={weight:.3f}" in page  # the trainer's weight in the first role token's hover text


def test_no_logger_no_view(tmp_path):
    """``report_to=[]``: explain_every still writes the files, and the view has nowhere to go (no error)."""
    trainer = train([], 1, tmp_path, steps=1)
    assert trainer._srpo_view is not None and trainer._srpo_view.loggers() == ([], [])
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step-000000-rank0.jsonl"]
    assert torch.isfinite(trainer._srpo_last.result.weights).all()


def test_markdown_table_survives_any_token():
    """Tokens holding pipes, markup or line breaks stay inside their cell: every row has the header's 4 columns."""
    import re

    from srpo_core import SRPOConfig
    from srpo_core.render import analyse, to_markdown
    from srpo_core.rollouts import to_batch

    tokens = ["a|b", "*x*", "\n", "<b>", "`c`", "[l](u)", "\\"]
    records = [{"prompt_id": "q|1", "tokens": tokens, "roles": [1, 1, 2, 2, 0, 2, 1], "advantage": adv,
                "logp": [-1.0, -2.0, -0.5, -1.5, -1.0, -0.2, -3.0],
                "logp_corrupt": [-1.5 - k, -2.2, -0.5, -1.5, -1.0, -0.2, -2.0],
                "logp_ablated": [-1.0, -2.0, -0.9 + k, -1.1, -1.0, -0.6, -3.0]} for k, adv in ((0.0, 1.0), (0.3, -1.0))]
    text = to_markdown(analyse(to_batch(records), SRPOConfig()))
    rows = [line for line in text.splitlines() if line.startswith("| q")]
    assert len(rows) == 2
    for row in rows:
        assert len(re.findall(r"(?<!\\)\|", row)) == 5, row  # 4 cells, no pipe leaked from a token
        assert "\n" not in row and "⏎" in row and "a\\|b⟨P" in row
