"""Token roles from tagged responses: ``<perception>…</perception>`` → PERCEPTION, ``<think>…</think>`` → REASONING.

A response like ``<perception>a red square</perception><think>red means …</think>\\boxed{A}`` is labelled character by
character, then each token takes the role of its characters through a fast tokenizer's offset mapping:

- characters inside a perception span are PERCEPTION, inside a reasoning span REASONING;
- the tag text itself (``<think>``, ``</think>``) and everything outside the spans is OTHER;
- ``\\boxed{…}`` outside any span (braces balanced) counts as REASONING: it is the final answer.

Malformed text never raises. An unclosed span runs to the end of the text, a stray closing tag is ignored, a closing
tag that is not the innermost open one closes everything opened after it, nested spans take the innermost tag's role,
repeated spans are simply labelled again. Each of these (and an unclosed ``\\boxed{``) marks the response malformed,
so trainers can log how often the policy breaks the format.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import torch

from srpo_core._validate import describe, first_true_index, refuse_meta, require_same_shape, require_tensor
from srpo_core.config import Role

__all__ = ["PERCEPTION_TAGS", "REASONING_TAGS", "TextRoles", "TokenRoles", "char_roles", "roles_from_text",
           "roles_from_token_ids", "tag_tokens_from_token_ids", "token_offsets"]

PERCEPTION_TAGS = ("perception", "description", "caption")
REASONING_TAGS = ("think", "reasoning", "answer")

_TAG_CHAR = 3  # label of characters that belong to a tag's own text (role OTHER, excluded from the token vote)
_BOXED = re.compile(r"\\boxed\s*\{")


class TextRoles(NamedTuple):
    """``roles: int64 [n_tokens]`` and whether the text was malformed."""

    roles: torch.Tensor
    malformed: bool


class TokenRoles(NamedTuple):
    """``roles: int64 [B, T]`` (0 outside ``mask``), ``malformed: bool [B]``, ``num_malformed``: their count."""

    roles: torch.Tensor
    malformed: torch.Tensor
    num_malformed: int


def _tag_pattern(names: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"<\s*(/?)\s*({alternatives})\s*>", re.IGNORECASE)


def char_roles(text: str, *, perception_tags: tuple[str, ...] = PERCEPTION_TAGS,
               reasoning_tags: tuple[str, ...] = REASONING_TAGS) -> tuple[np.ndarray, bool]:
    """Per-character labels ``int8 [len(text)]`` (0 OTHER, 1 PERCEPTION, 2 REASONING, 3 tag text) and ``malformed``."""
    overlap = {t.lower() for t in perception_tags} & {t.lower() for t in reasoning_tags}
    if overlap:
        raise ValueError(f"roles: a tag cannot be both perception and reasoning, got {sorted(overlap)} in both")
    role_of = {t.lower(): int(Role.PERCEPTION) for t in perception_tags}
    role_of.update({t.lower(): int(Role.REASONING) for t in reasoning_tags})
    labels = np.zeros(len(text), dtype=np.int8)
    malformed = False
    stack: list[tuple[str, int]] = []  # open tags: (name, role)
    cursor = 0
    outside: list[tuple[int, int]] = []  # stretches of text outside every span, for \boxed{…}

    def fill(start: int, end: int) -> None:
        if start >= end:
            return
        if stack:
            labels[start:end] = stack[-1][1]
        else:
            outside.append((start, end))

    if role_of:
        for m in _tag_pattern(tuple(role_of)).finditer(text):
            fill(cursor, m.start())
            labels[m.start():m.end()] = _TAG_CHAR
            cursor = m.end()
            closing, name = bool(m.group(1)), m.group(2).lower()
            if not closing:
                stack.append((name, role_of[name]))
                continue
            depth = next((k for k in range(len(stack) - 1, -1, -1) if stack[k][0] == name), None)
            if depth is None:
                malformed = True  # stray closing tag: ignored
                continue
            if depth != len(stack) - 1:
                malformed = True  # closes tags opened after it too
            del stack[depth:]
    fill(cursor, len(text))
    if stack:
        malformed = True  # unclosed span: runs to the end

    for start, end in outside:
        pos = start
        while True:
            m = _BOXED.search(text, pos, end)
            if m is None:
                break
            depth, k = 1, m.end()
            while k < end and depth:
                depth += {"{": 1, "}": -1}.get(text[k], 0)
                k += 1
            if depth:
                malformed = True  # unclosed \boxed{: runs to the end of the stretch
            labels[m.start():k] = int(Role.REASONING)
            pos = k
    return labels, malformed


def roles_from_text(text: str, offsets, *, perception_tags: tuple[str, ...] = PERCEPTION_TAGS,
                    reasoning_tags: tuple[str, ...] = REASONING_TAGS) -> TextRoles:
    """Roles of the tokens of ``text`` given their character ``offsets`` (``[(start, end), …]`` or ``int [n, 2]``).

    A token takes the majority role of its characters that are not tag text (ties go to the lower role id, so a token
    that straddles a span boundary never extends the span); a token made only of tag text and whitespace
    (``" </think>"``), or with an empty span (special tokens), is OTHER.
    """
    if not isinstance(text, str):
        raise TypeError(f"roles_from_text: `text` must be a str, got {describe(text)}")
    offs = _offsets(offsets, len(text))
    _check_tags("roles_from_text", perception_tags=perception_tags, reasoning_tags=reasoning_tags)
    labels, malformed = char_roles(text, perception_tags=perception_tags, reasoning_tags=reasoning_tags)
    # counts[k, i] = number of characters with label k in text[:i], for k = OTHER, PERCEPTION, REASONING
    onehot = labels[None, :] == np.arange(3, dtype=np.int8)[:, None]
    counts = np.concatenate([np.zeros((3, 1), dtype=np.int64), np.cumsum(onehot, axis=1)], axis=1)
    per_token = counts[:, offs[:, 1]] - counts[:, offs[:, 0]]  # [3, n]
    roles = np.where(per_token.sum(0) > 0, per_token.argmax(0), int(Role.OTHER))
    # A tag token with a leading or trailing space (" </think>", "<think>\n") is a tag token: its whitespace does
    # not vote, so the closing tag never takes the span's role.
    is_tag = labels == _TAG_CHAR
    is_ws = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if text else np.zeros(0, dtype=np.uint32)
    is_ws = np.isin(is_ws, np.frombuffer(" \t\n\r\f\v".encode("utf-32-le"), dtype=np.uint32)) & ~is_tag
    cum = np.concatenate([np.zeros((2, 1), dtype=np.int64), np.cumsum(np.stack([is_tag, is_ws]), axis=1)], axis=1)
    n_tag, n_ws = cum[:, offs[:, 1]] - cum[:, offs[:, 0]]
    roles = np.where((n_tag > 0) & (n_ws == per_token.sum(0)), int(Role.OTHER), roles)
    return TextRoles(torch.from_numpy(roles.astype(np.int64)), malformed)


def _offsets(offsets, n_chars: int) -> np.ndarray:
    """``offsets`` → ``int64 [n, 2]``: a sequence of ``(start, end)`` int pairs or an integer ``[n, 2]`` tensor /
    array, ``0 <= start <= end <= n_chars`` (decision D89: nothing is reshaped, rounded or truncated)."""
    op = "roles_from_text"
    want = "a sequence of (start, end) int pairs or an integer [n, 2] tensor"
    if isinstance(offsets, (torch.Tensor, np.ndarray)):
        arr = offsets.detach().cpu().numpy() if isinstance(offsets, torch.Tensor) else offsets
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer) or not (
                arr.ndim == 2 and arr.shape[1] == 2 or arr.size == 0 and arr.ndim in (1, 2)):
            raise TypeError(f"{op}: `offsets` must be {want}, got {describe(offsets)}")
        offs = arr.astype(np.int64).reshape(-1, 2)
    elif isinstance(offsets, (list, tuple)):
        for k, pair in enumerate(offsets):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                    isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in pair)):
                raise TypeError(f"{op}: `offsets` must be {want}; offsets[{k}] is {describe(pair)}")
        if any(abs(int(v)) >= 2**62 for pair in offsets for v in pair):
            raise ValueError(f"{op}: `offsets` must be (start, end) pairs within the text (len {n_chars}), got a "
                             "value beyond int64")
        offs = np.asarray([[int(a), int(b)] for a, b in offsets], dtype=np.int64).reshape(-1, 2)
    else:
        raise TypeError(f"{op}: `offsets` must be {want}, got {describe(offsets)}")
    if offs.size and (offs.min() < 0 or offs.max() > n_chars or bool((offs[:, 1] < offs[:, 0]).any())):
        raise ValueError(f"{op}: `offsets` must be (start, end) pairs with 0 <= start <= end <= "
                         f"len(text) = {n_chars}, got min {offs.min()} max {offs.max()}")
    return offs


def _check_tags(op: str, **tags) -> None:
    for name, value in tags.items():
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                isinstance(t, str) and t for t in value):
            raise TypeError(f"{op}: `{name}` must be a tuple of non-empty tag names (str), got {describe(value)}")
    overlap = {t.lower() for t in tags["perception_tags"]} & {t.lower() for t in tags["reasoning_tags"]}
    if overlap:
        raise ValueError(f"{op}: a tag cannot be in both `perception_tags` and `reasoning_tags`, got "
                         f"{sorted(overlap)} in both")


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer or a processor holding one."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors hold the tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None and type(tok).__module__.startswith("tokenizers"):
        backend = tok
    if backend is None:
        raise TypeError(f"roles_from_token_ids: `tokenizer` must be a fast (Rust-backed) tokenizer, a processor "
                        f"holding one, or a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    return backend


def token_offsets(ids: list[int], backend) -> tuple[str, np.ndarray]:
    """Decoded text of ``ids`` and each token's ``(start, end)`` character span in it.

    The fast path re-encodes the decoded text and uses the tokenizer's offset mapping when the ids come back
    unchanged (the usual case). Otherwise (a sampled sequence that is not the canonical tokenization) the text is
    decoded token by token with a streaming decoder, which gives every token its exact span; a token that only
    completes a multi-byte character later gets the empty span and so role OTHER.
    """
    text = backend.decode(ids, skip_special_tokens=False)
    enc = backend.encode(text, add_special_tokens=False)
    if list(enc.ids) == list(ids):
        return text, np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    pieces, offsets, pos = [], [], 0
    for i in ids:
        chunk = stream.step(backend, int(i)) or ""
        pieces.append(chunk)
        offsets.append((pos, pos + len(chunk)))
        pos += len(chunk)
    return "".join(pieces), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def _checked_batch(op: str, token_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The shared argument checks of the ``*_from_token_ids`` functions; returns ``mask`` as bool (all True if None)."""
    require_tensor(op, "token_ids", token_ids, kind="int", ndim=2)
    if mask is None:
        mask = torch.ones_like(token_ids, dtype=torch.bool)
    require_tensor(op, "mask", mask, ndim=2)
    require_same_shape(op, "token_ids", token_ids, mask=mask)
    refuse_meta(op, token_ids=token_ids, mask=mask)
    return mask.bool()


