"""The TRL adapter's guard: a TRL outside the tested range is refused at import with an error naming the range
(``SRPO_ALLOW_UNTESTED_TRL=1`` makes it a warning), and so is a GRPOTrainer without the private methods it overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("trl")

from srpo_core.adapters import trl as adapter  # noqa: E402


def cpu(tmp_path) -> dict:
    return {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False}


def test_tested_versions_pass_and_others_are_refused(monkeypatch):
    monkeypatch.delenv(adapter.ALLOW_UNTESTED_ENV, raising=False)
    low, high = adapter.TESTED_TRL
    for ok in (f"{low}.0", f"{low}.3", f"{low}.1.post1"):
        adapter.check_trl_version(ok)
    for bad in (f"{high}.0", "1.15.2", "2.0.0", f"{high}.0.dev0"):
        with pytest.raises(ImportError, match=rf"tested with trl>={low},<{high}, and TRL {bad} is installed"):
            adapter.check_trl_version(bad)


def test_untested_version_only_warns_when_allowed(monkeypatch):
    monkeypatch.setenv(adapter.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="trying anyway"):
        adapter.check_trl_version("9.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.check_trl_version(f"{adapter.TESTED_TRL[0]}.0")  # a tested version says nothing


def test_missing_private_method_is_refused_whatever_the_version(monkeypatch):
    monkeypatch.setenv(adapter.ALLOW_UNTESTED_ENV, "1")

    class Trainer:
        def _generate_and_score_completions(self, inputs):
            return inputs

    with pytest.raises(ImportError, match="has no _get_per_token_logps_and_entropies"):
        adapter.check_trl_version(f"{adapter.TESTED_TRL[0]}.0", Trainer)


def test_importing_the_adapter_under_an_untested_trl_fails_clearly():
    code = "import trl; trl.__version__ = '99.0.0'\nimport srpo_core.adapters.trl"
    env = {k: v for k, v in os.environ.items() if k != adapter.ALLOW_UNTESTED_ENV}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: srpo_core.adapters.trl is tested with trl>=") and "99.0.0" in last, last


def test_srpo_grpo_config_from_the_command_line_and_yaml(tmp_path):
    from trl import TrlParser

    from srpo_core import SRPOConfig
    from srpo_core.adapters.trl import SRPOGRPOConfig, SRPOTrainerOptions

    parser = TrlParser((SRPOGRPOConfig,))
    (args,) = parser.parse_args_and_config(
        ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "False", "--srpo_beta_perception", "1.5",
         "--srpo_weight_map", "linear", "--srpo_perception_tags", "perception", "caption", "--srpo_seed", "7",
         "--beta", "0.04"])
    assert args.beta == 0.04  # GRPO's KL coefficient, untouched by SRPO's fields
    assert args.srpo_math_config() == SRPOConfig(beta_perception=1.5, weight_map="linear")
    assert args.srpo_trainer_options() == SRPOTrainerOptions(perception_tags=("perception", "caption"), seed=7)
    config = tmp_path / "srpo.yaml"
    config.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nbf16: false\n"
                      "srpo_beta_reasoning: 0.0\nsrpo_corruption_p: 0.25\nsrpo_ablation_mode: mask\n")
    (args,) = parser.parse_args_and_config(["--config", str(config)])
    assert args.srpo_math_config() == SRPOConfig(beta_reasoning=0.0)
    assert args.srpo_trainer_options() == SRPOTrainerOptions(corruption_p=0.25, ablation_mode="mask")
    # every SRPOConfig field has its flat twin, with the same default
    import dataclasses

    for f in dataclasses.fields(SRPOConfig):
        assert getattr(SRPOGRPOConfig(**cpu(tmp_path)), f"srpo_{f.name}") == f.default, f.name


def test_srpo_grpo_config_validates_and_settings_live_in_one_place(tmp_path):
    from srpo_core import SRPOConfig
    from srpo_core.adapters.trl import SRPOGRPOConfig, SRPOTrainerOptions, _resolve_srpo_settings

    with pytest.raises(ValueError, match="SRPOGRPOConfig: `--srpo_weight_map` must be one of"):
        SRPOGRPOConfig(**cpu(tmp_path), srpo_weight_map="cubic")
    with pytest.raises(ValueError, match=r"SRPOGRPOConfig: `--srpo_corruption_p` must be a number in \[0, 1\], "
                                         "got 2.0"):
        SRPOGRPOConfig(**cpu(tmp_path), srpo_corruption_p=2.0)
    args = SRPOGRPOConfig(**cpu(tmp_path), srpo_corruption_p=0.3)
    with pytest.raises(ValueError, match="do not also pass `srpo_config`"):
        _resolve_srpo_settings(args, SRPOConfig(), None)
    with pytest.raises(ValueError, match="srpo_options.corruption_p=0.7 disagrees with args.srpo_corruption_p=0.3"):
        _resolve_srpo_settings(args, None, SRPOTrainerOptions(corruption_p=0.7))

    def roles_fn(ids, mask, tok):
        return ids

    math, opts = _resolve_srpo_settings(args, None, SRPOTrainerOptions(corruption_p=0.3, roles_fn=roles_fn))
    assert opts.roles_fn is roles_fn and math == SRPOConfig()
    # fields srpo_options leaves at their defaults come from args: roles_fn alone is enough
    math, opts = _resolve_srpo_settings(args, None, SRPOTrainerOptions(roles_fn=roles_fn))
    assert opts.roles_fn is roles_fn and opts.corruption_p == 0.3
    # a plain GRPOConfig keeps the keyword arguments (and their defaults)
    from trl import GRPOConfig

    plain = GRPOConfig(**cpu(tmp_path))
    assert _resolve_srpo_settings(plain, None, None) == (SRPOConfig(), SRPOTrainerOptions())
    assert _resolve_srpo_settings(plain, SRPOConfig(u_max=2.0), None)[0].u_max == 2.0


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("srpo_beta_perception", -1.0, r"`--srpo_beta_perception` must be >= 0, got -1.0"),
    ("srpo_corruption_mode", "blur", r"`--srpo_corruption_mode` must be one of \('black', 'mean', 'noise'\), "
                                     "got 'blur'"),
    ("srpo_seed", "x", r"`--srpo_seed` must be an integer >= 0, got 'x'"),
    ("srpo_seed", -3, r"`--srpo_seed` must be an integer >= 0, got -3"),
    ("srpo_ablation_mode", "zero", r"`--srpo_ablation_mode` must be one of \('mask', 'drop', 'counterfactual', "
                                   r"'off'\), got 'zero'"),
    ("srpo_ablate_tags", "maybe", r"`--srpo_ablate_tags` must be a boolean \(true/false, 1/0, yes/no\), got 'maybe'"),
    ("srpo_vppo_top_k", 1.5, r"`--srpo_vppo_top_k` must be a number in \(0, 1\], got 1.5"),
    ("srpo_u_max", "abc", r"`--srpo_u_max` must be a number, got 'abc'"),
])
def test_srpo_grpo_config_errors_name_the_flag(tmp_path, field, value, expected):
    from srpo_core.adapters.trl import SRPOGRPOConfig

    with pytest.raises(ValueError, match=rf"SRPOGRPOConfig: {expected}"):
        SRPOGRPOConfig(**cpu(tmp_path), **{field: value})


def test_srpo_grpo_config_parses_strings_and_shares_the_adapters_names(tmp_path):
    from srpo_core.adapters._common import AdapterOptions
    from srpo_core.adapters._options import SHARED
    from srpo_core.adapters.trl import SRPOGRPOConfig, SRPOTrainerOptions

    args = SRPOGRPOConfig(**cpu(tmp_path), srpo_ablate_tags="yes", srpo_fused_loss="false", srpo_corruption_p="0.25",
                          srpo_seed="7", srpo_beta_reasoning="0.1", srpo_ablation_mode="off")
    got = (args.srpo_ablate_tags, args.srpo_fused_loss, args.srpo_corruption_p, args.srpo_seed)
    assert got == (True, False, 0.25, 7)
    assert args.srpo_math_config().beta_reasoning == 0.1 and args.srpo_trainer_options().ablation_mode == "off"
    # one set of names: every shared option is a field of both option types (TRL: srpo_<name>), with the same default
    for option in SHARED:
        assert hasattr(AdapterOptions(), option.name) and hasattr(args, f"srpo_{option.name}"), option.name
        if option.name != "seed":  # the TRL trainer's seed defaults to its args.seed
            assert getattr(SRPOTrainerOptions(), option.name) == getattr(AdapterOptions(), option.name), option.name

