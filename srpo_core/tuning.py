"""Every size knob of the CPU paths and Triton launchers in one object, :data:`TUNING`, read at call time.

A knob changes how much work one step of a path does (how many logits a chunk or tile holds), never a result: each
value gives the same outputs to rounding. The paths read ``TUNING.<field>`` when they run, so a test or a benchmark
changes one with ``monkeypatch.setattr(TUNING, "linear_vocab_tile", 7)`` (or plain assignment) and the next call
uses it.

Environment variables (read here only, once at import for the sizes, live for the switches):

- ``SRPO_LINEAR_TILE_ELEMENTS``: ``linear_tile_elements`` (default 2²¹).
- ``SRPO_LINEAR_VOCAB_TILE``: ``linear_vocab_tile`` (default 1024).
- ``SRPO_LINEAR_FWD_TILE_SCALE``: ``linear_forward_tile_scale`` (default 2).
- ``SRPO_POLICY_LOSS_TOKEN_CHUNK``: ``policy_loss_token_chunk`` (default 192).
- ``SRPO_POLICY_LOSS_CHUNK_ELEMENTS``: ``policy_loss_chunk_elements`` (default 2²⁶).
- ``SRPO_NO_COMPILE=1``: :attr:`Tuning.compile` is False (the CPU paths run eager chunks), unless ``use_compile``
  says otherwise.
- ``SRPO_AUTOTUNE=1``: :attr:`Tuning.autotune`: the ``linear_token_logprobs`` launchers time their tile candidates
  once per shape key instead of taking the pinned per-arch tiles.
- ``SRPO_POISON=1``: :attr:`Tuning.poison`: kernel and large CPU outputs are allocated filled with NaN (or the
  dtype's largest integer), so a test notices any element a path forgot to write.

Which size fields came from the environment is recorded in ``user_set`` (the policy-loss CPU path keeps a
user's chunk sizes as given instead of enlarging them).
"""

from __future__ import annotations

import dataclasses
import os

_SIZE_ENV = {
    "linear_tile_elements": "SRPO_LINEAR_TILE_ELEMENTS",
    "linear_vocab_tile": "SRPO_LINEAR_VOCAB_TILE",
    "linear_forward_tile_scale": "SRPO_LINEAR_FWD_TILE_SCALE",
    "policy_loss_token_chunk": "SRPO_POLICY_LOSS_TOKEN_CHUNK",
    "policy_loss_chunk_elements": "SRPO_POLICY_LOSS_CHUNK_ELEMENTS",
}


