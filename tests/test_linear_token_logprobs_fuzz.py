"""Fuzz: ``linear_token_logprobs``. Each case either raises the op's own error naming an argument, or returns values
within STYLE's tolerance of the float64 reference (``srpo_core/reference/…``), with NaN / ±inf parity, and 0 at
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

from srpo_core import linear_token_logprobs
from srpo_core.reference import linear_token_logprobs as lin_ref


@st.composite
def linear_calls(draw):
    n, h, v = draw(st.integers(0, 5)), draw(st.sampled_from((1, 4, 8))), draw(st.sampled_from((1, 3, 17)))
    dtype = draw(st.sampled_from((torch.float32, torch.float64, torch.bfloat16)))
    hidden = draw(logit_rows(n, h, dtype, draw(st.booleans())))
    weight = draw(logit_rows(v, h, dtype, False)) / 4
    bias = draw(st.sampled_from((None, "zeros", "randn")))
    bias = None if bias is None else (torch.zeros(v) if bias == "zeros" else torch.randn(v)).to(dtype)
    ids = draw(ids_for(n, v))
    opts = {"temperature": draw(st.sampled_from((1.0, 0.7))), "return_entropy": draw(st.booleans()),
            "backend": draw(st.sampled_from(S.fuzz_backends())), "bias": bias}
    kind = draw(st.sampled_from(MUTATIONS + ("weight_shape", "bias_shape")))
    hidden, ids = _mutate_common(draw, kind, hidden, ids, opts)
    if kind == "weight_shape":
        weight = weight[:, :-1] if h > 1 else weight[None]
    elif kind == "bias_shape":
        opts["bias"] = torch.zeros(v + 1, dtype=dtype)
    elif kind == "leading" and n:
        hidden, ids = hidden[None].expand(2, n, h), ids[None].expand(2, n)
    return kind, hidden, weight, ids, opts


@S.fuzz_settings()
@given(call=linear_calls())
def test_fuzz_linear_token_logprobs(call):
    kind, hidden, weight, ids, opts = call
    out = S.outcome("linear_token_logprobs", lambda: linear_token_logprobs(hidden, weight, ids, **opts))
    if out is None:
        return
    ref_opts = {"temperature": opts["temperature"], "return_entropy": opts["return_entropy"]}
    compute = hidden.dtype  # logits tiles are rounded to the input dtype (D48): torch's error in that dtype
    bias = opts["bias"]
    same = lin_ref.linear_token_logprobs(hidden.to(compute), weight.to(compute), ids,
                                         bias=None if bias is None else bias.to(compute), **ref_opts)
    ref64 = lin_ref.linear_token_logprobs(hidden.double(), weight.double(), ids,
                                          bias=None if bias is None else bias.double(), **ref_opts)
    logits64 = hidden.double() @ weight.double().T + (0.0 if bias is None else bias.double())
    # D48: bf16 logits tiles are rounded to bf16, an error of up to eps_bf16 · |logit| per logit, which the log-prob
    # and the entropy may carry in full; torch's bf16 reference rounds elsewhere, so its error is no bound here.
    rounding = 4 * torch.finfo(hidden.dtype).eps if hidden.dtype in (torch.bfloat16, torch.float16) else 0.0
    _check("linear_token_logprobs", out, same, ref64, ids, f"{kind}, {hidden.dtype}",
           _row_scale(logits64, opts["temperature"]), rounding)
