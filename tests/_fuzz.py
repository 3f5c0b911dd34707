"""What the advantages' fuzz files share (registered by conftest.py as ``srpo_core_test_fuzz``):
non-contiguous and float64 copies of inputs, and the generated ``role_aware_advantages`` calls, each with one class of
bad or extreme input mixed in (the ``vppo_advantages`` / ``papo_perception_kl`` fuzz reuses them)."""

from __future__ import annotations

import math

import srpo_core_test_strategies as S  # tests/strategies.py, registered by conftest.py
import torch
from hypothesis import strategies as st

NAN, INF = math.nan, math.inf


MUTATIONS = ("none", "none", "garbage", "dtype", "shape", "role_value", "nan", "cu", "noncontig", "meta", "list",
             "advantages", "layout")
BAD_ROLES = (3, -1, 100, -100, 2**40)


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other element of a buffer twice as long in the last dim)."""
    if x.dim() == 0:
        return x
    buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    buf[..., ::2] = x
    return buf[..., ::2]


def _mutate(draw, kw: dict, kind: str) -> dict:
    kw = dict(kw)
    per_token = [k for k in ("logp", "logp_corrupt", "logp_ablated", "perception_signal", "reasoning_signal", "roles")
                 if kw.get(k) is not None]
    valid = S.valid_mask(kw)
    if kind == "dtype":
        name = draw(st.sampled_from(per_token + ["advantages"] + (["mask"] if "mask" in kw else ["cu_seqlens"])))
        x = kw[name]
        kw[name] = x.float() if not x.is_floating_point() else x.long()
    elif kind == "shape":
        name = draw(st.sampled_from(per_token))
        x = kw[name]
        kw[name] = x[..., :-1] if x.shape[-1] else torch.zeros(*x.shape, 1, dtype=x.dtype)
    elif kind == "role_value" and bool(valid.any()):
        roles = kw["roles"].clone()
        idx = tuple(t[0] for t in torch.nonzero(valid, as_tuple=True))
        roles[idx] = draw(st.sampled_from(BAD_ROLES))
        kw["roles"] = roles
    elif kind == "nan" and bool(valid.any()):
        name = draw(st.sampled_from(per_token[:-1] or ["logp"]))
        x = kw[name].clone()
        x[valid] = draw(st.sampled_from((NAN, INF)))
        kw[name] = x
    elif kind == "cu" and "cu_seqlens" in kw:
        cu = kw["cu_seqlens"].clone()
        which = draw(st.sampled_from(("first", "last", "drop", "2d", "empty")))
        if which == "first":
            cu[0] = 1
        elif which == "last":
            cu[-1] += 1
        elif which == "drop" and cu.numel() > 2:
            cu[1] = cu[-1] + 1
        elif which == "2d":
            cu = cu[None]
        else:
            cu = cu[:0]
        kw["cu_seqlens"] = cu
    elif kind == "noncontig":
        for name in per_token + ["advantages"]:
            kw[name] = noncontiguous(kw[name])
    elif kind == "meta":
        name = draw(st.sampled_from(per_token + ["advantages"]))
        kw[name] = kw[name].to("meta")
    elif kind == "list":
        name = draw(st.sampled_from(per_token + ["advantages"]))
        kw[name] = kw[name].tolist()
    elif kind == "advantages":
        adv = kw["advantages"]
        kw["advantages"] = adv[:-1] if draw(st.booleans()) or not adv.numel() else torch.full_like(adv, NAN)
    elif kind == "layout":
        if "mask" in kw:
            kw["cu_seqlens"] = torch.tensor([0, int(kw["mask"].sum())])
        else:
            kw["mask"] = torch.ones(kw["logp"].shape, dtype=torch.bool)
    return kw


@st.composite
def raa_calls(draw):
    case = draw(S.cases(max_b=4, max_len=6, extreme=draw(st.booleans()), signals=None))
    dtype = draw(S.float_dtypes())
    kind = draw(st.sampled_from(MUTATIONS))
    if draw(st.booleans()):
        lay = draw(S.padded_layouts(case))
        kw = case.padded(dtype, **lay, garbage=draw(st.integers(1, 99)) if kind == "garbage" else None)
    else:
        kw = case.packed(dtype)
    if case.perception_signal is not None and draw(st.booleans()):
        kw["logp_corrupt"] = None
    return kind, _mutate(draw, kw, kind), draw(S.extreme_configs()), draw(st.sampled_from(_backends()))


def _as64(kw: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


def _backends() -> tuple[str, ...]:
    """``S.fuzz_backends()`` with ``"torch"`` (this op's reference until the backends were unified) as ``"reference"``:
    on the CPU ``"auto"`` already is the CPU path."""
    return tuple("reference" if b == "torch" else b for b in S.fuzz_backends())