def _row_texts(op: str, token_ids: torch.Tensor, mask: torch.Tensor, tokenizer):
    """Yield ``(b, row_mask, text, offsets)`` for each row with a token inside ``mask``: its decoded text and each
    token's character span (:func:`token_offsets`), after checking the ids are in the tokenizer's vocabulary."""
    backend = _backend(tokenizer)
    vocab = backend.get_vocab_size(with_added_tokens=True)
    read = token_ids[mask]
    bad = (read < 0) | (read >= vocab)
    if bool(bad.any()):
        full = torch.zeros_like(mask)
        full[mask] = bad
        first = first_true_index(full)
        raise ValueError(f"{op}: `token_ids` must be in [0, {vocab}) (the tokenizer's vocabulary, added tokens "
                         f"included) inside `mask`, got {int(bad.sum())} id(s) outside it; first at index {first}: "
                         f"{int(token_ids[first])}")
    ids_cpu, mask_cpu = token_ids.detach().cpu(), mask.detach().cpu()
    for b in range(token_ids.shape[0]):
        ids = ids_cpu[b][mask_cpu[b]].tolist()
        if ids:
            text, offsets = token_offsets(ids, backend)
            yield b, mask_cpu[b], text, offsets


def roles_from_token_ids(token_ids: torch.Tensor, tokenizer, mask: torch.Tensor | None = None, *,
                         perception_tags: tuple[str, ...] = PERCEPTION_TAGS,
                         reasoning_tags: tuple[str, ...] = REASONING_TAGS) -> TokenRoles:
    """Roles of a batch of responses.

    Args:
        token_ids: ``int [B, T]`` response tokens.
        tokenizer: a fast tokenizer (``PreTrainedTokenizerFast``), a processor holding one, or a
            ``tokenizers.Tokenizer``.
        mask: ``bool [B, T]`` marking the response tokens (default: all). Each row's valid tokens are read in order.

    Returns:
        :class:`TokenRoles`: ``roles int64 [B, T]`` (0 outside ``mask``), ``malformed bool [B]`` and their count.
    """
    op = "roles_from_token_ids"
    mask = _checked_batch(op, token_ids, mask)
    _check_tags(op, perception_tags=perception_tags, reasoning_tags=reasoning_tags)
    roles = torch.zeros(token_ids.shape, dtype=torch.int64)
    malformed = torch.zeros(token_ids.shape[0], dtype=torch.bool)
    for b, row, text, offsets in _row_texts(op, token_ids, mask, tokenizer):
        r = roles_from_text(text, offsets, perception_tags=perception_tags, reasoning_tags=reasoning_tags)
        roles[b, row] = r.roles
        malformed[b] = r.malformed
    return TokenRoles(roles.to(token_ids.device), malformed.to(token_ids.device), int(malformed.sum()))


