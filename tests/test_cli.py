"""`srpo-core demo` / `explain` / the rollouts schema."""

import json
import math
import os
import subprocess
import sys

import pytest

from srpo_core import Role, SRPOConfig, grpo_advantages, role_aware_advantages
from srpo_core.cli import main
from srpo_core.examples import make_example
from srpo_core.rollouts import load, to_batch

EXAMPLE = make_example.FILE


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_prints_tokens_tables_and_changes(capsys):
    code, out, err = run(["demo", "--width", "120"], capsys)
    assert code == 0, err
    assert "triangle-area" in out and "<perception>" in out
    assert "per role (whole batch)" in out and "what SRPO changed vs GRPO" in out


def test_demo_numbers_are_role_aware_advantages_of_the_example(capsys):
    batch = to_batch(load(EXAMPLE))
    adv = grpo_advantages(batch.rewards, batch.group_ids)
    res = role_aware_advantages(adv, batch.logp, batch.logp_corrupt, batch.logp_ablated, batch.roles,
                                cu_seqlens=batch.cu_seqlens)
    code, out, _ = run(["demo", "--width", "160"], capsys)
    assert code == 0
    assert f"{res.stats['perception/w_max']:.3f}" in out and f"{res.stats['reasoning/mu']:.3f}" in out
    # the example is built so that SRPO has something to say: both roles present, weights away from 1
    assert res.stats["perception/count"] > 0 and res.stats["reasoning/count"] > 0
    assert res.weights.max() > 1.5 and res.weights.min() < 0.7


def test_explain_on_the_example_file_equals_demo(capsys):
    _, demo_out, _ = run(["demo", "--width", "120"], capsys)
    code, explain_out, _ = run(["explain", str(EXAMPLE), "--width", "120"], capsys)
    assert code == 0 and explain_out == demo_out


def test_set_overrides_config(capsys):
    code, out, _ = run(["demo", "--width", "160", "--set", "beta_perception=0", "--set", "beta_reasoning=0"], capsys)
    assert code == 0
    assert "1.000 │  1.000 │ 1.000" in out  # w min/mean/max per role at beta = 0: GRPO
    code, _, err = run(["demo", "--set", "nope=1"], capsys)
    assert code == 2 and "--set takes FIELD=VALUE" in err


def test_html_is_written_and_self_contained(tmp_path, capsys):
    page = tmp_path / "demo.html"
    code, _, _ = run(["demo", "--html", str(page)], capsys)
    assert code == 0
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "triangle-area" in text and "<style>" in text
    assert "http://" not in text and "https://" not in text and "<script src" not in text and "<link" not in text


def test_python_dash_m_demo():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "srpo_core", "demo", "--width", "100"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "what SRPO changed vs GRPO" in proc.stdout


def test_generator_is_deterministic_and_matches_the_shipped_file():
    assert make_example.dumps(make_example.generate()) == EXAMPLE.read_text(encoding="utf-8")
    assert make_example.generate() == make_example.generate()


def test_roles_come_from_tags():
    batch = to_batch(load(EXAMPLE))
    first = batch.roles[: int(batch.cu_seqlens[1])].tolist()
    tokens = batch.tokens[0]
    assert first[tokens.index("<perception>")] == Role.OTHER
    assert first[tokens.index(" right")] == Role.PERCEPTION
    assert first[tokens.index(" area")] == Role.REASONING
    assert first[tokens.index(" \\boxed{6}")] == Role.REASONING


def _write(tmp_path, records_or_lines):
    f = tmp_path / "r.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records_or_lines]
    f.write_text("\n".join(lines) + "\n")
    return f


def good(n=3, **over):
    rec = {"prompt_id": "p", "tokens": ["<perception>", " a", " </perception>"][:n], "reward": 1.0,
           "logp": [-0.1] * n, "logp_corrupt": [-0.2] * n, "logp_ablated": [-0.3] * n}
    rec.update(over)
    return rec


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param("{not json", ["r.jsonl:2", "not valid JSON"], id="bad-json"),
        pytest.param(json.dumps({k: v for k, v in good().items() if k != "logp"}), ["r.jsonl:2", "`logp`", "missing"],
                     id="missing-field"),
        pytest.param(json.dumps(good(logp=[-0.1, -0.1])), ["r.jsonl:2", "`logp`", "list of 3 numbers", "got 2"],
                     id="length"),
        pytest.param(json.dumps(good(roles=[0, 3, 0])), ["r.jsonl:2", "`roles`", "[1]", "got 3"], id="bad-role"),
        pytest.param(json.dumps(good()).replace("-0.2, -0.2, -0.2", "-0.2, NaN, -0.2"),
                     ["r.jsonl:2", "`logp_corrupt`", "[1]", "nan"], id="nan"),
        pytest.param(json.dumps({k: v for k, v in good().items() if k != "prompt_id"}), ["r.jsonl:2", "`prompt_id`"],
                     id="no-prompt-id"),
        pytest.param(json.dumps({k: v for k, v in good().items() if k != "reward"}), ["r.jsonl:2", "`reward`"],
                     id="no-reward"),
        pytest.param(json.dumps(good(tokens="abc")), ["r.jsonl:2", "`tokens`", "list of strings"], id="tokens"),
    ],
)
def test_malformed_line_names_line_and_field(tmp_path, capsys, line, expected):
    f = _write(tmp_path, [good(), line])
    code, out, err = run(["explain", str(f)], capsys)
    assert code == 2
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, (piece, err)


def test_null_is_minus_inf_and_advantages_can_be_given(tmp_path, capsys):
    recs = [good(advantage=0.5, logp_corrupt=[None, None, -0.2]), good(advantage=-0.5, prompt_id="q")]
    batch = to_batch(load(_write(tmp_path, recs)))
    assert batch.logp_corrupt[0] == -math.inf and batch.advantages.tolist() == [0.5, -0.5]
    code, _, err = run(["explain", str(_write(tmp_path, recs))], capsys)
    assert code == 0, err


def test_missing_file_is_a_clean_error(capsys):
    code, _, err = run(["explain", "/nonexistent/rollouts.jsonl"], capsys)
    assert code == 2 and "cannot be read" in err


def test_config_parse_types():
    from srpo_core.cli import _config

    assert _config(["beta_perception=1.5", "weight_map=linear"]) == SRPOConfig(beta_perception=1.5,
                                                                                weight_map="linear")
