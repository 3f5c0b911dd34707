"""Helpers the test files share (registered by conftest.py as ``srpo_core_test_checks``): ``raises`` (``pytest.raises``
that also requires fragments of the message), small valid ``role_aware_advantages`` calls (``padded``,
``packed``, ``call``) and a three-word tokenizer (``_tokenizer``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from srpo_core import Role, role_aware_advantages


@contextlib.contextmanager
def raises(exc, *fragments: str):
    """``pytest.raises`` that also requires every fragment (plain substrings, not regexes) in the message."""
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"


def padded(b=2, t=4, role=Role.PERCEPTION, dtype=torch.float32):
    """Keyword arguments for a small valid padded call (every token of role ``role``)."""
    return {
        "advantages": torch.ones(b, dtype=dtype),
        "logp": torch.full((b, t), -1.0, dtype=dtype),
        "logp_corrupt": torch.full((b, t), -2.0, dtype=dtype),
        "logp_ablated": torch.full((b, t), -3.0, dtype=dtype),
        "roles": torch.full((b, t), int(role), dtype=torch.int64),
        "mask": torch.ones(b, t, dtype=torch.bool),
    }


def packed(lengths=(4, 4), role=Role.PERCEPTION):
    n = sum(lengths)
    cu = [0]
    for k in lengths:
        cu.append(cu[-1] + k)
    return {
        "advantages": torch.ones(len(lengths)),
        "logp": torch.full((n,), -1.0),
        "logp_corrupt": torch.full((n,), -2.0),
        "logp_ablated": torch.full((n,), -3.0),
        "roles": torch.full((n,), int(role), dtype=torch.int64),
        "cu_seqlens": torch.tensor(cu),
    }


def call(kw, **changes):
    return role_aware_advantages(**{**kw, **changes})


# -- a three-word vocabulary: roles_from_token_ids' ids against it, and its meta-tensor call ---------------------
def _tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
