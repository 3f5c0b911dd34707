"""Stand-in (see ``flash_attn/__init__.py``): ``all_gather``, which ``openrlhf.models.ring_attn_utils`` imports; it
raises."""

from flash_attn import _not_available

all_gather = _not_available("utils.distributed.all_gather")
