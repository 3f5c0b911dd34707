"""Roles from tagged text: exact labels on hand-written responses, malformed text never raises, tokenizer paths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from srpo_core_test_checks import _tokenizer, raises  # tests/_checks.py

from srpo_core.config import Role
from srpo_core.roles import char_roles, roles_from_text, roles_from_token_ids

O, P, R = int(Role.OTHER), int(Role.PERCEPTION), int(Role.REASONING)
TAG = 3


def char_offsets(text):
    return [(i, i + 1) for i in range(len(text))]


def labels_of(text):
    labels, malformed = char_roles(text)
    return "".join("OPRT"[v] for v in labels), malformed


@pytest.mark.parametrize(
    ("text", "expected", "malformed"),
    [
        pytest.param("<perception>ab</perception><think>cd</think>\\boxed{7}x",
                     "TTTTTTTTTTTTPPTTTTTTTTTTTTTTTTTTTTRRTTTTTTTTRRRRRRRRRO", False, id="well-formed"),
        pytest.param("<think>ab", "TTTTTTTRR", True, id="unclosed-runs-to-end"),
        pytest.param("ab</think>cd", "OOTTTTTTTTOO", True, id="stray-close-ignored"),
        pytest.param("<think>a<perception>b</perception>c</think>",
                     "TTTTTTTRTTTTTTTTTTTTPTTTTTTTTTTTTTRTTTTTTTT", False, id="nested-innermost-wins"),
        pytest.param("<think>a<perception>b</think>c", "TTTTTTTRTTTTTTTTTTTTPTTTTTTTTO", True,
                     id="close-outer-closes-inner"),
        pytest.param("<think>a</think>b<think>c</think>", "TTTTTTTRTTTTTTTTOTTTTTTTRTTTTTTTT", False,
                     id="repeated-spans"),
        pytest.param("x\\boxed{a{b}c}y", "ORRRRRRRRRRRRRO", False, id="boxed-nested-braces"),
        pytest.param("\\boxed{ab", "RRRRRRRRR", True, id="boxed-unclosed"),
        pytest.param("<perception>\\boxed{a}</perception>", "TTTTTTTTTTTTPPPPPPPPPTTTTTTTTTTTTT", False,
                     id="boxed-inside-perception-keeps-span-role"),
        pytest.param("< THINK >a</ think>", "TTTTTTTTTRTTTTTTTTT", False, id="case-and-spaces"),
        pytest.param("", "", False, id="empty"),
        pytest.param("<thinking>a</thinking>", "OOOOOOOOOOOOOOOOOOOOOO", False, id="unknown-tag-is-text"),
    ],
)
def test_char_labels(text, expected, malformed):
    assert labels_of(text) == (expected, malformed)


def test_token_vote_and_tag_tokens():
    text = "<think>ab</think>"
    # tokens: "<think>", "a", "b</think>" (straddles: content char wins), "" (special token)
    offsets = [(0, 7), (7, 8), (8, 17), (0, 0)]
    res = roles_from_text(text, offsets)
    assert res.roles.tolist() == [O, R, R, O]
    assert not res.malformed
    # a tie between a span's content and outside text goes to the lower id: a straddling token never extends a span
    res = roles_from_text("<perception>a</perception>b", [(12, 13), (12, 27)])
    assert res.roles.tolist() == [P, O]
    res = roles_from_text("<perception>a</perception><think>bc</think>", [(12, 37)])
    assert res.roles.tolist() == [R]  # majority


def test_tag_tokens_with_whitespace_are_other():
    """BPE glues a space or newline to a tag (" </think>", "<think>\\n"): such a token is still a tag token."""
    text = "<perception>\n a red cube </perception>\n<think>x</think>"
    pieces = ["<perception>\n", " a", " red", " cube", " </perception>\n", "<think>", "x", "</think>"]
    offsets, pos = [], 0
    for piece in pieces:
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    assert pos == len(text)
    P, R, O = int(Role.PERCEPTION), int(Role.REASONING), int(Role.OTHER)
    assert roles_from_text(text, offsets).roles.tolist() == [O, P, P, P, O, O, R, O]
    # A whitespace-only token inside a span (no tag text) keeps the span's role.
    assert roles_from_text("<think>a b</think>", [(0, 7), (7, 8), (8, 9), (9, 10), (10, 18)]).roles.tolist() == \
        [O, R, R, R, O]


def test_custom_tags_and_overlap_error():
    res = roles_from_text("<look>a</look><why>b</why>", char_offsets("<look>a</look><why>b</why>"),
                          perception_tags=("look",), reasoning_tags=("why",))
    assert res.roles.tolist().count(P) == 1 and res.roles.tolist().count(R) == 1
    with pytest.raises(ValueError, match="both `perception_tags` and `reasoning_tags`"):
        roles_from_text("a", [(0, 1)], perception_tags=("x",), reasoning_tags=("x",))


def test_bad_offsets_raise():
    with pytest.raises(ValueError, match="offsets"):
        roles_from_text("ab", [(0, 3)])
    with pytest.raises(TypeError, match="text"):
        roles_from_text(b"ab", [(0, 1)])


PIECES = ["<perception>", "</perception>", "<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "{", "}",
          "a", "b", " ", "\n", "é", "<", ">", "/", "<caption >", "</ reasoning>"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30), st.data())
def test_malformed_text_never_raises(pieces, data):
    text = "".join(pieces)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=12)) + [0, len(text)]))
    offsets = list(zip(cuts[:-1], cuts[1:], strict=True))
    res = roles_from_text(text, offsets)
    assert res.roles.shape == (len(offsets),)
    assert set(res.roles.tolist()) <= {O, P, R}
    labels, _ = char_roles(text)
    # a token made only of tag characters is OTHER
    for (s, e), r in zip(offsets, res.roles.tolist(), strict=True):
        if e > s and all(v == TAG for v in labels[s:e]):
            assert r == O


# ----------------------------------------------------------------------------- tokenizers
tokenizers = pytest.importorskip("tokenizers")


def byte_bpe(merges=()):
    """A byte-level BPE tokenizer (Qwen's kind) with the given merges and tags as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<perception>", "</perception>",
                                                                               "<think>", "</think>")])
    return tok


