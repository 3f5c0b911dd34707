"""Hypothesis strategies shared by the foundation tests (batches of rollouts, configs, dtypes).

Not a test module and not importable by its file name (pytest runs with ``--import-mode=importlib``, which keeps
``tests/`` off ``sys.path``): ``conftest.py`` loads it by path and registers it in ``sys.modules`` as
``srpo_core_test_strategies``, the name the test files import it by.

A :class:`Case` keeps every value as Python floats per trajectory, so one drawn case can be laid out padded or
packed, in any dtype, with or without garbage at the invalid positions.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from srpo_core.config import SRPOConfig

NEG_INF = float("-inf")
ROLE_MIXES = ("none", "perception", "reasoning", "mixed", "roles_only")
ROLES_OF_MIX = {"none": (0,), "perception": (0, 1), "reasoning": (0, 2), "mixed": (0, 1, 2), "roles_only": (1, 2)}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Garbage written at invalid (padded) positions: it must never reach a result.
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30, -7.0)
GARBAGE_ROLES = (-100, 7, -1, 3)


@dataclasses.dataclass
class Case:
    """One batch: ``B`` trajectories, per-trajectory Python lists (no layout yet)."""

    advantages: list[float]
    roles: list[list[int]]
    logp: list[list[float]]
    logp_corrupt: list[list[float]]
    logp_ablated: list[list[float]]
    perception_signal: list[list[float]] | None = None
    reasoning_signal: list[list[float]] | None = None
    mix: str = "mixed"

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.roles]

    @property
    def B(self) -> int:  # noqa: N802 - the SPEC's symbol
        return len(self.roles)

    def per_token(self) -> dict[str, list[list[float]]]:
        out = {"logp": self.logp, "logp_corrupt": self.logp_corrupt, "logp_ablated": self.logp_ablated}
        if self.perception_signal is not None:
            out["perception_signal"] = self.perception_signal
        if self.reasoning_signal is not None:
            out["reasoning_signal"] = self.reasoning_signal
        return out

    def permuted(self, perm: list[int]) -> Case:
        def p(x):
            return None if x is None else [x[i] for i in perm]

        return Case(p(self.advantages), p(self.roles), p(self.logp), p(self.logp_corrupt), p(self.logp_ablated),
                    p(self.perception_signal), p(self.reasoning_signal), self.mix)

    def subset(self, idx: list[int]) -> Case:
        return self.permuted(idx)

    # -- layouts ------------------------------------------------------------------------------------------------
    def packed(self, dtype: torch.dtype = torch.float64, adv_dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments for ``role_aware_advantages`` in the packed layout ``[N]`` + ``cu_seqlens``."""
        cu = [0]
        for n in self.lengths:
            cu.append(cu[-1] + n)
        kwargs = {
            "advantages": to_dtype(torch.tensor(self.advantages, dtype=torch.float64), adv_dtype or dtype),
            "roles": torch.tensor([r for row in self.roles for r in row], dtype=torch.int64),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int64),
        }
        for name, rows in self.per_token().items():
            kwargs[name] = to_dtype(torch.tensor([v for row in rows for v in row], dtype=torch.float64), dtype)
        return kwargs

    def padded(self, dtype: torch.dtype = torch.float64, adv_dtype: torch.dtype | None = None, *, extra: int = 0,
               offsets: list[int] | None = None, garbage: int | None = None) -> dict:
        """Keyword arguments in the padded layout ``[B, T]`` + ``mask``; ``T = max length + extra``.

        Trajectory ``i``'s tokens sit at columns ``offsets[i] .. offsets[i] + n_i`` (left, right or middle padding).
        ``garbage`` (a seed) fills invalid positions with NaN/inf/huge values and roles like -100; ``None`` → zeros.
        """
        T = max(self.lengths, default=0) + extra  # noqa: N806
        offsets = offsets or [0] * self.B
        mask = torch.zeros(self.B, T, dtype=torch.bool)
        for i, (n, o) in enumerate(zip(self.lengths, offsets, strict=True)):
            mask[i, o:o + n] = True
        gen = torch.Generator().manual_seed(garbage or 0)

        def fill(rows, values, is_int=False):
            if garbage is None:
                out = torch.zeros(self.B, T, dtype=torch.int64 if is_int else torch.float64)
            else:
                pick = torch.randint(0, len(values), (self.B, T), generator=gen)
                table = torch.tensor(values, dtype=torch.int64 if is_int else torch.float64)
                out = table[pick]
            for i, (row, o) in enumerate(zip(rows, offsets, strict=True)):
                if row:
                    out[i, o:o + len(row)] = torch.tensor(row, dtype=out.dtype)
            return out

        kwargs = {
            "advantages": to_dtype(torch.tensor(self.advantages, dtype=torch.float64), adv_dtype or dtype),
            "roles": fill(self.roles, GARBAGE_ROLES, is_int=True),
            "mask": mask,
        }
        for name, rows in self.per_token().items():
            kwargs[name] = to_dtype(fill(rows, GARBAGE), dtype)
        return kwargs


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast with saturation: finite values stay finite in narrow dtypes (fp16 tops out at 65504); ±inf stay."""
    if dtype.is_floating_point and dtype != x.dtype:
        info = torch.finfo(dtype)
        x = torch.where(torch.isfinite(x), x.clamp(info.min, info.max), x)
    return x.to(dtype)


# -- value strategies ---------------------------------------------------------------------------------------------
def logp_values(extreme: bool = False) -> st.SearchStrategy[float]:
    """Log-probs: mostly moderate, with ``-inf`` and (``extreme``) huge negative values. Never above 5, so that
    fp16/bf16 casts stay finite (a ``+inf`` log-prob is an error by decision D2)."""
    base = st.floats(-40.0, 5.0, allow_nan=False, width=32)
    specials = [NEG_INF, 0.0, -1e-30]
    if extreme:
        specials += [-1e30, -3e38, -1e300]
    return st.one_of(base, base, base, st.sampled_from(specials))


def signal_values(extreme: bool = False) -> st.SearchStrategy[float]:
    base = st.floats(-50.0, 50.0, allow_nan=False, width=32)
    if extreme:
        return st.one_of(base, st.sampled_from([0.0, 1e-30, -1e-30, 1e20, -1e20, 1e30, -1e30]))
    return base


def advantage_values(extreme: bool = False) -> st.SearchStrategy[float]:
    base = st.floats(-10.0, 10.0, allow_nan=False, width=32)
    if extreme:
        # |A| >= 1e-20: far above fp32 underflow even after a weight of ~1e-9 (a weight can be that small, and
        # the product of two floats rounding to 0 is underflow, not a sign change).
        return st.one_of(base, st.sampled_from([0.0, 1e-20, -1e-20, 1e30, -1e30, 3e38, -3e38]))
    return base


@st.composite
def cases(draw, *, max_b: int = 6, max_len: int = 9, min_b: int = 0, mix: str | None = None, extreme: bool = False,
          signals: bool | None = False) -> Case:
    """A batch. ``signals``: False → log-probs only; True → also precomputed signals for both roles; None → drawn."""
    b = draw(st.integers(min_b, max_b))
    mix = mix or draw(st.sampled_from(ROLE_MIXES))
    allowed = ROLES_OF_MIX[mix]
    lengths = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 7, max_len]), min_size=b, max_size=b))
    roles = [draw(st.lists(st.sampled_from(allowed), min_size=n, max_size=n)) for n in lengths]

    def rows(values):
        return [draw(st.lists(values, min_size=n, max_size=n)) for n in lengths]

    adv = draw(st.lists(advantage_values(extreme), min_size=b, max_size=b))
    logp, logp_c, logp_a = rows(logp_values(extreme)), rows(logp_values(extreme)), rows(logp_values(extreme))
    if signals is None:
        signals = draw(st.booleans())
    ps = rows(signal_values(extreme)) if signals else None
    rs = rows(signal_values(extreme)) if signals else None
    return Case(adv, roles, logp, logp_c, logp_a, ps, rs, mix)


def configs(**fixed) -> st.SearchStrategy[SRPOConfig]:
    """Every knob of SPEC steps 1-5 (log-prob contrasts only; kl/js need precomputed signals)."""
    fields = {
        "perception_contrast": st.sampled_from(("k3", "logratio")),
        "reasoning_contrast": st.sampled_from(("logratio", "k3")),
        "clamp": st.sampled_from((20.0, 5.0, 0.5)),
        "k3_max": st.sampled_from((10.0, 2.0)),
        "standardize": st.sampled_from(("batch", "none")),
        "eps": st.sampled_from((1e-6, 1e-3, 1e-12)),
        "u_max": st.sampled_from((3.0, 0.5, 5.0)),
        "beta_perception": st.one_of(st.sampled_from((0.0, 0.5, 2.0)), st.floats(0.0, 2.0)),
        "beta_reasoning": st.one_of(st.sampled_from((0.0, 0.5, 2.0)), st.floats(0.0, 2.0)),
        "weight_map": st.sampled_from(("exp", "linear", "sigmoid")),
        # w_min <= 1: the linear map's floor is meant to be below the neutral weight 1.
        "w_min": st.sampled_from((0.1, 0.5, 1.0)),
        "renorm": st.sampled_from(("mean", "none")),
    }
    for k, v in fixed.items():
        fields[k] = v if isinstance(v, st.SearchStrategy) else st.just(v)
    return st.builds(SRPOConfig, **fields)


def float_dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(FLOAT_DTYPES)


@st.composite
def padded_layouts(draw, case: Case) -> dict:
    """Where each trajectory sits in a padded row: extra columns and per-row offsets."""
    extra = draw(st.integers(0, 3))
    T = max(case.lengths, default=0) + extra  # noqa: N806
    offsets = [draw(st.integers(0, T - n)) for n in case.lengths]
    return {"extra": extra, "offsets": offsets}


def valid_mask(kwargs: dict) -> torch.Tensor:
    """The valid positions of a layout's kwargs (all of them for packed)."""
    if "mask" in kwargs:
        return kwargs["mask"]
    return torch.ones(kwargs["logp"].shape, dtype=torch.bool)


