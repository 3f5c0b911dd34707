"""Stand-in (see ``flash_attn/__init__.py``): the names ``openrlhf.models.ring_attn_utils`` imports; they raise."""

from einops import rearrange  # noqa: F401  (flash_attn.bert_padding re-exports einops' rearrange)

from flash_attn import _not_available

index_first_axis = _not_available("bert_padding.index_first_axis")
pad_input = _not_available("bert_padding.pad_input")
unpad_input = _not_available("bert_padding.unpad_input")