def test_token_ids_canonical_path_matches_text():
    tok = byte_bpe()
    text = "<perception>réd</perception><think>so</think>\\boxed{2}<|im_end|>"
    ids = tok.encode(text).ids
    res = roles_from_token_ids(torch.tensor([ids]), tok)
    assert len(ids) == 20  # "é" is two byte tokens
    # <perception> r é é d </perception> <think> s o </think> \ b o x e d { 2 } <|im_end|>
    assert res.roles[0].tolist() == [O, P, P, P, P, O, O, R, R, O] + [R] * 9 + [O]
    assert res.num_malformed == 0


def test_token_ids_noncanonical_sequence_uses_streaming_offsets():
    tok = byte_bpe(merges=[("a", "b")])
    ab = tok.token_to_id("ab")
    a, b = tok.token_to_id("a"), tok.token_to_id("b")
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    # "a","b" sampled separately is not the canonical tokenization ("ab"): the re-encoding differs
    ids = [think, a, b, ab, end, a]
    res = roles_from_token_ids(torch.tensor([ids]), tok)
    assert res.roles[0].tolist() == [O, R, R, R, O, O]


def test_batch_mask_padding_and_malformed_count():
    tok = byte_bpe()
    rows = ["<think>ab</think>", "<perception>a", "ab</think>"]
    encoded = [tok.encode(t).ids for t in rows]
    width = max(map(len, encoded)) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = True
    ids[~mask] = tok.token_to_id("<think>")  # garbage outside the mask is never read
    res = roles_from_token_ids(ids, tok, mask)
    assert res.roles.shape == ids.shape
    assert bool((res.roles[~mask] == 0).all())
    assert res.roles[0, mask[0]].tolist() == [O, R, R, O]
    assert res.roles[1, mask[1]].tolist() == [O, P]
    assert res.malformed.tolist() == [False, True, True] and res.num_malformed == 2


def test_accepts_transformers_tokenizers_and_processors():
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_bpe())
    ids = torch.tensor([fast("<think>a</think>")["input_ids"]])
    assert roles_from_token_ids(ids, fast).roles[0].tolist() == [O, R, O]

    class Holder:
        tokenizer = fast

    assert roles_from_token_ids(ids, Holder()).roles[0].tolist() == [O, R, O]
    with pytest.raises(TypeError, match="fast"):
        roles_from_token_ids(ids, object())
    with pytest.raises(TypeError, match="integer"):
        roles_from_token_ids(ids.float(), fast)


