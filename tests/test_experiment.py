"""The miniature study (issue 13): the task, a smoke run of every phase, signal validity on a tiny warm-started
model (assertions that can fail), and the fidelity options (VPPO / PAPO presets, entropy terms, tag ablation)."""

from __future__ import annotations

import dataclasses
import math
import random
import types
import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("PIL.Image")

from srpo_core.ablation import DEFAULT_ABLATION_MODE, ablate_span  # noqa: E402
from srpo_core.adapters.trl import PRESETS, SRPOGRPOTrainer, SRPOTrainerOptions  # noqa: E402
from srpo_core.experiment import SMOKE, run, signals  # noqa: E402
from srpo_core.experiment.model import ModelSize, build_model, build_processor  # noqa: E402
from srpo_core.experiment.sft import encode, warm_start  # noqa: E402
from srpo_core.experiment.task import generate, hallucinate, parse, perception_score, response, solve  # noqa: E402


@pytest.fixture(scope="module")
def processor():
    return build_processor()


# ------------------------------------------------------------------ task
def test_task_is_deterministic_and_consistent():
    a, b, c = generate(50, 3), generate(50, 3), generate(50, 4)
    assert a == b and a != c
    rng = random.Random(0)
    for s in a:
        assert solve(s.kind, s.args, s.cells) == s.answer
        perceived, answer = parse(response(s, s.cells).text)
        assert perceived == s.cells and answer == s.answer and perception_score(s, perceived) == 1.0
        wrong = hallucinate(s.cells, rng)
        assert 1 <= sum(x != y for x, y in zip(wrong, s.cells, strict=True)) <= 2
        assert perception_score(s, parse(response(s, wrong).text)[0]) < 1.0
    assert parse("no tags at all") == (None, None)
    img = a[0].image()
    assert img.size == (56, 56)


def test_fact_labels_and_primes():
    """Issue 23: the `so` closing a count's cell list uses a fact (where the list ends depends on the cells); `direct`
    marks the words read off the span, not the derived answers; the two primes of the warm start."""
    from srpo_core.experiment.evaluate import hallucination
    from srpo_core.experiment.task import Sample, shortcut, silent_prime

    count = Sample(("red", "none", "red", "blue"), "count", ("red",), "2")
    r = response(count, count.cells)
    lab = {w: (f, d) for w, p, f, d in zip(r.words, r.part, r.uses_fact, r.direct, strict=True) if p == "think"}
    assert r.words[r.part.index("think"):][:6] == ("red", "at", "c1", "c3", "so", "2")
    assert lab["so"] == (True, True) and lab["c1"] == (True, True) and lab["2"] == (True, False)
    assert lab["at"] == (False, False) and lab["red"] == (False, False)
    assert r.uses_fact[-2] and not r.direct[-2] and r.part[-2] == "answer"
    compare = Sample(("red", "none", "red", "blue"), "compare", ("red", "blue"), "red")
    r = response(compare, compare.cells)
    so = r.words.index("so")
    assert not r.uses_fact[so] and r.direct[r.words.index("so") - 1] and not r.direct[so + 1] and r.uses_fact[so + 1]
    read = Sample(("red", "none", "red", "blue"), "read", ("c4",), "blue")
    r = response(read, read.cells)
    i = r.words.index("is")
    assert r.direct[i + 1] and not r.uses_fact[i] and not r.direct[-2]
    assert shortcut(count) == ("red", "red", "red", "blue") and shortcut(read) is None
    assert shortcut(Sample(("red",) * 4, "count", ("blue",), "0")) is None
    primed = silent_prime(read, random.Random(0))
    assert primed[3] == "blue" and sum(a != b for a, b in zip(primed, read.cells, strict=True)) == 1
    texts = [response(count, shortcut(count)).text, response(read, primed).text, response(read, read.cells).text]
    h = hallucination([count, read, read], texts)
    assert h == {"halluc_changes_answer": 1 / 3, "halluc_keeps_answer": 1 / 3, "shortcut_rate": 1.0,
                 "silent_prime_rate": 0.5}


def test_encode_labels_align_with_tokens(processor):
    samples = generate(3, 0)
    responses = [response(s, s.cells) for s in samples]
    batch = encode(processor, samples, responses)
    tok = processor.tokenizer
    for b, r in enumerate(responses):
        ids = batch.inputs["input_ids"][b][batch.completion[b]]
        assert tok.convert_ids_to_tokens(ids.tolist()) == [*r.words, tok.eos_token]
    assert bool(batch.grounded.all())