@dataclasses.dataclass
class Tuning:
    """Size knobs (elements are values of a ``[rows, V]`` tensor; bytes are bytes) and switches.

    ``token_logprobs`` CPU path:
        token_logprobs_chunk_elements: eager chunks hold ``rows · V ≤`` this (two fp32 workspaces of it at most).
        token_logprobs_compiled_chunk_elements: compiled chunks (no ``[rows, V]`` temporaries; keeps int32 indices).
        token_logprobs_compile_min_elements: inputs with ``N · V`` below this run eager (a compile would not pay).
        token_logprobs_shift_chunk_bytes: the one-read forward (no entropy) takes rows of about this many fp32 bytes.
    ``token_contrast`` CPU path:
        token_contrast_chunk_elements: ``rows · V`` per chunk of each logit set.
        token_contrast_compile_min_elements: below this ``N · V``, eager chunks.
    ``linear_token_logprobs`` / ``linear_token_contrast`` CPU paths:
        linear_tile_elements: a backward ``[token_chunk, vocab_tile]`` tile holds at most this many logits.
        linear_vocab_tile: vocabulary rows per backward tile.
        linear_forward_tile_scale: the forward tiles are this many times larger on both sides.
        linear_contrast_slow_chunk_elements: float64 logits per condition the slow (non-finite rows) redo holds.
        linear_contrast_js_chunk_elements: unsharded ``js``: logits per condition per row chunk.
    Triton launchers of the linear ops:
        linear_triton_target_programs: the forward splits the vocabulary until about this many programs run.
        linear_triton_bwd_chunk_elements: the backward's ``G`` buffer holds at most this many elements.
    ``role_aware_advantages`` CPU path:
        role_advantages_min_compile_tokens: grids with fewer elements run the eager passes (a compile costs seconds).
        role_advantages_max_grid_waste, role_advantages_max_grid_cells: a batch whose ``[B, L]`` grid holds more
            than ``waste · N`` and more than ``cells`` cells (very uneven lengths) is routed to the reference.
    ``linear_policy_loss``:
        policy_loss_token_chunk: tokens per CPU chunk. bf16/fp16 with a weight gradient may still run all tokens in
            one chunk when that is faster, unless this field (or the next) is in ``user_set``: a size set through
            ``SRPO_POLICY_LOSS_*`` is, one set in code is not unless its name is added to ``user_set`` too.
        policy_loss_dot_block: vocabulary rows per block of the entropy's ``Σ e·x`` (a ``[k, block]`` temporary).
        policy_loss_chunk_elements: a CPU ``[k, V]`` tile holds at most this many logits.
        policy_loss_triton_tile_bytes: the Triton path's ``[k, V]`` logits tile is at most this many bytes.
    Switches:
        use_compile: None (default): :attr:`compile` follows ``SRPO_NO_COMPILE``; True / False force it.
        user_set: the size fields set from the environment.
    """

    token_logprobs_chunk_elements: int = 1 << 21
    token_logprobs_compiled_chunk_elements: int = 1 << 26
    token_logprobs_compile_min_elements: int = 1 << 22
    token_logprobs_shift_chunk_bytes: int = 1 << 23
    token_contrast_chunk_elements: int = 1 << 22
    token_contrast_compile_min_elements: int = 1 << 22
    linear_tile_elements: int = 1 << 21
    linear_vocab_tile: int = 1024
    linear_forward_tile_scale: int = 2
    linear_contrast_slow_chunk_elements: int = 1 << 20
    linear_contrast_js_chunk_elements: int = 1 << 23
    linear_triton_target_programs: int = 1024
    linear_triton_bwd_chunk_elements: int = 1 << 26
    role_advantages_min_compile_tokens: int = 1 << 18
    role_advantages_max_grid_waste: int = 8
    role_advantages_max_grid_cells: int = 1 << 22
    policy_loss_token_chunk: int = 192
    policy_loss_dot_block: int = 2048
    policy_loss_chunk_elements: int = 1 << 26
    policy_loss_triton_tile_bytes: int = 1 << 30
    use_compile: bool | None = None
    user_set: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, environ=None) -> Tuning:
        """The defaults, with the sizes the ``SRPO_*`` variables of ``environ`` (default ``os.environ``) set."""
        environ = os.environ if environ is None else environ
        sizes = {}
        for field, var in _SIZE_ENV.items():
            if var in environ:
                raw = environ[var]
                try:
                    sizes[field] = int(raw)
                except ValueError:
                    sizes[field] = 0
                if sizes[field] < 1:
                    raise ValueError(f"srpo_core: the environment variable {var} must be a positive integer "
                                     f"(it sets TUNING.{field}), got {raw!r}")
        return cls(**sizes, user_set=frozenset(sizes))

    @property
    def compile(self) -> bool:
        """Whether the CPU paths may ``torch.compile`` their chunk functions: ``use_compile`` when set, else not
        ``SRPO_NO_COMPILE=1`` (read live)."""
        if self.use_compile is not None:
            return self.use_compile
        return os.environ.get("SRPO_NO_COMPILE", "0") != "1"

    @property
    def autotune(self) -> bool:
        """``SRPO_AUTOTUNE=1`` (read live): time the Triton tile candidates instead of the pinned tiles."""
        return os.environ.get("SRPO_AUTOTUNE", "0") == "1"

    @property
    def poison(self) -> bool:
        """``SRPO_POISON=1`` (read live): outputs are allocated poisoned (NaN / the dtype's largest integer)."""
        return os.environ.get("SRPO_POISON", "0") == "1"


TUNING = Tuning.from_env()

__all__ = ["TUNING", "Tuning"]
