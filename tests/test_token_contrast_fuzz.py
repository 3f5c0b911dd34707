"""Fuzz: ``token_contrast``. Each case either raises the op's own error naming an argument, or returns values within
STYLE's tolerance of the float64 reference (``srpo_core/reference/…``), with NaN / ±inf parity, and 0 at
``ignore_index`` positions whatever the row holds. Triton-backend cases run in a subprocess
(``test_fuzz_subprocess.py``); here ``backend`` is ``"auto"`` / ``"torch"``."""

from __future__ import annotations

import math

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import given
from hypothesis import strategies as st
from srpo_core_test_logprob_fuzz import (  # tests/_logprob_fuzz.py
    MUTATIONS,
    _check,
    _mutate_common,
    _row_scale,
    ids_for,
    logit_rows,
)

from srpo_core import token_contrast
from srpo_core.reference import token_contrast as tc_ref

NAN = math.nan


@st.composite
def token_contrast_calls(draw):
    n, v = draw(st.integers(0, 5)), draw(st.sampled_from((1, 2, 3, 7, 33)))
    dtype = draw(S.float_dtypes())
    extreme = draw(st.booleans())
    logits = draw(logit_rows(n, v, dtype, extreme))
    logits_ref = draw(logit_rows(n, v, dtype, extreme))
    ids = draw(ids_for(n, v))
    opts = {"kind": draw(st.sampled_from(("kl", "js"))), "temperature": draw(st.sampled_from((1.0, 0.7, 2.0))),
            "backend": draw(st.sampled_from(S.fuzz_backends()))}
    kind = draw(st.sampled_from(MUTATIONS + ("kind", "ref_shape")))
    logits, ids = _mutate_common(draw, kind, logits, ids, opts)
    if kind == "garbage" and n:
        logits_ref = logits_ref.clone()
        logits_ref[0] = NAN
    elif kind == "kind":
        opts["kind"] = draw(st.sampled_from(("k3", "tv", None)))
    elif kind == "ref_shape":
        logits_ref = logits_ref[:, :-1] if v > 1 else logits_ref[None]
    elif kind == "leading" and n:
        logits, logits_ref, ids = logits[None].expand(2, n, v), logits_ref[None].expand(2, n, v), ids[None].expand(2, n)
    return kind, logits, logits_ref, ids, opts


@S.fuzz_settings()
@given(call=token_contrast_calls())
def test_fuzz_token_contrast(call):
    kind, logits, logits_ref, ids, opts = call
    out = S.outcome("token_contrast", lambda: token_contrast(logits, logits_ref, ids, **opts))
    if out is None:
        return
    ref_opts = {"kind": opts["kind"], "temperature": opts["temperature"]}
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    same = tc_ref.token_contrast(logits.to(compute), logits_ref.to(compute), ids, **ref_opts)
    ref64 = tc_ref.token_contrast(logits.double(), logits_ref.double(), ids, **ref_opts)
    scale = torch.maximum(_row_scale(logits, opts["temperature"]), _row_scale(logits_ref, opts["temperature"]))
    _check("token_contrast", tuple(out), same, ref64, ids, f"{kind}, {logits.dtype}, {opts}", scale)
