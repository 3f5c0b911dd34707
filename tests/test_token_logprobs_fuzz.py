"""Fuzz: ``token_logprobs``. Each case either raises the op's own error naming an argument, or returns values within
STYLE's tolerance of the float64 reference (``srpo_core/reference/…``), with NaN / ±inf parity, and 0 at
``ignore_index`` positions whatever the row holds. Triton-backend cases run in a subprocess
(``test_fuzz_subprocess.py``); here ``backend`` is ``"auto"`` / ``"torch"``."""

from __future__ import annotations

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

from srpo_core import token_logprobs
from srpo_core.reference import token_logprobs as tl_ref


@st.composite
def token_logprobs_calls(draw):
    n, v = draw(st.integers(0, 5)), draw(st.sampled_from((1, 2, 3, 7, 33)))
    dtype = draw(S.float_dtypes())
    logits = draw(logit_rows(n, v, dtype, draw(st.booleans())))
    ids = draw(ids_for(n, v))
    opts = {"temperature": draw(st.sampled_from((1.0, 0.7, 2.0))), "return_entropy": draw(st.booleans()),
            "backend": draw(st.sampled_from(S.fuzz_backends()))}
    kind = draw(st.sampled_from(MUTATIONS))
    logits, ids = _mutate_common(draw, kind, logits, ids, opts)
    if kind == "leading" and n:
        logits, ids = logits[None].expand(2, n, v), ids[None].expand(2, n)
    return kind, logits, ids, opts


@S.fuzz_settings()
@given(call=token_logprobs_calls())
def test_fuzz_token_logprobs(call):
    kind, logits, ids, opts = call
    out = S.outcome("token_logprobs", lambda: token_logprobs(logits, ids, **opts))
    if out is None:
        return
    ref_opts = {"temperature": opts["temperature"], "return_entropy": opts["return_entropy"]}
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    same = tl_ref.token_logprobs(logits.to(compute), ids, **ref_opts)
    ref64 = tl_ref.token_logprobs(logits.double(), ids, **ref_opts)
    _check("token_logprobs", out, same, ref64, ids, f"{kind}, {logits.dtype}",
           _row_scale(logits, opts["temperature"]))