def test_padding_sides_are_restored_and_the_rl_phase_pads_left(monkeypatch):
    """SFT pads right and evaluation left, each restoring the side it found; the RL phase pads left (D238: TRL 1.16
    left-pads prompt_ids but takes mm_token_type_ids from the processor's own padding)."""
    from srpo_core.experiment import evaluate, rl

    processor = build_processor()
    tok = processor.tokenizer
    assert tok.padding_side == "left"
    samples = generate(4, 0)
    batch = encode(processor, samples, [response(s, s.cells) for s in samples])
    assert tok.padding_side == "left"
    assert not bool((batch.inputs["input_ids"][:, 0] == tok.pad_token_id).any())  # encode still padded right
    tok.padding_side = "right"
    model = build_model(tok, ModelSize(), seed=0)
    evaluate.generate_texts(model, processor, samples[:2], max_new_tokens=1)
    assert tok.padding_side == "right"

    seen = []

    class Stop(Exception):
        pass

    def trainer_for(method, model, processor, train, args):
        seen.append(processor.tokenizer.padding_side)
        raise Stop

    monkeypatch.setattr(rl, "trainer_for", trainer_for)
    with pytest.raises(Stop):
        rl.run_method("grpo", model, processor, samples, samples, seed=0, budget=rl.RLBudget(steps=1, beta=0.0))
    assert seen == ["left"] and tok.padding_side == "right"


# ------------------------------------------------------------------ smoke run of every phase
def test_smoke_study_runs_every_phase(tmp_path):
    cfg = dataclasses.replace(SMOKE, budget=dataclasses.replace(SMOKE.budget, steps=2))
    result = run(cfg, progress=False)
    runs = result["rl"]["runs"]
    assert {r["method"] for r in runs} == set(cfg.methods) and all(len(r["step_seconds"]) == 2 for r in runs)
    summary = result["rl"]["summary"]
    assert summary["grpo"]["step_time_vs_grpo"]["mean"] == pytest.approx(1.0)
    assert math.isfinite(summary["srpo"]["step_time_vs_grpo"]["mean"])
    for r in runs:
        ev = r["eval"]
        assert 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["perception"] <= 1.0
        assert ev["grounding_gap"] == pytest.approx(ev["accuracy"] - ev["accuracy_corrupt"])
    assert "srpo/perception/w_mean" in next(r for r in runs if r["method"] == "srpo")["logged"]
    assert result["signals"]["counts"]["perception"] > 0
    from srpo_core.experiment import report

    report.write_docs(result, str(tmp_path / "e.md"), str(tmp_path / "e.png"), source="e.json")
    text = (tmp_path / "e.md").read_text()
    assert "## Verdict" in text and "| grpo |" in text and (tmp_path / "e.png").stat().st_size > 0


def test_verdict_rule():
    from srpo_core.experiment.report import verdict_of

    assert verdict_of({"diff_ci": [0.1, 0.3]}, 1) == "supported"
    assert verdict_of({"diff_ci": [-0.3, -0.1]}, 1) == "contradicted"
    assert verdict_of({"diff_ci": [-0.3, -0.1]}, -1) == "supported"
    assert verdict_of({"diff_ci": [-0.1, 0.1]}, 1).startswith("not resolved")


# ------------------------------------------------------------------ signal validity on a tiny warm-started model
@pytest.fixture(scope="module")
def warm(processor):
    """A tiny Qwen2-VL warm-started on the easy (uniform-colour) variant: it learns to read the image in seconds."""
    torch.manual_seed(0)
    model = build_model(processor.tokenizer, ModelSize(hidden=64), seed=0)
    warm_start(model, processor, generate(256, 0, uniform=True), steps=100, batch_size=8, lr=5e-3)
    return model


@pytest.fixture(scope="module")
def validity(warm, processor):
    sig = signals.token_signals(warm, processor, generate(16, 2, uniform=True), seed=0)
    return signals.analyse(sig, n_boot=400, seed=0)


def test_warm_start_reads_the_image(warm, processor):
    from srpo_core.experiment.evaluate import generate_texts, score

    test = generate(16, 1, uniform=True)
    assert score(test, generate_texts(warm, processor, test))["perception"] >= 0.9


