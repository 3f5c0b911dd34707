"""A real, tiny Qwen2-VL with a word-level tokenizer built locally: nothing comes from a hub.

The approach is that of ``tests/test_trl_e2e.py`` (a ``tokenizers`` WordLevel model with Qwen's special tokens, the
``Qwen2VLImageProcessor`` defaults inside a ``Qwen2VLProcessor``, a ``Qwen2VLConfig`` with random weights), made
word-level over the task's vocabulary (:data:`srpo_core.experiment.task.WORDS`) so that one word is one token and the
response tags are single tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from srpo_core.experiment.task import TAGS, WORDS

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "[UNK]")
ROLE_WORDS = ("user", "assistant", "system")
# Qwen2-VL's chat template, reduced to images and text in user turns (as in tests/test_trl_e2e.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Tokens a policy must never emit: vision placeholders would not match the image features.
SUPPRESSED = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "[UNK]",
              "<|endoftext|>")


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The tiny model's size (text and vision towers)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 1
    vision_dim: int = 32


def build_processor():
    """A ``Qwen2VLProcessor`` around a word-level fast tokenizer (whitespace split; tags and special tokens whole)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIAL, *TAGS, *ROLE_WORDS, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins words with spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
                                        padding_side="left")  # as TRL's own processors; SRPOGRPOTrainer needs it (D238)

    return images_only_processor(tokenizer, CHAT_TEMPLATE)


@contextlib.contextmanager
def padding_side(processor, side: str):
    """Inside the block the processor's tokenizer pads on ``side``; the previous side is restored after it."""
    tok = processor.tokenizer
    previous = tok.padding_side
    tok.padding_side = side
    try:
        yield tok
    finally:
        tok.padding_side = previous


def images_only_processor(tokenizer, chat_template: str):
    """A ``Qwen2VLProcessor`` for images only, built offline around ``tokenizer``. Without torchvision transformers
    has no video-processor base class to check a ``video_processor`` against, so ``None`` is accepted for it."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class Processor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    logging.getLogger("transformers").setLevel(logging.ERROR)  # the "falling back to the PIL backend" notice
    return Processor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=None,
                     chat_template=chat_template)


def build_model(tokenizer, size: ModelSize = ModelSize(), seed: int = 0):
    """A ``Qwen2VLForConditionalGeneration`` with random weights drawn from ``seed``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    head_dim = size.hidden // size.heads
    half = head_dim // 2  # M-RoPE sections (t, h, w) must sum to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=2 * size.hidden,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=size.vision_depth, embed_dim=size.vision_dim, hidden_size=size.hidden,
                           num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def suppressed_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in SUPPRESSED]


def prompt_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " " + question + " "}]}]


def prompt_text(processor, question: str) -> str:
    return processor.apply_chat_template(prompt_messages(question), add_generation_prompt=True, tokenize=False)
