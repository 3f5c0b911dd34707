"""End to end: SRPOGRPOTrainer trains a tiny random Qwen2-VL with TRL's GRPO on CPU.

Everything is built offline: a character-level tokenizer with Qwen's special tokens and single-token tags (so the
random policy emits ``<perception>`` / ``<think>`` often enough for roles to be non-trivial; roles come from the real
tag parser), ``Qwen2VLImageProcessor()`` defaults (the PIL backend when torchvision is absent) in a
``Qwen2VLProcessor``, and a 4-prompt dataset of 56×56 coloured squares with a rule reward.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
import warnings

import pytest
import torch

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
PIL_Image = pytest.importorskip("PIL.Image")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from srpo_core import Role, SRPOConfig, role_aware_advantages  # noqa: E402
from srpo_core.ablation import counterfactual_donors  # noqa: E402
from srpo_core.adapters.trl import (  # noqa: E402
    SRPOGRPOConfig,
    SRPOGRPOTrainer,
    SRPOTrainerOptions,
    check_padding_side,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "[UNK]"]
TAGS = ["<perception>", "</perception>", "<think>", "</think>"]
CHARS = list("abcde \n")
# Qwen2-VL's chat template, reduced to what the test needs (images and text in user turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


def build_processor():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from srpo_core.experiment.model import images_only_processor

    vocab = {t: i for i, t in enumerate(SPECIAL + TAGS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
                                        padding_side="left")  # SRPOGRPOTrainer refuses "right" (D238)

    return images_only_processor(tokenizer, CHAT_TEMPLATE)


def build_model(tokenizer, seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def build_dataset():
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "abc"}]}],
             "image": PIL_Image.new("RGB", (56, 56), c)} for c in COLOURS]
    return datasets.Dataset.from_list(rows)


def rule_reward(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count("a") + 2.0 * ("</think>" in t) for t in texts]


def grpo_args(tokenizer, config_cls=None, **overrides):
    suppress = [tokenizer.convert_tokens_to_ids(t) for t in
                ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>")]
    kwargs = dict(
        output_dir=tempfile.mkdtemp(prefix="srpo-trl-"), per_device_train_batch_size=8, num_generations=4,
        max_completion_length=16, max_steps=2, learning_rate=1e-3, use_cpu=True, report_to=[], bf16=False,
        logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
        # a random policy must not emit vision placeholders: they would not match the image features
        generation_kwargs={"suppress_tokens": suppress},
    )
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return (config_cls or GRPOConfig)(**kwargs)


def capturing(base):
    """A subclass that records what each generation step produced and what reached ``_compute_loss``."""

    class Capturing(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.generated, self.seen, self.losses = [], [], []

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            last = getattr(self, "_srpo_last", None)
            if last is not None:
                # carried along TRL's shuffle so they can be compared row by row in _compute_loss
                out["test_weights"] = last.result.weights
                out["test_sequence_advantages"] = last.sequence_advantages
                out["test_roles"] = last.roles.roles
            self.generated.append({k: v for k, v in out.items() if isinstance(v, torch.Tensor)})
            return out

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            self.seen.append({k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            self.losses.append(loss.detach())
            return loss

    return Capturing


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def run(trainer_cls, processor, *, steps=2, lr=1e-3, config_cls=None, config=None, **trainer_kwargs):
    args = grpo_args(processor.tokenizer, config_cls, max_steps=steps, learning_rate=lr, **(config or {}))
    model = build_model(processor.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = capturing(trainer_cls)(model=model, reward_funcs=rule_reward, args=args,
                                         train_dataset=build_dataset(), processing_class=processor, **trainer_kwargs)
        trainer.train()
    return trainer


def test_srpo_trains_tiny_qwen2vl(processor):
    start = time.perf_counter()
    trainer = run(SRPOGRPOTrainer, processor)
    elapsed = time.perf_counter() - start
    assert len(trainer.seen) == 2
    role_counts = {Role.PERCEPTION: 0, Role.REASONING: 0}
    for inputs, loss in zip(trainer.seen, trainer.losses, strict=True):
        assert math.isfinite(float(loss))
        adv, mask = inputs["advantages"], inputs["completion_mask"].bool()
        assert adv.shape == inputs["completion_ids"].shape  # [B, T] reached _compute_loss
        w, seq = inputs["test_weights"], inputs["test_sequence_advantages"]
        assert bool((w[mask] > 0).all()) and bool(torch.isfinite(w[mask]).all())
        torch.testing.assert_close(adv, torch.where(mask, w * seq[:, None], 0.0), rtol=0, atol=0)
        roles = inputs["test_roles"]
        for role in role_counts:
            role_counts[role] += int((roles[mask] == role).sum())
        role_tok = mask & (roles != Role.OTHER)
        assert bool(((w - 1).abs() > 1e-4)[role_tok].any()), "some role token must be re-weighted"
        # SPEC property 5: each trajectory's mean weight is 1
        n = mask.sum(1)
        torch.testing.assert_close((w * mask).sum(1)[n > 0] / n[n > 0], torch.ones(int((n > 0).sum())))
    assert role_counts[Role.PERCEPTION] > 0 and role_counts[Role.REASONING] > 0
    logged = trainer.state.log_history[0]
    assert "srpo/perception/count" in logged and "srpo/malformed_frac" in logged
    assert elapsed < 180


def test_beta_zero_equals_plain_grpo(processor):
    srpo = run(SRPOGRPOTrainer, processor, srpo_config=SRPOConfig(beta_perception=0.0, beta_reasoning=0.0))
    grpo = run(GRPOTrainer, processor)
    assert len(srpo.seen) == len(grpo.seen) == 2
    # SRPO's passes draw from a private generator: the same completions are sampled at every step
    assert sum(int((s["test_roles"] != 0).sum()) for s in srpo.seen) > 0, "roles must be non-trivial"
    for a, b in zip(srpo.seen, grpo.seen, strict=True):
        torch.testing.assert_close(a["completion_ids"], b["completion_ids"], rtol=0, atol=0)
        mask = b["completion_mask"].bool()
        assert a["advantages"].dim() == 2 and b["advantages"].dim() == 1
        expected = torch.where(mask, b["advantages"][:, None].expand_as(mask), 0.0)
        torch.testing.assert_close(a["advantages"], expected, rtol=0, atol=0)
    for la, lb in zip(srpo.losses, grpo.losses, strict=True):
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)


def test_mask_ablation_and_raw_patches_run(processor):
    opts = SRPOTrainerOptions(ablation_mode="mask", corruption_patch="raw", corruption_mode="noise")
    trainer = run(SRPOGRPOTrainer, processor, steps=1, srpo_options=opts)
    assert math.isfinite(float(trainer.losses[0]))
    last = trainer._srpo_last
    roles = last.roles.roles
    reasoning = (roles == Role.REASONING) & last.mask
    assert bool(torch.isfinite(last.logp_ablated[reasoning]).all())


def test_ablate_tags_option_runs(processor):
    """``ablate_tags=True``: the perception tags found in the completions leave with the span (finite ℓ°)."""
    trainer = run(SRPOGRPOTrainer, processor, steps=1,
                  srpo_options=SRPOTrainerOptions(roles_fn=half_perception_half_reasoning, ablate_tags=True))
    last = trainer._srpo_last
    reasoning = (last.roles.roles == Role.REASONING) & last.mask
    assert math.isfinite(float(trainer.losses[0])) and bool(torch.isfinite(last.logp_ablated[reasoning]).all())


def test_ablation_off_runs_no_ablated_pass(processor):
    """``ablation_mode="off"`` (the adapters' old ``ablate=False``): no ablated pass, ``ℓ° = ℓ``, and the reasoning
    tokens are scored like OTHER tokens (no signal)."""
    trainer = run(SRPOGRPOTrainer, processor, steps=1,
                  srpo_options=SRPOTrainerOptions(roles_fn=half_perception_half_reasoning, ablation_mode="off"))
    last = trainer._srpo_last
    reasoning = (last.roles.roles == Role.REASONING) & last.mask
    assert int(reasoning.sum()) > 0
    assert torch.equal(last.logp_ablated, last.logp)
    assert not bool((last.scored_roles[last.mask] == Role.REASONING).any())
    assert trainer.state.log_history[0]["srpo/reasoning/count"] == 0


def half_perception_half_reasoning(completion_ids, mask, tokenizer):
    """A ``roles_fn``: the first 4 tokens are perception, the rest reasoning (forces both passes to matter)."""
    roles = torch.full_like(completion_ids, int(Role.REASONING))
    roles[:, :4] = int(Role.PERCEPTION)
    return roles.masked_fill(~mask, 0), torch.zeros(len(completion_ids), dtype=torch.bool), 0


def test_roles_fn_hook(processor):
    trainer = run(SRPOGRPOTrainer, processor, steps=1,
                  srpo_options=SRPOTrainerOptions(roles_fn=half_perception_half_reasoning))
    last = trainer._srpo_last
    perception = (last.roles.roles == Role.PERCEPTION) & last.mask
    reasoning = (last.roles.roles == Role.REASONING) & last.mask
    assert int(perception.sum()) > 0 and int(reasoning.sum()) > 0
    # removing the span changes the reasoning log-probs; the corrupted image changes the perception ones
    assert bool(((last.logp_ablated - last.logp).abs() > 1e-6)[reasoning].any())
    assert bool(((last.logp_corrupt - last.logp).abs() > 1e-6)[perception].any())


@pytest.mark.parametrize("mode", ["drop", "mask", "counterfactual"])
def test_ablated_pass_matches_direct_forward(processor, mode):
    """ℓ° from the trainer equals a forward of each hand-built row: the perception span removed (drop: positions of
    the shortened row), hidden (mask: original M-RoPE positions; the token after the span gets no value, D180) or
    replaced by the next response's span of the same prompt (counterfactual: positions of the new row), one row at
    a time, without padding."""
    trainer = run(SRPOGRPOTrainer, processor, steps=1, lr=0.0,
                  srpo_options=SRPOTrainerOptions(roles_fn=half_perception_half_reasoning, ablation_mode=mode))
    out, last = trainer.generated[0], trainer._srpo_last
    model = trainer.model.eval()
    image_token = model.config.image_token_id
    rows_per_image = int(out["image_grid_thw"][0].prod())
    n = out["completion_ids"].shape[0]
    roles = last.roles.roles
    full_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    full_span = torch.cat([torch.zeros_like(out["prompt_ids"], dtype=torch.bool),
                           last.mask & (roles == Role.PERCEPTION)], dim=1)
    donor = counterfactual_donors(torch.arange(n) // trainer.num_generations, "group", input_ids=full_ids,
                                  span_mask=full_span)  # as the trainer picks them: identical spans are passed over
    checked = 0
    for b in range(n):
        prompt = out["prompt_ids"][b][out["prompt_mask"][b].bool()]
        valid = last.mask[b]
        span = valid & (roles[b] == Role.PERCEPTION)
        keep = valid & ~span if mode != "mask" else valid
        completion = out["completion_ids"][b][keep]
        if mode == "counterfactual":  # the span is the completion's first 4 tokens (roles_fn)
            d = int(donor[b])
            if d < 0:  # no donor with another span: no value on this row's reasoning tokens
                assert not bool((last.scored_roles[b] == Role.REASONING).any())
                continue
            completion = torch.cat([out["completion_ids"][d][last.mask[d] & (roles[d] == Role.PERCEPTION)],
                                    completion])
        ids = torch.cat([prompt, completion])[None]
        attn = torch.ones_like(ids)
        if mode == "mask":
            attn[0, len(prompt):] = (roles[b][valid] != Role.PERCEPTION).long()
        mm = (ids == image_token).int()
        grid = out["image_grid_thw"][b:b + 1]
        kwargs = dict(pixel_values=out["pixel_values"][b * rows_per_image:(b + 1) * rows_per_image],
                      image_grid_thw=grid, mm_token_type_ids=mm)
        if mode == "mask":
            kwargs["position_ids"], _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                                   attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, **kwargs).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0][len(prompt) - 1:]
        if mode == "counterfactual":
            logp = logp[int(completion.shape[0] - keep.sum()):]  # offset from the span's end
        positions = torch.nonzero(keep)[:, 0]
        reasoning = roles[b][positions] == Role.REASONING
        if mode == "mask":  # no value after the hidden span: reasoning demoted to OTHER (no signal)
            after = positions == 4
            assert not bool(last.logp_ablated[b][positions][after].any()) or not bool(after.any())
            assert bool((last.scored_roles[b][positions][after] == Role.OTHER).all())
            reasoning = reasoning & ~after
        torch.testing.assert_close(last.logp_ablated[b][positions][reasoning], logp[reasoning], rtol=1e-4,
                                   atol=1e-5)
        checked += int(reasoning.sum())
    assert checked > 0


def test_explain_every_writes_what_srpo_core_explain_reads(processor, tmp_path):
    """`explain_every=1`: each generation step's rollouts go to JSONL in the rollouts schema; read back (as
    `srpo-core explain` does) and scored with the same config, they give the trainer's own weights."""
    from srpo_core.rollouts import load, to_batch

    trainer = run(SRPOGRPOTrainer, processor, steps=2, lr=0.0, srpo_options=SRPOTrainerOptions(
        roles_fn=half_perception_half_reasoning, explain_every=1, explain_dir=str(tmp_path)))
    files = sorted(tmp_path.glob("step-*-rank0.jsonl"))
    assert len(files) == 2, files
    last = trainer._srpo_last
    batch = to_batch(load(files[-1]))
    assert batch.cu_seqlens.tolist()[-1] == int(last.mask.sum())
    assert batch.tokens[0] and all(isinstance(t, str) for t in batch.tokens[0])
    torch.testing.assert_close(batch.roles, last.scored_roles[last.mask].to(batch.roles.dtype))
    again = role_aware_advantages(batch.advantages.float(), batch.logp, batch.logp_corrupt, batch.logp_ablated,
                                  batch.roles, cu_seqlens=batch.cu_seqlens, config=trainer.srpo_config)
    torch.testing.assert_close(again.weights, last.result.weights[last.mask], rtol=1e-6, atol=1e-6)
    shown = subprocess.run([sys.executable, "-m", "srpo_core.cli", "explain", str(files[-1])], capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and "r0-0" in shown.stdout, shown.stdout[-2000:] + shown.stderr[-2000:]
    with pytest.raises(ValueError, match="explain_every"):
        SRPOTrainerOptions(explain_every=-1)


def test_refuses_liger_kernel(processor):
    args = grpo_args(processor.tokenizer)
    args.use_liger_kernel = True
    with pytest.raises(ValueError, match="use_liger_kernel"):
        SRPOGRPOTrainer(model=build_model(processor.tokenizer), reward_funcs=rule_reward, args=args,
                        train_dataset=build_dataset(), processing_class=processor)


def test_refuses_bad_options():
    with pytest.raises(ValueError, match="ablation_mode"):
        SRPOTrainerOptions(ablation_mode="zero")
    with pytest.raises(ValueError, match="corruption_p"):
        SRPOTrainerOptions(corruption_p=1.5)


def test_srpo_grpo_config_drives_the_trainer_and_the_loss_equals_grpo(processor):
    """Settings from SRPOGRPOConfig's flat fields reach the trainer; the logged loss of the first (on-policy) step
    equals GRPO's on the same completions although the advantages differ (each response's weights average 1); the
    srpo/* metrics show the change: per-role share of |A_t| beside GRPO's, the weight spread."""
    config = {"srpo_beta_perception": 1.0, "srpo_beta_reasoning": 0.25, "srpo_ablation_mode": "mask"}
    srpo = run(SRPOGRPOTrainer, processor, steps=1, config_cls=SRPOGRPOConfig, config=config)
    assert srpo.srpo_config == SRPOConfig(beta_perception=1.0, beta_reasoning=0.25)
    assert srpo.srpo_options == SRPOTrainerOptions(ablation_mode="mask")
    grpo = run(GRPOTrainer, processor, steps=1)
    a, b = srpo.seen[0], grpo.seen[0]
    torch.testing.assert_close(a["completion_ids"], b["completion_ids"], rtol=0, atol=0)
    mask = b["completion_mask"].bool()
    grpo_adv = torch.where(mask, b["advantages"][:, None].expand_as(mask), 0.0)
    assert not torch.allclose(a["advantages"], grpo_adv)  # SRPO changed the token advantages ...
    torch.testing.assert_close(srpo.losses[0], grpo.losses[0], rtol=1e-5, atol=1e-6)  # ... but not the loss
    logged = srpo.state.log_history[0]
    last = srpo._srpo_last
    w, adv = last.result.weights, last.result.advantages.abs()
    roles = last.roles.roles.masked_fill(~last.mask, 0)
    for role in (Role.PERCEPTION, Role.REASONING):
        sel = last.mask & (roles == role)
        name = role.name.lower()
        assert logged[f"srpo/{name}/adv_share"] == pytest.approx(float(adv[sel].sum() / adv[last.mask].sum()),
                                                                 rel=1e-5)
        grpo_abs = last.sequence_advantages.abs()[:, None].expand_as(sel)
        assert logged[f"srpo/{name}/adv_share_grpo"] == pytest.approx(
            float(grpo_abs[sel].sum() / grpo_abs[last.mask].sum()), rel=1e-5)
    assert logged["srpo/w_std"] == pytest.approx(float(w[last.mask].std(correction=0)), rel=1e-5)
    assert logged["srpo/w_std"] > 0


def test_the_offline_recipe_in_docs_trl_runs(tmp_path):
    """docs/trl.md's offline recipe, run as written (in a fresh process, from an empty directory)."""
    import os
    import pathlib
    import subprocess
    import sys

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "trl.md").read_text(encoding="utf-8")
    block = text.split("<!-- offline-recipe:begin -->")[1].split("<!-- offline-recipe:end -->")[0]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert "'loss'" in last and "'srpo/perception/adv_share'" in last and "'srpo/w_std'" in last, last
    # save_strategy="steps": the checkpoint holds the processor too (its video_processor=None once crashed the save)
    checkpoint = tmp_path / "srpo-tiny" / "checkpoint-2"
    for name in ("model.safetensors", "processor_config.json", "tokenizer.json", "trainer_state.json"):
        assert (checkpoint / name).is_file(), (name, sorted(p.name for p in tmp_path.rglob("*")))