@pytest.mark.parametrize("kind", ["k3", "kl", "js"])
def test_visual_signal_is_higher_on_perception_tokens(validity, kind):
    for versus in ("perception_vs_reasoning", "perception_vs_other"):
        effect = validity[f"visual_{kind}"][versus]
        assert effect["diff_ci"][0] > 0, (versus, effect)


def test_signed_visual_logratio_separates_grounded_from_hallucinated(validity):
    """ℓ − ℓ̃ > 0 where the clean image supports the token (grounded colour words), < 0 where it contradicts it."""
    effect = validity["visual_logratio"]["grounded_vs_hallucinated_colour"]
    assert effect["diff_ci"][0] > 0 and effect["mean_a"] > 0 > effect["mean_b"], effect


def test_k3_ranks_hallucinated_colour_words_above_grounded_ones(validity):
    """The finding this pins (docs/experiment.md): k3 is a magnitude, e^δ − δ − 1 with δ = ℓ̃ − ℓ, and a hallucinated
    colour word gains probability when its cell is blacked out (δ > 0, where k3 grows exponentially). So the k3
    perception signal is *higher* on hallucinated than on grounded colour words; if this test starts failing, the
    claim "the perception signal under corruption is higher on grounded spans" may have become true — re-read it."""
    effect = validity["visual_k3"]["grounded_vs_hallucinated_colour"]
    assert effect["diff_ci"][1] < 0, effect


def test_reasoning_ablation_moves_template_words_more_than_fact_words(validity):
    """With the span dropped (`drop`), words whose value the image alone determines (facts, in the uniform variant)
    keep their probability, while template words fall (every later token is renumbered, so the context is
    off-distribution): ℓ − ℓ° is larger on non-fact words. Issue 23's reason for `drop` not being the default."""
    effect = validity["reasoning_drop_logratio"]["fact_vs_nonfact"]
    assert effect["diff_ci"][1] < 0, effect


@pytest.fixture(scope="module")
def span_reader(processor):
    """A tiny Qwen2-VL whose reasoning must read the perception span: uniform images (learnt in seconds) but 70% of
    the warm-start spans hallucinated, with reasoning consistent with them, so the image alone cannot decide the
    facts."""
    torch.manual_seed(0)
    model = build_model(processor.tokenizer, ModelSize(hidden=64), seed=0)
    warm_start(model, processor, generate(256, 0, uniform=True), steps=400, batch_size=8, lr=5e-3, hallucinated=0.7)
    return model


def test_default_reasoning_contrast_is_higher_on_fact_tokens(span_reader, processor):
    """Issue 23's bar: the default reasoning contrast ℓ − ℓ° (and `mask`, the padding-free adapters' mode) is higher
    on reasoning tokens that use a perceived fact than on the others (CI of the difference above 0), and leaves the
    others where they were (|mean| < 0.1 nats; `drop` moves them by several nats). An off-by-one in the realignment
    breaks both."""
    sig = signals.token_signals(span_reader, processor, generate(32, 2, uniform=True), seed=0)
    effects = signals.analyse(sig, n_boot=400, seed=0)
    for mode in (DEFAULT_ABLATION_MODE, "mask"):
        fact = effects[f"reasoning_{mode}_logratio"]["fact_vs_nonfact"]
        assert fact["diff_ci"][0] > 0 and abs(fact["mean_b"]) < 0.1, (mode, fact)
    assert effects["reasoning_drop_logratio"]["fact_vs_nonfact"]["mean_b"] > 1.0


def test_bootstrap_effect_recovers_a_known_difference():
    rng = torch.Generator().manual_seed(0)
    n = 2000
    a = torch.randn(n, generator=rng) + 1.0
    b = torch.randn(n, generator=rng)
    values = torch.cat([a, b]).numpy()
    in_a = torch.cat([torch.ones(n), torch.zeros(n)]).bool().numpy()
    cluster = torch.arange(2 * n).remainder(200).numpy()
    effect = signals.bootstrap_effect(values, in_a, ~in_a, cluster, n_boot=300)
    assert effect["diff_ci"][0] < 1.0 < effect["diff_ci"][1] and 0.8 < effect["d"] < 1.2