def test_tag_tokens_added_split_and_mixed():
    """The perception tag tokens: added tokens, tags split into byte tokens, a token mixing a tag with text (not a
    tag token), padding outside ``mask`` and other tags (never marked)."""
    from srpo_core.roles import tag_tokens_from_token_ids

    tok = byte_bpe()
    ids = tok.encode("<perception>réd</perception><think>so</think>").ids
    got = tag_tokens_from_token_ids(torch.tensor([ids]), tok)
    assert got[0].tolist() == [True, False, False, False, False, True] + [False] * (len(ids) - 6)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["d<"] = len(vocab)
    bare = Tokenizer(models.BPE(vocab=vocab, merges=[("d", "<")]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bare.decoder = decoders.ByteLevel()
    text = "<perception>rd</perception> ok"
    ids2 = bare.encode(text).ids
    pieces = [bare.decode([i]) for i in ids2]
    # "<perception>" as 12 byte tokens, "r", "d<" (content and tag text), "/perception>" as 12, " ", "o", "k"
    assert pieces[12:14] == ["r", "d<"] and len(pieces) == 12 + 2 + 12 + 3
    got2 = tag_tokens_from_token_ids(torch.tensor([ids2 + [0, 0]]), bare,
                                     torch.tensor([[True] * len(ids2) + [False, False]]))[0].tolist()
    expect = [True] * 12 + [False, False] + [True] * 12 + [False] * 3 + [False, False]
    assert got2 == expect, list(zip(pieces, got2, strict=False))


def test_tag_tokens_needs_a_tag():
    from srpo_core.roles import tag_tokens_from_token_ids

    with pytest.raises(ValueError, match="`tags` must name at least one tag"):
        tag_tokens_from_token_ids(torch.tensor([[1, 2]]), byte_bpe(), tags=())


def test_tag_tokens_checks_ids_like_roles():
    from srpo_core.roles import tag_tokens_from_token_ids

    tok = byte_bpe()
    with pytest.raises(ValueError, match="tag_tokens_from_token_ids: `token_ids` must be in"):
        tag_tokens_from_token_ids(torch.tensor([[1, 10**6]]), tok)


# -- what the fuzz found: roles_from_text offsets and tags -----------------------------------------------------------
@pytest.mark.parametrize("offsets", [
    [(0, 0, 0), (0, 0, 0)], [(0.5, 1.7)], None, [0, 1, 2, 3], [(0, 1), (2,)], "0,1", [("0", "1")], [(True, 1)],
    torch.tensor([[0.0, 1.0]]), torch.zeros(2, 3, dtype=torch.int64), {(0, 1)},
])
def test_roles_from_text_refuses_bad_offsets(offsets):
    with raises(TypeError, "roles_from_text", "`offsets`"):
        roles_from_text("<think>ab</think>", offsets)


def test_roles_from_text_offsets_out_of_range_and_huge():
    with raises(ValueError, "roles_from_text", "`offsets`"):
        roles_from_text("abc", [(0, 4)])
    with raises(ValueError, "roles_from_text", "`offsets`"):
        roles_from_text("abc", [(0, 2**70)])
    assert roles_from_text("abc", []).roles.tolist() == []
    assert roles_from_text("abc", torch.tensor([[0, 3]])).roles.tolist() == [0]


@pytest.mark.parametrize("tags", [(None,), "think", ("",), (3,), None])
def test_roles_from_text_refuses_bad_tags(tags):
    with raises(TypeError, "roles_from_text", "`perception_tags`"):
        roles_from_text("<think>ab</think>", [(0, 1)], perception_tags=tags)


# -- what the fuzz found: roles_from_token_ids ids against the vocabulary --------------------------------------------
@pytest.mark.parametrize("bad", [3, -1, -100, 2**40])
def test_roles_from_token_ids_refuses_ids_outside_the_vocabulary(bad):
    ids = torch.tensor([[0, 1, bad]])
    with raises(ValueError, "roles_from_token_ids", "`token_ids`", "[0, 3)", "(0, 2)"):
        roles_from_token_ids(ids, _tokenizer())
    # Outside the mask the same id is never read.
    out = roles_from_token_ids(ids, _tokenizer(), mask=torch.tensor([[True, True, False]]))
    assert out.roles.tolist() == [[0, 0, 0]]