# ---------------------------------------------------------------- padding side (D238, huggingface/trl#5785)
def two_lengths_dataset():
    """Two prompts whose text differs by two tokens: the shorter one is padded by two in a batch."""
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
             "image": PIL_Image.new("RGB", (56, 56), colour)} for text, colour in (("abc", COLOURS[0]),
                                                                                   ("a", COLOURS[1]))]
    return datasets.Dataset.from_list(rows)


def processor_padding(side):
    processor = build_processor()
    processor.tokenizer.padding_side = side
    return processor


def generation_step(trainer_cls, processor, trainer=None):
    """One ``_generate_and_score_completions`` on 4 completions of each prompt; returns the trainer and its output."""
    data = two_lengths_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if trainer is None:
            trainer = trainer_cls(model=build_model(processor.tokenizer), reward_funcs=rule_reward,
                                  args=grpo_args(processor.tokenizer, max_completion_length=4), train_dataset=data,
                                  processing_class=processor)
        return trainer, trainer._generate_and_score_completions([data[0]] * 4 + [data[1]] * 4)


def misaligned_rows(processor, out) -> list[int]:
    """Rows whose ``mm_token_type_ids`` over the prompt differ from where its ``<|image_pad|>`` tokens are."""
    image = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompt_ids = out["prompt_ids"]
    types = out["mm_token_type_ids"][:, :prompt_ids.shape[1]]
    return [i for i in range(len(prompt_ids)) if not torch.equal(types[i], (prompt_ids[i] == image).to(types.dtype))]