# ------------------------------------------------------------------ fidelity options
def test_presets_follow_their_sources():
    vppo, papo = SRPOTrainerOptions.preset("vppo"), SRPOTrainerOptions.preset("papo")
    assert (vppo.method, vppo.corruption_patch, vppo.corruption_p, vppo.corruption_share) == ("vppo", "raw", 0.5,
                                                                                              "response")
    assert vppo.entropy_penalty_coef == 0.06
    assert (papo.method, papo.corruption_patch, papo.corruption_p, papo.corruption_share) == ("papo", "raw", 0.6,
                                                                                              "prompt")
    assert (papo.papo_kl_coef, papo.entropy_penalty_coef, papo.papo_aug_entropy_coef) == (0.01, 0.03, 0.03)
    assert SRPOTrainerOptions.preset("srpo") == SRPOTrainerOptions()
    assert SRPOTrainerOptions.preset("vppo", entropy_penalty_coef=0.12).entropy_penalty_coef == 0.12  # 8B script
    assert set(PRESETS) == {"srpo", "vppo", "papo"}
    with pytest.raises(ValueError, match="method"):
        SRPOTrainerOptions.preset("dapo")
    with pytest.raises(ValueError, match="method"):
        SRPOTrainerOptions(method="grpo")
    with pytest.raises(ValueError, match="corruption_share"):
        SRPOTrainerOptions(corruption_share="batch")
    with pytest.raises(ValueError, match="entropy_penalty_coef"):
        SRPOTrainerOptions(entropy_penalty_coef=-0.1)


