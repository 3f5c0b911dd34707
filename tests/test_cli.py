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
    for tag in ("<perception>", "</perception>", " <think>", "</think>", " <answer>", "</answer>"):
        assert first[tokens.index(tag)] == Role.OTHER, tag
    assert "".join(tokens).startswith("<perception> a right triangle")


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
        pytest.param(json.dumps(good(logp_ablated=[-0.1, "x", -0.1])), ["r.jsonl:2", "`logp_ablated`", "[1]", "'x'"],
                     id="string-logp"),
        pytest.param(json.dumps(good()).replace("-0.1, -0.1, -0.1", "-0.1, Infinity, -0.1"),
                     ["r.jsonl:2", "`logp`", "[1]", "inf"], id="plus-inf"),
        pytest.param(json.dumps(good(roles=[0, 1])), ["r.jsonl:2", "`roles`", "list of 3 integers", "got 2"],
                     id="roles-length"),
        pytest.param(json.dumps(good(reward=float("nan"))), ["r.jsonl:2", "`reward`", "finite"], id="nan-reward"),
        pytest.param("[1, 2]", ["r.jsonl:2", "JSON object", "list"], id="not-an-object"),
        pytest.param(json.dumps(good(perception_signal=[0.1, None, 0.2])),
                     ["r.jsonl:2", "`perception_signal`", "[1]", "finite"], id="null-signal"),
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


def test_line_numbers_count_blank_lines_and_cross_line_rules(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(good(advantage=1.0)) + "\n\n" + json.dumps({**good(), "reward": None}) + "\n")
    code, _, err = run(["explain", str(f)], capsys)
    assert code == 2 and "r.jsonl:3: field `reward`" in err and "advantage" in err
    f.write_text(json.dumps(good(perception_signal=[0.0, 1.0, 0.0])) + "\n" + json.dumps(good()) + "\n")
    code, _, err = run(["explain", str(f)], capsys)
    assert code == 2 and "r.jsonl:2: field `perception_signal` is missing while" in err and "r.jsonl:1" in err


def test_precomputed_signals_replace_the_contrast(tmp_path, capsys):
    """Signals given in the file equal the same signals computed from the log-probs."""
    from srpo_core.advantages import contrast

    recs = load(EXAMPLE)
    batch = to_batch(recs)
    s_p = contrast(batch.logp, batch.logp_corrupt, "k3").tolist()
    s_r = contrast(batch.logp, batch.logp_ablated, "logratio").tolist()
    given = []
    for i, rec in enumerate(recs):
        a, b = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
        rec = {k: v for k, v in rec.items() if k not in ("logp_corrupt", "logp_ablated")}
        given.append({**rec, "perception_signal": s_p[a:b], "reasoning_signal": s_r[a:b]})
    f = _write(tmp_path, given)
    code, out, err = run(["explain", str(f), "--width", "120"], capsys)
    assert code == 0, err
    assert "signals P: given in the file, R: given in the file" in out
    _, demo_out, _ = run(["demo", "--width", "120"], capsys)
    table = demo_out[demo_out.index("per role"):]
    assert out[out.index("per role"):] == table


def test_limit_and_empty_roles_and_markup_safe(tmp_path, capsys):
    recs = [{"prompt_id": "[bold]p[/]", "prompt": "a [red]x[/red] prompt", "tokens": ["no", " tags", " [b]"],
             "reward": float(k), "logp": [-1.0] * 3, "logp_corrupt": [-1.0] * 3, "logp_ablated": [-1.0] * 3}
            for k in range(3)]
    recs.append({**recs[0], "tokens": [], "logp": [], "logp_corrupt": [], "logp_ablated": []})
    f = _write(tmp_path, recs)
    code, out, err = run(["explain", str(f), "--limit", "2", "--width", "100", "--html", str(tmp_path / "p.html")],
                         capsys)
    assert code == 0, err
    assert "[bold]p[/]" in out and "a [red]x[/red] prompt" in out  # shown literally, not as rich markup
    assert "… 2 more responses" in out and "— │" in out  # no role tokens: the statistics are shown as —
    assert "no perception or reasoning tokens" in out
    page = (tmp_path / "p.html").read_text()
    assert "[b]" in page and "[bold]p[/]" in page and "no perception or reasoning tokens" in page
    code, out, _ = run(["explain", str(f), "--limit", "0", "--width", "100"], capsys)
    assert code == 0 and "more responses" not in out