@pytest.mark.parametrize("side", ["right", "left"])
def test_trl_right_padding_shifts_the_image_token_types(side):
    # TRL's own bug, on plain GRPO: the short prompt's rows (4-7) carry image token types two positions off their
    # <|image_pad|> tokens with a right-padding tokenizer. If this starts passing with "right", TRL fixed #5785.
    processor = processor_padding(side)
    _, out = generation_step(GRPOTrainer, processor)
    assert misaligned_rows(processor, out) == ([4, 5, 6, 7] if side == "right" else [])


def test_refuses_a_right_padding_processor():
    processor = processor_padding("right")
    with pytest.raises(ValueError, match=r"processing_class\.tokenizer\.padding_side is 'right'.*trl#5785"):
        SRPOGRPOTrainer(model=build_model(processor.tokenizer), reward_funcs=rule_reward,
                        args=grpo_args(processor.tokenizer), train_dataset=build_dataset(),
                        processing_class=processor)
    check_padding_side(processor.tokenizer)  # a bare tokenizer (text only) has no per-token image fields: accepted


def test_a_left_padding_step_is_aligned_and_a_later_right_side_is_refused():
    processor = processor_padding("left")
    trainer, out = generation_step(SRPOGRPOTrainer, processor)
    assert misaligned_rows(processor, out) == []
    assert out["advantages"].shape == out["completion_ids"].shape  # SRPO scored the step
    processor.tokenizer.padding_side = "right"  # e.g. an evaluation callback that pads on the right
    with pytest.raises(ValueError, match="padding_side is 'right' and was changed after SRPOGRPOTrainer was built"):
        generation_step(SRPOGRPOTrainer, processor, trainer)