def segment_of(kwargs: dict) -> torch.Tensor:
    """Trajectory index of every position (``-1`` at invalid padded positions), in the kwargs' layout."""
    if "mask" in kwargs:
        mask = kwargs["mask"]
        return torch.where(mask, torch.arange(mask.shape[0])[:, None].expand_as(mask), -1)
    cu = kwargs["cu_seqlens"]
    return torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])


# -- the fuzz suite (tests/test_*_fuzz.py) ---------------------------------------------------------------------------
# Cases per fuzz test: a fast sample in CI, >= 1,000 per op under HYPOTHESIS_PROFILE=thorough. Derandomized (seeded
# from each test's name), so a CI failure reproduces.
FUZZ_EXAMPLES = {"ci": 30, "dev": 15, "thorough": 1000}


def fuzz_backends() -> tuple[str, ...]:
    """The backends the fuzz tests draw from: ``auto`` / ``torch`` in process; ``triton`` (the interpreter on CPU)
    only inside the subprocess of ``test_fuzz_subprocess.py`` (``SRPO_FUZZ_BACKEND=triton``), where a crash is a
    failed test, not a dead run."""
    import os

    return ("triton",) if os.environ.get("SRPO_FUZZ_BACKEND") == "triton" else ("auto", "torch")


def fuzz_settings(scale: float = 1.0):
    import os

    from hypothesis import HealthCheck, settings

    scale *= float(os.environ.get("SRPO_FUZZ_SCALE", "1"))
    n = FUZZ_EXAMPLES.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), FUZZ_EXAMPLES["ci"])
    return settings(max_examples=max(1, int(n * scale)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def check_library_error(op: str, err: BaseException, *, arg_named: bool = True) -> None:
    """The library's own error: a TypeError / ValueError whose message starts with the op's name and names an
    argument in backticks. Anything else (a raw torch / numpy error, an AssertionError) fails the case."""
    msg = str(err)
    assert isinstance(err, (TypeError, ValueError)), f"{op}: raw {type(err).__name__}: {msg}"
    assert msg.startswith(f"{op}:") or msg.startswith(f"{op} "), f"{op}: message does not name the op: {msg!r}"
    if arg_named:
        assert "`" in msg, f"{op}: message names no argument: {msg!r}"


def outcome(op: str, fn, **kw):
    """Run ``fn()``: its result, or ``None`` after checking that what it raised is the library's own error."""
    try:
        return fn()
    except (TypeError, ValueError, RuntimeError, IndexError, OverflowError, KeyError, AttributeError,
            RecursionError, ZeroDivisionError) as err:
        check_library_error(op, err, **kw)
        return None


def within_torch_error(got: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor, *, atol, what: str):
    """STYLE's rule: ``|got − ref64| ≤ 2·|ref_same − ref64| + atol + 1e-5·|ref64|`` (``ref_same``: the reference in
    the same compute dtype; ``atol`` a float or a tensor shaped like ``ref64``), with NaN / ±inf parity."""
    g, r, r64 = got.double(), ref_same.double(), ref64.double()
    assert torch.equal(torch.isnan(g), torch.isnan(r64)), f"{what}: NaN parity\n{g}\n{r64}"
    assert torch.equal(torch.isinf(g), torch.isinf(r64)) and torch.equal(g[torch.isinf(g)], r64[torch.isinf(r64)]), \
        f"{what}: inf parity\n{g}\n{r64}"
    fin = torch.isfinite(r64)
    err, base = (g - r64).abs()[fin], (r - r64).abs()[fin]
    atol = atol[fin] if isinstance(atol, torch.Tensor) else atol
    bound = 2 * torch.nan_to_num(base, nan=0.0, posinf=0.0) + atol + 1e-5 * r64.abs()[fin]
    bad = err > bound
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0, 0])
        raise AssertionError(f"{what}: {int(bad.sum())} value(s) off the float64 reference; first: got "
                             f"{float(g[fin][k])}, ref64 {float(r64[fin][k])}, same-dtype ref {float(r[fin][k])}")


def extreme_configs() -> st.SearchStrategy[SRPOConfig]:
    """Configs at the edges of what SRPOConfig accepts (decision D85), and ordinary ones."""
    edge = {
        "clamp": st.sampled_from((20.0, 0.5, 1e-6, 1e15)),
        "k3_max": st.sampled_from((10.0, 1e-6, 1e15)),
        "eps": st.sampled_from((1e-6, 1e-30, 1.0, 1e10)),
        "u_max": st.sampled_from((3.0, 1e-6, 20.0, 1e6)),
        "role_stats": st.sampled_from(("all", "unclamped")),
        "w_min": st.sampled_from((0.1, 1e-6, 1.0)),
    }

    @st.composite
    def build(draw):
        fields = {k: draw(v) for k, v in edge.items()}
        top = 20.0 / fields["u_max"]
        for name in ("beta_perception", "beta_reasoning"):
            fields[name] = draw(st.sampled_from((0.0, min(0.5, top), min(top, 1e6), min(top, 1e6) / 3)))
        return draw(configs(**fields))

    return build()