def test_html_escapes_tokens(tmp_path, capsys):
    rec = {"prompt_id": "<q>", "tokens": ["<perception>", " <b>x</b>", "</perception>"], "reward": 1.0,
           "logp": [-1.0] * 3, "logp_corrupt": [-2.0] * 3, "logp_ablated": [-1.0] * 3}
    f = _write(tmp_path, [rec, {**rec, "reward": 0.0}])
    code, _, err = run(["explain", str(f), "--html", str(tmp_path / "p.html")], capsys)
    assert code == 0, err
    page = (tmp_path / "p.html").read_text()
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page and "&lt;q&gt;" in page


def test_demo_lists_the_most_and_least_weighted_tokens(capsys):
    _, out, _ = run(["demo", "--width", "80"], capsys)
    assert out.count("▲") >= 12 and out.count("▼") >= 12
    code, out, _ = run(["demo", "--width", "80", "--set", "beta_perception=0", "--set", "beta_reasoning=0"], capsys)
    assert code == 0 and out.count("▲") == 2 and out.count("all weights within 5% of 1") == 12  # 2: the legend


def test_demo_fits_80_columns(capsys):
    _, out, _ = run(["demo", "--width", "80"], capsys)
    from rich.cells import cell_len

    assert max(cell_len(line.rstrip()) for line in out.splitlines()) <= 80


def test_prompt_ids_keep_their_json_type(tmp_path):
    batch = to_batch(load(_write(tmp_path, [good(prompt_id=1), good(prompt_id="1", reward=0.0)])))
    assert batch.group_ids.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--set", "beta_perception=abc"], "`beta_perception` takes a number, got 'abc'",
                     id="not-a-number"),
        pytest.param(["--set", "beta_perception"], "--set takes FIELD=VALUE", id="no-equals"),
        pytest.param(["--set", "weight_map=cubic"], "`weight_map` must be one of", id="bad-choice"),
        pytest.param(["--set", "perception_contrast=kl"], "needs the full logit rows", id="kl-needs-logits"),
        pytest.param(["--html", "/nonexistent/dir/p.html"], "cannot be written", id="html-unwritable"),
    ],
)
def test_bad_options_are_clean_errors(capsys, argv, expected):
    code, _, err = run(["demo", *argv], capsys)
    assert code == 2 and expected in err and "Traceback" not in err


