"""NOT flash-attn: a test-only stand-in for the CUDA-only ``flash-attn==2.8.3`` that OpenRLHF 0.11.2 pins.

``openrlhf.models.ring_attn_utils`` imports four names from ``flash_attn.bert_padding`` and ``all_gather`` from
``flash_attn.utils.distributed`` at module level, and ``openrlhf.trainer.ppo_utils.experience_maker`` imports that
module (through ``openrlhf.models``). The real package cannot be imported without its CUDA extension
(``flash_attn_2_cuda``). This stand-in provides only those names; every function raises when called, so a test
that reached flash-attn code would fail instead of running something else. ``rearrange`` is einops' own (which
``flash_attn.bert_padding`` re-exports). tests/test_adapter_openrlhf_real.py puts this folder at the END of
``sys.path``, and only when no real ``flash_attn`` is importable.
"""

__version__ = "0+srpo-test-stand-in"
IS_SRPO_TEST_STAND_IN = True


def _not_available(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"flash_attn.{name} was called, but this is srpo-core's test stand-in for the CUDA-only "
                           "flash-attn (tests/openrlhf_shim): the code path under test must not reach it")

    fail.__name__ = name.rsplit(".", 1)[-1]
    return fail
