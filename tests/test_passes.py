"""``srpo_core.passes`` (issue 24): the extra passes cut after the last needed token, log-probs from hidden states.

On the tiny Qwen2-VL of the TRL tests (M-RoPE, left-padded prompts of one or two images, right-padded completions),
the runner's ``ℓ̃`` and ``ℓ°`` (every ablation mode) equal the former full passes through TRL's
``_get_per_token_logps_and_entropies`` (the trainer's own code paths, ``_srpo_pass_runner`` off and on); ``kl``/``js``
equal the float64 ``token_contrast`` reference on the materialised logits of two full forwards; the cut is real; and
what the runner cannot honour is refused.
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")


def _e2e():  # the tiny Qwen2-VL and its processor (tests/ is not on sys.path under --import-mode=importlib)
    spec = importlib.util.spec_from_file_location("srpo_test_trl_e2e_passes", pathlib.Path(__file__).with_name(
        "test_trl_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_E2E = _e2e()
CHARS, build_model, build_processor = _E2E.CHARS, _E2E.build_model, _E2E.build_processor
from srpo_core import Role, SRPOConfig, passes  # noqa: E402
from srpo_core.adapters._trl_passes import pass_host  # noqa: E402
from srpo_core.adapters.trl import SRPOTrainerOptions  # noqa: E402
from srpo_core.reference.token_contrast import token_contrast as reference_contrast  # noqa: E402

FP32_TOL = dict(rtol=0.0, atol=2e-5)  # fp32 forwards of two lengths: a few ulps of the logits apart
BF16_TOL = dict(rtol=0.0, atol=1e-2)  # bf16 activations of two sequence lengths round apart (seen: 2e-3)


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def make_batch(processor, seed=1):
    """Two prompts × two responses: prompt 0 with one 56×56 image, prompt 1 with a 56×84 and a 56×56 image
    (``num_images = [1, 1, 2, 2]``), left padded; completions of 12/9/7/11 tokens, right padded; roles: OTHER at 0,
    a perception span from 1 (rows of one prompt differ, so counterfactual donors exist), reasoning after it."""
    tok = processor.tokenizer
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "abc"}]}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "a"}]}]
    red = PIL_Image.new("RGB", (56, 56), (255, 0, 0))
    pair = [PIL_Image.new("RGB", (56, 84), (0, 255, 0)), PIL_Image.new("RGB", (56, 56), (0, 0, 255))]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in (one, one, two, two)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = processor(text=texts, images=[red, red, *pair, *pair], return_tensors="pt", padding=True,
                        padding_side="left")
    g = torch.Generator().manual_seed(seed)
    chars = torch.tensor([tok.convert_tokens_to_ids(c) for c in CHARS])
    B, C = 4, 12
    comp = chars[torch.randint(len(chars), (B, C), generator=g)]
    cmask = torch.arange(C)[None] < torch.tensor([12, 9, 7, 11])[:, None]
    comp = comp.masked_fill(~cmask, tok.pad_token_id)
    roles = torch.full((B, C), int(Role.REASONING))
    roles[:, 0] = int(Role.OTHER)
    roles[:, 1:4] = int(Role.PERCEPTION)
    roles[1, 1:6] = int(Role.PERCEPTION)
    roles[3, 1:3] = int(Role.PERCEPTION)
    roles = roles.masked_fill(~cmask, int(Role.OTHER))
    out = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"], "num_images": [1, 1, 2, 2],
           "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(comp)], 1)}
    return dict(out=out, input_ids=torch.cat([enc["input_ids"], comp], 1),
                attention_mask=torch.cat([enc["attention_mask"], cmask.long()], 1), width_p=enc["input_ids"].shape[1],
                roles=roles, mask=cmask, group_ids=torch.tensor([0, 0, 1, 1]))


def run_passes(model, processor, batch, *, runner, batch_size=2, config=None, **options):
    host = pass_host(model, processor, srpo_config=config, srpo_options=SRPOTrainerOptions(**options),
                     pass_runner=runner)
    with torch.no_grad():
        return host._srpo_passes(batch["out"], batch["input_ids"], batch["attention_mask"], batch["width_p"],
                                 batch["roles"], batch["mask"], batch["group_ids"], batch_size)


def compare_old_new(model, processor, batch, tol, **options):
    old = run_passes(model, processor, batch, runner=False, **options)
    new = run_passes(model, processor, batch, runner=True, **options)
    roles, mask = batch["roles"], batch["mask"]
    perception, reasoning = roles == Role.PERCEPTION, roles == Role.REASONING
    torch.testing.assert_close(new.logp[mask], old.logp[mask], **tol)
    torch.testing.assert_close(new.logp_corrupt[perception], old.logp_corrupt[perception], **tol)
    assert torch.equal(new.has_value, old.has_value)
    read = reasoning & old.has_value
    assert int(read.sum()) > 0
    torch.testing.assert_close(new.logp_ablated[read], old.logp_ablated[read], **tol)
    # the signals are not trivially equal: a wrong pass would show
    assert float((old.logp_corrupt - old.logp)[perception].abs().max()) > 5 * tol["atol"]
    assert float((old.logp_ablated - old.logp)[read].abs().max()) > 5 * tol["atol"]
    return old, new


@pytest.mark.parametrize("mode", ["mask", "drop", "counterfactual"])
def test_runner_equals_the_full_passes(processor, mode):
    """ℓ, ℓ̃ (perception tokens) and ℓ° (reasoning tokens with a value) from the runner equal TRL's full passes,
    in chunks of two rows (pixel_values sliced per chunk) and in one chunk."""
    batch = make_batch(processor)
    model = build_model(processor.tokenizer).eval()
    compare_old_new(model, processor, batch, FP32_TOL, ablation_mode=mode)
    new_one_chunk = run_passes(model, processor, batch, runner=True, batch_size=None, ablation_mode=mode)
    new_chunks = run_passes(model, processor, batch, runner=True, batch_size=2, ablation_mode=mode)
    torch.testing.assert_close(new_one_chunk.logp_ablated, new_chunks.logp_ablated, **FP32_TOL)


@pytest.mark.parametrize("head_fp32", [False, True], ids=["bf16-head", "cast_lm_head_to_fp32"])
def test_runner_equals_the_full_passes_bf16(processor, head_fp32):
    batch = make_batch(processor)
    model = build_model(processor.tokenizer).to(torch.bfloat16).eval()
    batch["out"]["pixel_values"] = batch["out"]["pixel_values"].to(torch.bfloat16)
    # cast_lm_head_to_fp32: TRL's head (patched by the first host) and the runner's run in float32 on bf16 states
    hosts = {runner: pass_host(model, processor, cast_lm_head_to_fp32=head_fp32, pass_runner=runner,
                               srpo_options=SRPOTrainerOptions(ablation_mode="counterfactual"))
             for runner in (False, True)}
    args = (batch["out"], batch["input_ids"], batch["attention_mask"], batch["width_p"], batch["roles"],
            batch["mask"], batch["group_ids"], 2)
    with torch.no_grad():
        old, new = hosts[False]._srpo_passes(*args), hosts[True]._srpo_passes(*args)
    mask, perception = batch["mask"], batch["roles"] == Role.PERCEPTION
    read = (batch["roles"] == Role.REASONING) & old.has_value
    torch.testing.assert_close(new.logp[mask], old.logp[mask], **BF16_TOL)
    torch.testing.assert_close(new.logp_corrupt[perception], old.logp_corrupt[perception], **BF16_TOL)
    torch.testing.assert_close(new.logp_ablated[read], old.logp_ablated[read], **BF16_TOL)


def test_runner_honours_temperature_and_the_configs_logit_transform(processor):
    """A temperature, a logit scale and a final soft-cap declared in the config: the runner's log-probs equal TRL's
    fused head, which applies them."""
    batch = make_batch(processor)
    for fields in ({"logit_scale": 4.0}, {"final_logit_softcapping": 0.1}):
        model = build_model(processor.tokenizer).eval()
        for k, v in fields.items():
            setattr(model.config.text_config, k, v)
        old = pass_host(model, processor, pass_runner=False, temperature=0.7)
        new = pass_host(model, processor, pass_runner=True, temperature=0.7)
        args = (batch["out"], batch["input_ids"], batch["attention_mask"], batch["width_p"], batch["roles"],
                batch["mask"], batch["group_ids"], 2)
        with torch.no_grad():
            a, b = old._srpo_passes(*args), new._srpo_passes(*args)
        plain = pass_host(build_model(processor.tokenizer).eval(), processor, pass_runner=False, temperature=0.7)
        with torch.no_grad():
            untransformed = plain._srpo_passes(*args)
        m = batch["mask"]
        assert float((untransformed.logp - a.logp)[m].abs().max()) > 1e-3 # the transform changes the numbers
        torch.testing.assert_close(b.logp[m], a.logp[m], **FP32_TOL)
        read = (batch["roles"] == Role.REASONING) & a.has_value
        torch.testing.assert_close(b.logp_ablated[read], a.logp_ablated[read], **FP32_TOL)


def full_logits(model, batch, **overrides):
    """``float64 [B, L, V]`` logits of one full forward (the model's own head)."""
    out = batch["out"]
    kwargs = {k: out[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    kwargs.update(overrides)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    return logits.double()


@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("logit_scale", [None, 4.0])
def test_contrast_matches_the_float64_reference(processor, kind, logit_scale):
    """The kl/js perception contrast (clean vs corrupted hidden states through linear_token_contrast) equals the
    float64 token_contrast of the two full forwards' materialised logits at the perception tokens; the trainer's
    passes give it as `perception_signal` with ℓ̃ from the same pass."""
    batch = make_batch(processor)
    model = build_model(processor.tokenizer).eval()
    if logit_scale is not None:
        model.config.text_config.logit_scale = logit_scale
    scale = 1.0 if logit_scale is None else logit_scale
    # seed 1: masks (one per prompt and image, _trl_split.corrupt_per_key) that move js ≥ 5e-4 (seed 0: 7e-5)
    host = pass_host(model, processor, srpo_config=SRPOConfig(perception_contrast=kind), temperature=0.8, seed=1)
    corrupted = host._srpo_corrupt(batch["out"], batch["group_ids"])
    width_p, perception = batch["width_p"], batch["roles"] == Role.PERCEPTION
    clean = full_logits(model, batch)[:, width_p - 1:-1][perception] * scale
    dirty = full_logits(model, batch, pixel_values=corrupted)[:, width_p - 1:-1][perception] * scale
    ids = batch["input_ids"][:, width_p:][perception]
    div, lp, lq = reference_contrast(clean, dirty, ids, kind=kind, temperature=0.8)
    assert float(div.max()) > 1e-4  # 50× the tolerance below
    with torch.no_grad():
        res = host._srpo_passes(batch["out"], batch["input_ids"], batch["attention_mask"], width_p, batch["roles"],
                                batch["mask"], batch["group_ids"], 2)
    tol = dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(res.perception_signal[perception].double(), div, **tol)
    torch.testing.assert_close(res.logp_corrupt[perception].double(), lq, **tol)
    torch.testing.assert_close(res.logp[perception].double(), lp, **tol)
    assert not bool(res.perception_signal[~perception].any())
    # with ℓ given (TRL's old_per_token_logps), the clean pass runs cut at the last perception token
    with torch.no_grad():
        given = host._srpo_passes(batch["out"], batch["input_ids"], batch["attention_mask"], width_p,
                                  batch["roles"], batch["mask"], batch["group_ids"], 2, logp=res.logp)
    torch.testing.assert_close(given.perception_signal, res.perception_signal, rtol=0.0, atol=1e-6)


class LengthSpy:
    """Records the sequence length each forward of the decoder sees."""

    def __init__(self, model):
        self.lengths = []
        self.handle = model.model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, args, kwargs):
        self.lengths.append(kwargs["input_ids"].shape[1])


def test_the_cut_is_real(processor):
    """Each chunk's forward sees its rows up to the row before its last needed token (not the batch's length); a
    chunk with no needed token runs no forward; the result still equals the full pass."""
    batch = make_batch(processor)
    model = build_model(processor.tokenizer).eval()
    ids, attn = batch["input_ids"], batch["attention_mask"]
    L, width_p = ids.shape[1], batch["width_p"]
    needed = torch.zeros_like(ids, dtype=torch.bool)
    needed[0, width_p + 2] = needed[1, width_p + 5] = True  # chunk 0: last needed at width_p + 5
    needed[3, width_p + 1] = True  # chunk 1: last needed at width_p + 1
    spy = LengthSpy(model)
    kw = dict(model_kwargs={k: batch["out"][k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")},
              num_images=batch["out"]["num_images"])
    try:
        got = passes.token_logprobs(model, ids, attn, needed, batch_size=2, **kw)
        assert spy.lengths == [width_p + 5, width_p + 1] and width_p + 5 < L
        spy.lengths.clear()
        only_first = needed.clone()
        only_first[2:] = False
        passes.token_logprobs(model, ids, attn, only_first, batch_size=2, **kw)
        assert spy.lengths == [width_p + 5]  # the second chunk needs nothing: no forward
        spy.lengths.clear()
        nothing = passes.token_logprobs(model, ids, attn, torch.zeros_like(needed), batch_size=2, **kw)
        assert spy.lengths == [] and not bool(nothing.any())
    finally:
        spy.handle.remove()
    logits = full_logits(model, batch)
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(got[:, 1:][needed[:, 1:]].double(), want[needed[:, 1:]], rtol=0.0, atol=2e-5)
    assert not bool(got[~needed].any())


def test_a_chunk_runs_when_another_process_needs_it(processor):
    """``on_any_process`` turns each chunk's "I need it" into the processes' joint decision: a chunk this process does
    not need runs when another process does (cut after its last image, or at one position without one), adds no
    value, and leaves the others unchanged; ``ablated_logprobs`` and ``contrast`` pass it on."""
    batch = make_batch(processor)
    model = build_model(processor.tokenizer).eval()
    ids, attn, width_p = batch["input_ids"], batch["attention_mask"], batch["width_p"]
    needed = torch.zeros_like(ids, dtype=torch.bool)
    needed[0, width_p + 2] = True  # chunk 0 only
    kw = dict(model_kwargs={k: batch["out"][k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")},
              num_images=batch["out"]["num_images"], batch_size=2)
    asked = []

    def another_needs_it(flag):
        asked.append(flag)
        return True

    spy = LengthSpy(model)
    try:
        alone = passes.token_logprobs(model, ids, attn, needed, **kw)
        assert spy.lengths == [width_p + 2]
        spy.lengths.clear()
        joint = passes.token_logprobs(model, ids, attn, needed, on_any_process=another_needs_it, **kw)
        last_image = int(torch.nonzero((ids[2:] == model.config.image_token_id).any(0))[-1, 0])
        assert asked == [True, False] and spy.lengths == [width_p + 2, last_image + 1]
        torch.testing.assert_close(joint, alone, rtol=0, atol=0)
        spy.lengths.clear()
        text = dict(batch_size=2)  # no image: the chunk nobody here needs runs one position
        passes.token_logprobs(model, ids[:, width_p:], attn[:, width_p:], needed[:, width_p:],
                              on_any_process=another_needs_it, **text)
        assert spy.lengths == [2, 1]
        spy.lengths.clear()
        span = torch.zeros_like(needed)
        span[:, width_p + 1] = attn[:, width_p + 1].bool()
        la, _ = passes.ablated_logprobs(model, ids, attn, span, needed, mode="drop", on_any_process=another_needs_it,
                                        **kw)
        assert len(spy.lengths) == 2
        spy.lengths.clear()
        passes.contrast(model, ids, attn, needed, {"pixel_values": batch["out"]["pixel_values"] * 0}, kind="kl",
                        on_any_process=another_needs_it, **kw)
        assert len(spy.lengths) == 4  # clean and corrupted, two chunks each
    finally:
        spy.handle.remove()


@pytest.mark.parametrize("kind", ["k3", "kl"])
def test_a_process_without_images_runs_the_passes_of_one_with_them(processor, monkeypatch, kind):
    """A process whose rows have no image (TRL then gives no pixel_values) asks the other processes as many
    questions and runs as many decoder forwards as a process with images, when another process has images (every
    joint answer True): otherwise the all-reduces pair up wrongly and a process hangs (D236). Its ℓ̃ stays ℓ and its
    divergence 0 (nothing to corrupt)."""
    import srpo_core.adapters._trl_passes as trl_passes

    batch = make_batch(processor)
    text = {**batch, "out": {"mm_token_type_ids": torch.zeros_like(batch["out"]["mm_token_type_ids"])}}
    model = build_model(processor.tokenizer).eval()
    asked = []
    monkeypatch.setattr(trl_passes, "on_any_process", lambda _host, flag: (asked.append(flag), True)[1])
    spy = LengthSpy(model)
    counts = {}
    try:
        for name, b in (("images", batch), ("text", text)):
            asked.clear()
            spy.lengths.clear()
            res = run_passes(model, processor, b, runner=True, config=SRPOConfig(perception_contrast=kind))
            counts[name] = (len(asked), len(spy.lengths))
    finally:
        spy.handle.remove()
    assert counts["images"][1] > 0 and counts["text"] == counts["images"], counts
    torch.testing.assert_close(res.logp_corrupt, res.logp, rtol=0, atol=0)
    if kind == "kl":
        assert torch.equal(res.perception_signal, torch.zeros_like(res.logp))


def test_ablated_batch_logprobs_takes_a_prebuilt_batch(processor):
    """``ablated_logprobs`` is ``ablate_span`` then ``ablated_batch_logprobs``; the latter refuses what is not an
    ablated batch of the ``needed`` shape."""
    from srpo_core.ablation import ablate_span

    batch = make_batch(processor)
    model = build_model(processor.tokenizer).eval()
    ids, attn, width_p = batch["input_ids"], batch["attention_mask"], batch["width_p"]
    span = torch.zeros_like(ids, dtype=torch.bool)
    span[:, width_p + 1:width_p + 3] = True
    needed = torch.zeros_like(span)
    needed[:, width_p + 4:width_p + 6] = True
    mm = {k: batch["out"][k] for k in ("pixel_values", "image_grid_thw")}
    want = passes.ablated_logprobs(model, ids, attn, span, needed, mode="drop",
                                   model_kwargs={**mm, "mm_token_type_ids": batch["out"]["mm_token_type_ids"]})
    ab = ablate_span(ids, attn, span, mode="drop")
    got = passes.ablated_batch_logprobs(model, ab, needed, model_kwargs={
        **mm, "mm_token_type_ids": ab.ablate(batch["out"]["mm_token_type_ids"])})
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`ab` must be an srpo_core.ablation.AblatedBatch"):
        passes.ablated_batch_logprobs(model, (ab.input_ids, ab.attention_mask), needed)
    with pytest.raises(ValueError, match=r"`needed` must be \[B, L\] = \[4, "):
        passes.ablated_batch_logprobs(model, ab, needed[:, 1:])
    with pytest.raises(ValueError, match="`mm_token_type_ids` must be"):  # not ablated
        passes.ablated_batch_logprobs(model, ab, needed, model_kwargs={
            **mm, "mm_token_type_ids": batch["out"]["mm_token_type_ids"]})


def test_the_cut_keeps_every_image(processor):
    """A needed token before the second image of a row: the cut moves past that image (its features need their
    placeholder tokens), and the log-prob still equals the full forward's."""
    batch = make_batch(processor)
    model = build_model(processor.tokenizer).eval()
    ids, attn = batch["input_ids"], batch["attention_mask"]
    image = model.config.image_token_id
    row = 2
    first_image = int(torch.nonzero(ids[row] == image)[0, 0])
    needed = torch.zeros_like(ids, dtype=torch.bool)
    needed[row, first_image + 1] = True  # inside the first image's run: the second image comes later
    spy = LengthSpy(model)
    try:
        got = passes.token_logprobs(model, ids, attn, needed, model_kwargs={
            k: batch["out"][k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")})
    finally:
        spy.handle.remove()
    last_image = int(torch.nonzero((ids == image).any(0))[-1, 0])
    assert spy.lengths == [last_image + 1]
    logits = full_logits(model, batch)
    want = torch.log_softmax(logits[row, first_image], -1)[ids[row, first_image + 1]]
    torch.testing.assert_close(got[row, first_image + 1].double(), want, rtol=0.0, atol=2e-5)


def small_inputs(processor):
    batch = make_batch(processor)
    needed = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    needed[:, -3] = batch["attention_mask"][:, -3].bool()
    return batch, needed


def test_refusals_of_the_head(processor):
    batch, needed = small_inputs(processor)
    args = (batch["input_ids"], batch["attention_mask"], needed)
    kw = dict(model_kwargs={k: batch["out"][k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")})

    model = build_model(processor.tokenizer).eval()
    model.config.text_config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0.*no soft-cap"):
        passes.contrast(model, *args, {"pixel_values": batch["out"]["pixel_values"] * 0}, kind="kl", **kw)
    model.config.text_config.final_logit_softcapping = None
    model.config.text_config.logit_scale = -1.0
    with pytest.raises(ValueError, match="logit scale of -1.0"):
        passes.token_logprobs(model, *args, **kw)
    model.config.text_config.logit_scale = None

    class Scaled(torch.nn.Linear):  # a head that adds something to the plain linear map
        def forward(self, x):
            return 2 * super().forward(x)

    head = model.lm_head
    model.lm_head = Scaled(head.in_features, head.out_features, bias=False)
    with pytest.raises(ValueError, match="LM head is a Scaled, not a plain torch.nn.Linear"):
        passes.token_logprobs(model, *args, **kw)
    model.lm_head = head
    head.weight.ds_status = "NOT_AVAILABLE"  # what a DeepSpeed ZeRO-3 partitioned parameter carries
    with pytest.raises(ValueError, match="sharded or partitioned"):
        passes.token_logprobs(model, *args, **kw)
    del head.weight.ds_status
    model.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="no output embeddings"):
        passes.token_logprobs(model, *args, **kw)
    with pytest.raises(ValueError, match="`temperature` must be a positive number, got 0"):
        passes.lm_head(build_model(processor.tokenizer), temperature=0)


def test_refusals_of_the_inputs(processor):
    batch, needed = small_inputs(processor)
    model = build_model(processor.tokenizer).eval()
    ids, attn = batch["input_ids"], batch["attention_mask"]
    first = torch.zeros_like(needed)
    first[0, 0] = True
    with pytest.raises(ValueError, match="`needed` must be False in column 0"):
        passes.token_logprobs(model, ids, attn, first)
    pad = torch.zeros_like(needed)
    pad[1, -1] = True  # row 1's completion ends before the last column
    with pytest.raises(ValueError, match="`needed` must be False where `attention_mask` is 0"):
        passes.token_logprobs(model, ids, attn, pad)
    with pytest.raises(ValueError, match="needed"):
        passes.token_logprobs(model, ids, attn, needed[:, 1:])
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        passes.token_logprobs(model, ids, attn, needed, batch_size=0)
    with pytest.raises(ValueError, match="`position_ids` must be"):
        passes.token_logprobs(model, ids, attn, needed, position_ids=torch.zeros(3, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="`corrupted_kwargs` must be a non-empty dict"):
        passes.contrast(model, ids, attn, needed, {}, kind="kl")
    with pytest.raises(ValueError, match="`clean_hidden` must be"):
        passes.contrast(model, ids, attn, needed, {"pixel_values": batch["out"]["pixel_values"]},
                        clean_hidden=torch.zeros(1, 64))


def test_the_trainer_refuses_what_its_passes_cannot_give(processor):
    batch = make_batch(processor)
    model = build_model(processor.tokenizer).eval()
    with pytest.raises(ValueError, match="perception_contrast='js' needs the pass runner"):
        run_passes(model, processor, batch, runner=False, config=SRPOConfig(perception_contrast="js"))
    from srpo_core.adapters.trl import SRPOGRPOTrainer

    with pytest.raises(ValueError, match="reasoning_contrast='kl' is not supported"):
        SRPOGRPOTrainer(model=model, reward_funcs=[], srpo_config=SRPOConfig(reasoning_contrast="kl"))


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_the_trainer_trains_with_a_divergence_perception_contrast(processor, kind):
    """`perception_contrast="kl"|"js"` (refused before issue 24) is accepted by SRPOGRPOTrainer and reaches the
    weights: the perception tokens' weights are finite and not all equal."""
    from srpo_core.adapters.trl import SRPOGRPOTrainer

    config = SRPOConfig(perception_contrast=kind, beta_perception=1.0)
    trainer = _E2E.run(SRPOGRPOTrainer, processor, steps=1, lr=0.0, srpo_config=config,
                       srpo_options=SRPOTrainerOptions(roles_fn=_E2E.half_perception_half_reasoning))
    last = trainer._srpo_last
    perception = last.mask & (last.roles.roles == Role.PERCEPTION)
    assert int(perception.sum()) > 0
    w = last.result.weights[perception]
    assert bool(torch.isfinite(w).all()) and float(w.std()) > 1e-3


@pytest.mark.parametrize("method", ["vppo", "papo"])
def test_presets_get_the_corrupted_logprobs_of_every_completion_token(processor, method):
    """VPPO and PAPO read ℓ̃ on every completion token (not only perception): the runner computes it there, equal
    to the full pass, and runs no ablated pass."""
    batch = make_batch(processor)
    model = build_model(processor.tokenizer).eval()
    old = run_passes(model, processor, batch, runner=False, method=method)
    new = run_passes(model, processor, batch, runner=True, method=method)
    mask = batch["mask"]
    torch.testing.assert_close(new.logp_corrupt[mask], old.logp_corrupt[mask], **FP32_TOL)
    other = mask & (batch["roles"] != Role.PERCEPTION)
    assert float((old.logp_corrupt - old.logp)[other].abs().max()) > 5 * FP32_TOL["atol"]
    assert new.logp_ablated is None and old.logp_ablated is None