def test_non_utf8_file(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    f.write_bytes(b"\xff\xfe{}")
    code, _, err = run(["explain", str(f)], capsys)
    assert code == 2 and "not UTF-8" in err


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "explain" in out


def test_version_and_bare_command_prints_help(capsys):
    import srpo_core

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"srpo-core {srpo_core.__version__}"
    code, out, err = run([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: srpo-core") and "demo" in out and "explain" in out and "docs" in out


def test_explain_example_equals_demo_and_needs_exactly_one_source(capsys):
    _, demo_out, _ = run(["demo", "--width", "120"], capsys)
    code, out, _ = run(["explain", "--example", "--width", "120"], capsys)
    assert code == 0 and out == demo_out
    for argv in (["explain"], ["explain", "--example", str(EXAMPLE)]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "give a rollouts file (.jsonl) or --example" in err


def test_help_points_to_what_ships_with_the_package(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    out = capsys.readouterr().out
    assert "docs/" not in out and "srpo-core docs rollouts" in out and "--example" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for field in ("prompt_id", "tokens", "logp_corrupt", "logp_ablated", "reward", "advantage", "roles"):
        assert field in out, field


def test_docs_lists_and_prints_pages(capsys):
    from srpo_core.cli import docs_dir

    code, out, _ = run(["docs"], capsys)
    lines = out.splitlines()
    for name in ("quickstart", "rollouts", "trl", "adapters", "math", "spec"):
        assert any(line.startswith(f"  {name}  ") for line in lines), name  # the name, then its description
    code, out, _ = run(["docs", "rollouts"], capsys)
    assert code == 0 and out == (docs_dir() / "rollouts.md").read_text(encoding="utf-8")
    code, _, err = run(["docs", "nope"], capsys)
    assert code == 2 and "no page 'nope'" in err


def test_docs_index_lists_every_page_once_guides_first_records_last(capsys, monkeypatch):
    """One index (docs/index.md): a line per page with a description; guides first, benchmark records last."""
    from srpo_core.cli import docs_dir, docs_index

    root = docs_dir()
    sections = docs_index(root)
    titles = [title for title, _ in sections]
    assert titles[0] == "Guides" and titles[-1].startswith("Benchmark records"), titles
    listed = [page for _, entries in sections for page, _ in entries]
    assert sorted(listed) == sorted(p.stem for p in root.glob("*.md") if p.stem != "index")  # each page once
    assert all(text for _, entries in sections for _, text in entries)  # every page described
    assert listed[0] == "quickstart"
    records = dict(sections)[titles[-1]]
    dumps = {p for p in listed if p.startswith(("bench_", "benchmarks_"))}
    assert {page for page, _ in records} == dumps  # the raw records together, after the guides and reference
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(["docs"], capsys)
    assert code == 0 and max(len(line) for line in out.splitlines()[1:]) <= 80
    assert out.index("quickstart") < out.index("trl") < out.index("spec") < out.index("bench_token_logprobs_avx2")


def test_user_facing_docs_speak_of_the_product():
    """No issue or decision numbers in the pages a user reads (decisions.md is where they live)."""
    import re

    from srpo_core.cli import docs_dir

    pages = [docs_dir() / f"{n}.md" for n in ("trl", "adapters", "rollouts", "math", "spec", "quickstart", "index")]
    pages.append(docs_dir().parent / "README.md")
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"\bissue[ -]?\d|\bD\d{1,3}\b", text), (page.name, re.findall(r".{30}\bD\d+\b.{10}", text))
    assert "(spec.md)" in (docs_dir() / "math.md").read_text(encoding="utf-8")
    for name in ("math", "decisions"):  # the SPEC they cite is the one in the repository
        text = (docs_dir() / f"{name}.md").read_text(encoding="utf-8")
        assert "../shared" not in text and "(spec.md)" in text, name


def test_make_example_honours_help_and_never_rewrites_by_default(tmp_path, capsys):
    before = EXAMPLE.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exc:
        make_example.main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out
    assert make_example.main([]) == 0
    assert capsys.readouterr().out == EXAMPLE.read_text(encoding="utf-8")
    target = tmp_path / "ex.jsonl"
    assert make_example.main(["-o", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == EXAMPLE.read_text(encoding="utf-8")
    assert make_example.main(["--check"]) == 0
    assert EXAMPLE.stat().st_mtime_ns == before


def test_numbering_without_response_ids_equals_demo(tmp_path, capsys):
    records = [json.loads(line) for line in EXAMPLE.read_text(encoding="utf-8").splitlines()]
    assert [r["response_id"] for r in records] == [0, 1, 2, 3] * 3
    f = tmp_path / "no_ids.jsonl"
    f.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "response_id"}) + "\n" for r in records))
    _, demo_out, _ = run(["demo", "--width", "120"], capsys)
    code, out, _ = run(["explain", str(f), "--width", "120"], capsys)
    assert code == 0 and out == demo_out
    page_demo, page = tmp_path / "d.html", tmp_path / "e.html"
    run(["demo", "--html", str(page_demo)], capsys)
    run(["explain", str(f), "--html", str(page)], capsys)
    assert page.read_text() == page_demo.read_text()
    from srpo_core.render import response_labels

    assert response_labels([{"prompt_id": "a"}, {"prompt_id": "b"}, {"prompt_id": "a", "response_id": 9},
                            {"prompt_id": "a"}, {"prompt_id": 1}, {"prompt_id": "1"}]) == ["0", "0", "9", "2", "0",
                                                                                          "0"]


def test_html_has_a_colour_legend_and_the_terminal_notes(tmp_path, capsys):
    from srpo_core.render import LEGEND_WEIGHTS, _rgb

    page = tmp_path / "demo.html"
    run(["demo", "--html", str(page)], capsys)
    text = page.read_text()
    legend = text[text.index("class='legend'"):]
    legend = legend[:legend.index("</div>")]
    for w in LEGEND_WEIGHTS:
        assert "background:rgb({},{},{})'>{:g}<".format(*_rgb(w), w) in legend, w
    assert "perception" in legend and "reasoning" in legend and "other" in legend
    for note in ("where A<sub>i</sub> &lt; 0, ▲ tokens are pushed down", "role P/R and weight",
                 "each response's mean weight is 1", "signals P: k3"):
        assert note in text, note