@pytest.mark.parametrize("share", ["prompt", "response"])
def test_corruption_share(processor, share):
    samples = generate(2, 0)
    images = [s.image() for s in samples for _ in range(4)]  # 2 prompts × 4 responses
    enc = processor.image_processor(images=images, return_tensors="pt")
    opts = SRPOTrainerOptions(corruption_patch="raw", corruption_share=share)
    stub = types.SimpleNamespace(srpo_options=opts, accelerator=types.SimpleNamespace(process_index=0),
                                 processing_class=processor, _srpo_seed=lambda: 7)
    out = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
    corrupted = SRPOGRPOTrainer._srpo_corrupt(stub, out, torch.arange(8) // 4)
    changed = (corrupted != out["pixel_values"]).any(-1).view(8, -1)  # which raw patches changed, per response
    same_within_prompt = all(torch.equal(changed[0], changed[i]) for i in range(1, 4))
    assert same_within_prompt == (share == "prompt")


def test_ablate_span_can_remove_the_tags_too():
    ids = torch.tensor([[5, 1, 7, 7, 2, 9, 9]])  # 1 = <perception>, 2 = </perception>
    attn = torch.ones_like(ids)
    span = torch.tensor([[False, False, True, True, False, False, False]])
    tags = torch.isin(ids, torch.tensor([1, 2]))
    kept = ablate_span(ids, attn, span, mode="drop")
    assert kept.input_ids.tolist() == [[5, 1, 2, 9, 9]]
    dropped = ablate_span(ids, attn, span, mode="drop", tags_mask=tags)
    assert dropped.input_ids.tolist() == [[5, 9, 9]]
    assert dropped.index.tolist() == [[0, -1, -1, -1, -1, 1, 2]]
    masked = ablate_span(ids, attn, span, mode="mask", tags_mask=tags)
    assert masked.attention_mask.tolist() == [[1, 0, 0, 0, 0, 1, 1]]
    assert masked.index.tolist() == [[0, -1, -1, -1, -1, -1, 6]]  # the token after the hidden run: no value (D180)
    with pytest.raises(ValueError, match="tags_mask"):
        ablate_span(ids, attn, span, tags_mask=tags[:, :3])
    with pytest.raises(TypeError, match="tags_mask"):
        ablate_span(ids, attn, span, tags_mask=tags.long())


def test_entropy_and_papo_terms_reach_the_loss(processor):
    """The extra loss terms equal their definitions on the inputs that reached ``_compute_loss``."""
    from srpo_core.experiment import rl
    from srpo_core.presets import papo_perception_kl

    class Capturing(SRPOGRPOTrainer):
        def _compute_loss(self, model, inputs):
            self.captured = inputs
            return super()._compute_loss(model, inputs)

    samples = generate(2, 0)
    budget = rl.RLBudget(steps=1, prompts=2, generations=2, max_completion_length=10, lr=0.0, beta=0.0)
    args = rl._args(processor, budget, seed=0)
    model = build_model(processor.tokenizer, ModelSize(), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Capturing(model=model, reward_funcs=rl.answer_reward, args=args, train_dataset=rl.dataset(samples),
                            processing_class=processor, srpo_options=SRPOTrainerOptions.preset("papo"))
        trainer.train()
    inputs = trainer.captured
    assert "srpo_logp_corrupt" in inputs
    base = dataclasses.replace(trainer.srpo_options, entropy_penalty_coef=0.0, papo_kl_coef=0.0,
                               papo_aug_entropy_coef=0.0)
    model.train()

    def loss_with(opts):
        trainer.srpo_options = opts
        with torch.no_grad():
            return float(trainer._compute_loss(model, inputs))

    seen = {}
    original = trainer._get_per_token_logps_and_entropies

    def spy(*a, **k):  # the policy log-probs TRL's own loss computes (the base options add no term)
        out = original(*a, **k)
        seen["logp"] = out[0]
        return out

    trainer._get_per_token_logps_and_entropies = spy
    l0 = loss_with(base)
    assert trainer._get_per_token_logps_and_entropies is spy  # the adapter restores what it wrapped
    del trainer._get_per_token_logps_and_entropies
    logp = seen["logp"]
    mask = inputs["completion_mask"].bool()
    neg_mean = float(-(logp * mask).sum() / mask.sum())
    lc = inputs["srpo_logp_corrupt"]
    aug = float(-(torch.where(mask, lc, 0.0)).sum() / mask.sum())
    kl = float(papo_perception_kl(logp.float(), lc, mask=mask).sum() / mask.sum())
    assert loss_with(dataclasses.replace(base, entropy_penalty_coef=0.5)) - l0 == pytest.approx(0.5 * neg_mean,
                                                                                                 rel=1e-4, abs=1e-6)
    assert loss_with(dataclasses.replace(base, papo_aug_entropy_coef=0.5)) - l0 == pytest.approx(0.5 * aug, rel=1e-4,
                                                                                                  abs=1e-6)
    assert loss_with(dataclasses.replace(base, papo_kl_coef=0.5)) - l0 == pytest.approx(-0.5 * kl, rel=1e-4,
                                                                                         abs=1e-6)


def test_cli_has_the_experiment_subcommand():
    from srpo_core import cli

    args = cli.build_parser().parse_args(["experiment", "--quick", "--json", "x.json", "--plot", "x.png"])
    assert args.run is cli._experiment and args.quick and args.json == "x.json" and args.plot == "x.png"
    assert not cli.build_parser().parse_args(["experiment"]).quick


def test_method_vs_grpo_sentence_reads_the_direction_of_each_metric():
    """Lower hallucination is *better*, lower accuracy *worse*; intervals spanning 0 give no claim."""
    from srpo_core.experiment.report import VS_GRPO, _method_sentence, vs_grpo_table

    def run(method, seed, **ev):
        base = {key: 0.5 for key, _, _ in VS_GRPO}
        return {"method": method, "seed": seed, "eval": {**base, **ev}}

    runs = [run("grpo", s) for s in range(3)]
    runs += [run("a", s, sampled_halluc_keeps_answer=0.5 - 0.1 - 0.01 * s, accuracy=0.5 - 0.2 - 0.01 * s)
             for s in range(3)]
    runs += [run("b", s, sampled_accuracy=0.5 + (0.1 if s % 2 else -0.1)) for s in range(3)]
    result = {"config": {"seeds": [0, 1, 2]}, "rl": {"runs": runs, "summary": {"grpo": {}, "a": {}, "b": {}}}}
    a = _method_sentence(result, "a")
    assert "better than GRPO on halluc. keeps answer -0.110" in a and "worse on greedy acc. -0.210" in a
    assert "no held-out metric" in _method_sentence(result, "b")
    table = vs_grpo_table(result)
    assert len(table) == 4 and table[2].startswith("| a | +0.000 [+0.000, +0.000] | -0.210 [")
    one = {"config": {"seeds": [0]}, "rl": {"runs": runs[:1] + runs[3:4], "summary": {"grpo": {}, "a": {}}}}
    assert "from one seed" in _method_sentence(one, "a")