def tag_tokens_from_token_ids(token_ids: torch.Tensor, tokenizer, mask: torch.Tensor | None = None, *,
                              tags: tuple[str, ...] = PERCEPTION_TAGS) -> torch.Tensor:
    """``bool [B, T]``: the response tokens made only of ``tags`` text (``<perception>``, ``</perception>``; case and
    inner whitespace as :func:`roles_from_text` accepts them) and whitespace, e.g. to drop the tags with the span:
    ``ablate_span(..., tags_mask=…)``. A token that mixes tag text with other text is not marked (it carries content).

    Args: as :func:`roles_from_token_ids`; ``tags``: the tag names to mark.
    """
    op = "tag_tokens_from_token_ids"
    mask = _checked_batch(op, token_ids, mask)
    _check_tags(op, tags=tags, perception_tags=tags, reasoning_tags=())
    if not tags:
        raise ValueError(f"{op}: `tags` must name at least one tag, got an empty {type(tags).__name__}")
    out = torch.zeros(token_ids.shape, dtype=torch.bool)
    pattern = _tag_pattern(tuple(tags))
    for b, row, text, offsets in _row_texts(op, token_ids, mask, tokenizer):
        is_tag = np.zeros(len(text), dtype=bool)
        for m in pattern.finditer(text):
            is_tag[m.start():m.end()] = True
        marks = []
        for start, end in np.asarray(offsets).reshape(-1, 2).tolist():
            chars = range(start, end)
            marks.append(any(is_tag[i] for i in chars) and all(is_tag[i] or text[i].isspace() for i in chars))
        out[b, row] = torch.tensor(marks, dtype=torch.bool)
    return out.to(token_ids.device)

