"""token_contrast: the Triton kernel (under TRITON_INTERPRET=1) and the chunked torch path against the float64
reference, edge cases of the math (−inf entries, ±1e4 logits, disjoint supports), errors, and torch.compile tracing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srpo_core import _dispatch
from srpo_core.cpu import token_contrast as cpu_contrast
from srpo_core.ops import token_contrast as ops_contrast
from srpo_core.ops.token_contrast import token_contrast
from srpo_core.reference.token_contrast import token_contrast as reference
from srpo_core.testing import assert_close
from srpo_core.tuning import TUNING

# The interpreter evaluates −inf − (−inf) and 0 · inf in masked lanes with numpy, which warns; the kernel discards them.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

needs_interpreter = pytest.mark.skipif(
    not (_dispatch.triton_importable() and (_dispatch.interpreting() or torch.cuda.is_available())),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ("div", "logp", "logp_ref")
# fp32 math against float64 truth on the same (exactly upcast) values: 1e-5 relative, with an absolute floor for
# values near 0 (a divergence near 0 is a difference of O(1) sums).
RTOL, ATOL = 1e-5, 1e-5


def check(outs, ref64, tag=""):
    for name, a, e in zip(NAMES, outs, ref64, strict=True):
        assert a.dtype == torch.float32, f"{name}: dtype {a.dtype}"
        assert_close(a, e, atol=ATOL, rtol=RTOL, name=f"{tag}{name}")


def run_kernel(x, y, ids, *, kind, temperature=1.0, ignore_index=-100, block_v=None):
    """The launcher directly (to force a small block), after the public function's checks passed."""
    from srpo_core.kernels.token_contrast import token_contrast_fwd

    token_contrast(x, y, ids, kind=kind, temperature=temperature, ignore_index=ignore_index, backend="torch")
    return token_contrast_fwd(x, y, ids, kind=kind, temperature=temperature, ignore_index=ignore_index,
                              block_v=block_v)


@st.composite
def cases(draw, max_n=5, max_v=70):
    """Logit pairs with awkward sizes, extreme scales, −inf entries, ignored rows and non-unit strides."""
    n = draw(st.sampled_from([0] + [1, 2, 3, 4] * 2 + list(range(5, max_n + 1))))
    v = draw(st.integers(1, max_v) | st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 47, 64, max_v]))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    scale = draw(st.sampled_from([1.0, 8.0, 1e4]))
    if dtype == torch.float16:
        scale = min(scale, 3e3)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    related = draw(st.sampled_from(["independent", "noisy", "shifted"]))
    if related == "independent":
        y = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    elif related == "noisy":
        y = x + 0.3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    else:
        y = x + draw(st.sampled_from([0.0, 3.5, -1e3]))
    neg_inf = draw(st.sampled_from([0.0, 0.0, 0.2, 0.6]))
    if neg_inf:
        x[torch.rand(n, v, generator=g) < neg_inf] = -math.inf
        y[torch.rand(n, v, generator=g) < neg_inf] = -math.inf
        x[:, 0] = torch.where(torch.isinf(x[:, 0]), 0.0, x[:, 0])  # keep every row a distribution
        y[:, 0] = torch.where(torch.isinf(y[:, 0]), 0.0, y[:, 0])
    ids = torch.randint(0, v, (n,), generator=g)
    ids[torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3]))] = -100
    ids = ids.to(draw(st.sampled_from([torch.int64, torch.int32])))
    layout = draw(st.sampled_from(["contiguous", "row-padded", "column-major"]))
    x, y = x.to(dtype), y.to(dtype)
    if layout == "row-padded":  # row stride V + 3
        x = torch.cat([x, torch.zeros(n, 3, dtype=dtype)], 1)[:, :v]
        y = torch.cat([y, torch.zeros(n, 3, dtype=dtype)], 1)[:, :v]
    elif layout == "column-major":  # vocab stride N
        x, y = x.t().contiguous().t(), y.t().contiguous().t()
    kind = draw(st.sampled_from(["kl", "js"]))
    temperature = draw(st.sampled_from([1.0, 0.7, 1.9]))
    return x, y, ids, kind, temperature  # CPU tensors: a test moves them to its device


def on(device, *xs):
    """Each tensor on ``device`` with its strides kept (a row-padded or column-major layout stays one)."""
    out = []
    for x in xs:
        if x.device != device:
            y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
            y.copy_(x)
            x = y
        out.append(x)
    return out


@needs_interpreter
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), block_v=st.sampled_from([16, 16, 32, None]))
def test_kernel_matches_float64_reference(case, block_v, device):
    x, y, ids, kind, temperature = case
    outs = run_kernel(*on(device, x, y, ids), kind=kind, temperature=temperature, block_v=block_v)
    ref64 = reference(x.double(), y.double(), ids, kind=kind, temperature=temperature)
    check(outs, ref64, tag=f"{kind} V={x.shape[1]} {x.dtype} τ={temperature} ")


@settings(max_examples=30, deadline=None)
@given(case=cases(max_n=8, max_v=90), chunk=st.sampled_from([16, 100, 1 << 22]))
def test_torch_path_matches_float64_reference(case, chunk):
    x, y, ids, kind, temperature = case
    old = TUNING.token_contrast_chunk_elements
    TUNING.token_contrast_chunk_elements = chunk  # several rows per chunk, one row per chunk, or everything at once
    try:
        outs = token_contrast(x, y, ids, kind=kind, temperature=temperature, backend="torch")
    finally:
        TUNING.token_contrast_chunk_elements = old
    ref64 = reference(x.double(), y.double(), ids, kind=kind, temperature=temperature)
    ref32 = reference(x.float(), y.float(), ids, kind=kind, temperature=temperature)
    for name, a, e, t in zip(NAMES, outs, ref64, ref32, strict=True):
        # the torch path is fp32 torch: hold it to twice torch's own fp32 error (it is that computation, chunked)
        err = torch.nan_to_num((t.double() - e).abs(), nan=0.0, posinf=0.0)
        assert_close(a, e, atol=ATOL + 2 * err, rtol=RTOL, name=name)


def rows(*pairs, dtype=torch.float32, device=DEVICE):
    x = torch.tensor([p[0] for p in pairs], dtype=dtype, device=device)
    y = torch.tensor([p[1] for p in pairs], dtype=dtype, device=device)
    return x, y


INF = math.inf
EDGE_CASES = [
    # (x row, x' row), id, kind, expected div (None: the reference's value is checked only)
    pytest.param(([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]), 1, "kl", 0.0, id="identical-kl-0"),
    pytest.param(([0.0, 1.0, 2.0], [5.0, 6.0, 7.0]), 1, "kl", 0.0, id="shifted-kl-0"),
    pytest.param(([1e4, -1e4, 0.0], [1e4 - 3, -1e4, 3.0]), 0, "kl", None, id="pm-1e4"),
    pytest.param(([0.0, -INF, 1.0], [0.0, 2.0, 1.0]), 2, "kl", None, id="p-zero-term-is-0"),
    pytest.param(([0.0, 2.0, 1.0], [0.0, -INF, 1.0]), 1, "kl", INF, id="mass-where-ref-zero-kl-inf"),
    pytest.param(([0.0, -INF], [-INF, 0.0]), 0, "js", math.log(2), id="disjoint-js-ln2"),
    pytest.param(([0.0, 2.0, 1.0], [0.0, -INF, 1.0]), 1, "js", None, id="js-finite-where-kl-inf"),
    pytest.param(([-INF, -INF, -INF], [0.0, 1.0, 2.0]), 1, "kl", math.nan, id="all-neg-inf-row-nan"),
    pytest.param(([-INF, -INF, -INF], [0.0, 1.0, 2.0]), 1, "js", math.nan, id="all-neg-inf-row-nan-js"),
    pytest.param(([0.0, INF, 1.0], [0.0, 1.0, 2.0]), 1, "kl", math.nan, id="pos-inf-row-nan"),
    pytest.param(([0.0, math.nan, 1.0], [0.0, 1.0, 2.0]), 0, "js", math.nan, id="nan-entry-row-nan"),
    pytest.param(([3.0], [-2.0]), 0, "kl", 0.0, id="V=1"),
    # block 1 (of 16 columns) puts mass where x' is −inf; block 2 moves x's max by 1e4, which rescales that mass by
    # e^-1e4 = 0 in fp32: KL must stay +inf (the mass is tiny but not 0)
    pytest.param(([0.0] + [-1.0] * 18 + [1e4], [-INF] + [0.0] * 19), 19, "kl", INF, id="inf-survives-rescale"),
]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize(("pair", "id_", "kind", "expected"), EDGE_CASES)
def test_edge_cases(pair, id_, kind, expected, backend, device):
    x, y = rows(pair, device=device)
    ids = torch.tensor([id_], device=device)
    if backend == "triton":
        outs = run_kernel(x, y, ids, kind=kind, block_v=16)
    else:
        outs = token_contrast(x, y, ids, kind=kind, backend="torch")
    ref64 = reference(x.double(), y.double(), ids, kind=kind)
    check(outs, ref64)
    if expected is not None:
        assert_close(outs[0], torch.tensor([expected]), atol=1e-6, name="div")
    div = outs[0]
    if kind == "js" and not torch.isnan(div).any():
        assert 0.0 <= float(div) <= math.log(2) + 1e-7


@needs_interpreter
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_ignored_rows_and_n0(kind, device):
    x = torch.randn(4, 23, device=device)
    y = torch.randn(4, 23, device=device)
    x[1] = math.nan  # an ignored row is never read into a result
    ids = torch.tensor([3, -100, 0, -100], device=device)
    for backend in ("triton", "torch"):
        d, lp, lq = token_contrast(x, y, ids, kind=kind, backend=backend)
        assert torch.equal(d[[1, 3]], torch.zeros(2, device=device)), backend
        assert torch.equal(lp[[1, 3]], torch.zeros(2, device=device)) and torch.equal(lq[[1, 3]], lp[[1, 3]])
        assert torch.isfinite(d).all() and (d[[0, 2]] > 0).all()
        empty = token_contrast(x[:0], y[:0], ids[:0], kind=kind, backend=backend)
        assert all(t.shape == (0,) and t.dtype == torch.float32 for t in empty)


def test_ignore_index_is_a_parameter():
    x, y = torch.randn(3, 7), torch.randn(3, 7)
    ids = torch.tensor([-1, 2, -1])
    d, lp, _ = token_contrast(x, y, ids, ignore_index=-1)
    assert d[0] == 0 and lp[2] == 0 and lp[1] < 0


def test_float64_in_float64_out_and_auto_on_cpu():
    x, y = torch.randn(3, 11, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)
    ids = torch.tensor([1, 2, 3])
    outs = token_contrast(x, y, ids, kind="js")
    assert all(t.dtype == torch.float64 for t in outs)
    for a, e in zip(outs, reference(x, y, ids, kind="js"), strict=True):
        assert_close(a, e, atol=1e-12, rtol=1e-12)


def test_requires_grad_inputs_give_detached_outputs():
    x = torch.randn(2, 9, requires_grad=True)
    y = torch.randn(2, 9, requires_grad=True)
    outs = token_contrast(x, y, torch.tensor([0, 8]))
    assert not any(t.requires_grad for t in outs)


def test_reference_kl_matches_torch_kl_div():
    x, y = torch.randn(5, 13, dtype=torch.float64), torch.randn(5, 13, dtype=torch.float64)
    d, _, _ = reference(x, y, torch.zeros(5, dtype=torch.long), kind="kl", temperature=1.3)
    lp, lq = torch.log_softmax(x / 1.3, -1), torch.log_softmax(y / 1.3, -1)
    expected = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    assert_close(d, expected, atol=1e-12, rtol=1e-12)
    dj, _, _ = reference(x, y, torch.zeros(5, dtype=torch.long), kind="js")
    m = 0.5 * (x.softmax(-1) + y.softmax(-1))
    kl = lambda p: (p * (p.log() - m.log())).sum(-1)  # noqa: E731
    assert_close(dj, 0.5 * kl(x.softmax(-1)) + 0.5 * kl(y.softmax(-1)), atol=1e-12, rtol=1e-12)


ERRORS = [
    pytest.param(dict(logits=torch.randn(3, 5).long()), TypeError, "`logits` must be a floating-point",
                 id="int-logits"),
    pytest.param(dict(logits=torch.randn(3, 5, 2), logits_ref=torch.randn(3, 5, 2)), ValueError,
                 "`ids` must have shape [...] = [3, 5]", id="3d-logits-2d-ids"),
    pytest.param(dict(logits=torch.randn(5)), ValueError, "`logits_ref` must have the shape", id="1d-logits"),
    pytest.param(dict(logits=torch.tensor(1.0)), ValueError, "at least one dim", id="0d-logits"),
    pytest.param(dict(shift=1), TypeError, "`shift` must be a bool", id="shift-int"),
    pytest.param(dict(check_ids=None), TypeError, "`check_ids` must be a bool", id="check-ids-none"),
    pytest.param(dict(logits_ref=torch.randn(3, 6)), ValueError, "`logits_ref` must have the shape", id="shape"),
    pytest.param(dict(ids=torch.tensor([0, 1])), ValueError, "`ids` must have shape [...] = [3]", id="ids-length"),
    pytest.param(dict(ids=torch.tensor([0.0, 1.0, 2.0])), TypeError, "`ids` must be an integer", id="float-ids"),
    pytest.param(dict(ids=torch.tensor([0, 5, 1])), ValueError, "got ids[1] = 5", id="id-too-big"),
    pytest.param(dict(ids=torch.tensor([0, -3, 1])), ValueError, "got ids[1] = -3", id="id-negative"),
    pytest.param(dict(kind="k3"), ValueError, "`kind` must be one of", id="kind"),
    pytest.param(dict(temperature=0.0), ValueError, "`temperature` must be a positive", id="temperature-0"),
    pytest.param(dict(temperature=math.nan), ValueError, "`temperature` must be a positive", id="temperature-nan"),
    pytest.param(dict(temperature="1"), TypeError, "`temperature`", id="temperature-str"),
    pytest.param(dict(ignore_index=1.5), TypeError, "`ignore_index` must be an int", id="ignore-index-float"),
    pytest.param(dict(backend="cuda"), ValueError, "`backend` must be one of", id="backend"),
    pytest.param(dict(logits=torch.randn(3, 0), logits_ref=torch.randn(3, 0)), ValueError, "V >= 1", id="V=0"),
    pytest.param(dict(logits_ref=torch.randn(3, 5, device="meta")), ValueError, "`logits_ref` must be on",
                 id="device-mismatch"),
    pytest.param(dict(logits=torch.randn(3, 5, dtype=torch.float64), backend="triton"), (TypeError, RuntimeError),
                 "", id="float64-triton"),
]


@pytest.mark.parametrize(("override", "exc", "match"), [p.values for p in ERRORS], ids=[p.id for p in ERRORS])
def test_errors_name_the_argument(override, exc, match):
    args = dict(logits=torch.randn(3, 5), logits_ref=torch.randn(3, 5), ids=torch.tensor([0, 4, -100]))
    args.update(override)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("logits", "logits_ref", "ids")}
    with pytest.raises(exc) as info:
        token_contrast(args["logits"], args["logits_ref"], args["ids"], **kwargs)
    assert match in str(info.value)
    if match:
        assert str(info.value).startswith("token_contrast:")


def test_backend_triton_without_interpreter_or_cuda_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        token_contrast(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]), backend="triton")


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_torch_compile_fullgraph_traces_the_custom_op(kind):
    x, y = torch.randn(5, 19), torch.randn(5, 19)
    ids = torch.tensor([0, 18, -100, 4, 7])

    def step(x, y, ids):
        div, logp, logp_ref = token_contrast(x * 1.0, y, ids, kind=kind, temperature=0.9)
        return div * 2.0, logp - logp_ref

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fake kernel + tracing, no C++ toolchain
    for a, e in zip(compiled(x, y, ids), step(x, y, ids), strict=True):
        assert_close(a, e, atol=1e-6, name="compiled")


def test_custom_op_opcheck():
    x, y = torch.randn(4, 10), torch.randn(4, 10)
    ids = torch.tensor([0, 9, -100, 3])
    torch.library.opcheck(torch.ops.srpo_core.token_contrast.default, (x, y, ids, "js", 1.0, -100, "torch"))


@needs_interpreter
@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kernel_default_block_several_blocks(kind, dtype, device):
    """The launcher's default config (BLOCK_V = 4096) over three full blocks and a ragged tail, V = 3·4096 + 77."""
    g = torch.Generator().manual_seed(0)
    v = 3 * 4096 + 77
    x = (torch.randn(3, v, generator=g) * 6).to(dtype).to(device)
    y = (x.float() + torch.randn(3, v, generator=g)).to(dtype).to(device)
    ids = torch.tensor([5, v - 1, 4096], device=device)
    outs = token_contrast(x, y, ids, kind=kind, temperature=0.8, backend="triton")
    check(outs, reference(x.double(), y.double(), ids, kind=kind, temperature=0.8))


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_kernel_qwen2vl_vocab(kind, device):
    """A real vocabulary size (Qwen2-VL, V = 151,936), bf16, with −inf entries and a large shift between the rows."""
    g = torch.Generator().manual_seed(1)
    v = 151_936
    x = torch.randn(8, v, generator=g) * 4
    y = x + 0.5 * torch.randn(8, v, generator=g) + 100.0
    x[:, 1000:1010] = -math.inf
    x, y = x.to(torch.bfloat16).to(device), y.to(torch.bfloat16).to(device)
    ids = torch.randint(0, v, (8,), generator=g).to(device)
    ids[3] = -100
    outs = token_contrast(x, y, ids, kind=kind, backend="triton")
    check(outs, reference(x.double(), y.double(), ids, kind=kind))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_out_of_range_id_past_the_check_gives_nan(backend, device):
    """What torch.compile sees (the eager range check is skipped there): NaN in that row, never a read out of bounds."""
    x, y = torch.randn(3, 6, device=device), torch.randn(3, 6, device=device)
    ids = torch.tensor([0, 6, -7], device=device)
    outs = torch.ops.srpo_core.token_contrast(x, y, ids, "kl", 1.0, -100, backend)
    for t in outs:
        assert torch.isfinite(t[0]) and torch.isnan(t[1:]).all()


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_compiled_cpu_chunks_match_eager_and_float64(kind, monkeypatch):
    """The inductor-compiled chunks (the CPU default for large inputs) give the eager chunks' values, edge rows
    included: −inf entries, a row of all −inf (NaN), mass where the reference has none (KL = inf), ignored rows."""
    from srpo_core.common import chunked

    if not chunked.compile_wanted(torch.device("cpu")):
        pytest.skip("torch.compile is off here (SRPO_NO_COMPILE=1 or an earlier compile failure)")
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 300, generator=g) * 3, torch.randn(6, 300, generator=g) * 3
    x[1, :5] = -math.inf
    y[2, 11] = -math.inf
    x[3] = -math.inf
    ids = torch.tensor([0, 299, 11, 4, -100, 17])
    monkeypatch.setattr(TUNING, "token_contrast_chunk_elements", 4 * 300)  # two chunks, the second one shorter
    eager = token_contrast(x, y, ids, kind=kind, temperature=0.8, backend="torch")
    monkeypatch.setattr(TUNING, "token_contrast_compile_min_elements", 0)
    compiled = token_contrast(x, y, ids, kind=kind, temperature=0.8, backend="torch")
    assert chunked._BROKEN is None, chunked._BROKEN
    ref64 = reference(x.double(), y.double(), ids, kind=kind, temperature=0.8)
    for name, a, b, e in zip(NAMES, compiled, eager, ref64, strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(e)) and torch.equal(torch.isinf(a), torch.isinf(e)), name
        assert_close(a, e, atol=ATOL, rtol=RTOL, name=f"compiled {name}")
        assert_close(a, b, atol=ATOL, rtol=RTOL, name=f"compiled vs eager {name}")


# --------------------------------------------------------------------------------- [..., V] views, shift, guard, sync
def _flat_reference(x, y, ids, kind, temperature=1.0):
    V = x.shape[-1]
    outs = reference(x.double().reshape(-1, V), y.double().reshape(-1, V), ids.reshape(-1), kind=kind,
                     temperature=temperature)
    return tuple(o.view(ids.shape) for o in outs)


def _views(device, seed=0):
    """(logits, logits_ref, ids): a [2, 5, 23] model output sliced to [:, :-1] (read in place) against a reference
    laid out vocab-major (a [V, B·T]ᵀ view: vocab stride B·T), with ids [2, 4]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 23, generator=g)[:, :-1]
    y = torch.randn(23, 2, 4, generator=g).permute(1, 2, 0)
    ids = torch.randint(0, 23, (2, 4), generator=g)
    ids[1, 2] = -100
    return x.to(device), y.to(device), ids.to(device)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_leading_dims_read_in_place_outputs_shaped_like_ids(backend, kind, device):
    x, y, ids = _views(device)
    assert not x.is_contiguous() and y.stride(-1) != 1
    from srpo_core.common import chunked

    for t in (x, y):  # both layouts collapse to two row strides: no copy
        assert chunked.collapse_rows(t, unit_v=False)[0].data_ptr() == t.data_ptr()
    out = token_contrast(x, y, ids, kind=kind, backend=backend)
    want = _flat_reference(x.cpu(), y.cpu(), ids.cpu(), kind)
    for name, a, e in zip(NAMES, out, want, strict=True):
        assert a.shape == ids.shape and a._base is None
        assert_close(a.cpu(), e, atol=ATOL, rtol=RTOL, name=name)


@needs_interpreter
def test_kernel_gets_the_callers_buffers_inside_the_device_guard(monkeypatch, device):
    """No copy of a [..., V] view (the kernel's logits pointers are the caller's), and every launch in the guard."""
    from srpo_core.kernels import token_contrast as kmod

    seen = {"depth": 0, "launches": [], "outside": 0}

    class _Ctx:
        def __enter__(self):
            seen["depth"] += 1

        def __exit__(self, *exc):
            seen["depth"] -= 1

    kernel = kmod.token_contrast_fwd_kernel

    class _K:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen["launches"].append((args[0].data_ptr(), args[1].data_ptr()))
                seen["outside"] += seen["depth"] == 0
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(_dispatch, "device_guard", lambda t: _Ctx())
    monkeypatch.setattr(kmod, "token_contrast_fwd_kernel", _K())
    x, y, ids = _views(device)
    token_contrast(x, y, ids, backend="triton")
    assert seen["outside"] == 0 and len(seen["launches"]) == 2  # the fp32 pass and the float64 re-do pass
    assert all(p == (x.data_ptr(), y.data_ptr()) for p in seen["launches"])


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_shift_scores_position_t_with_id_t_plus_1(backend, device):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 6, 13, generator=g).to(device), torch.randn(2, 6, 13, generator=g).to(device)
    ids = torch.randint(0, 13, (2, 6), generator=g).to(device)
    ids[0, 3] = -100
    got = token_contrast(x, y, ids, kind="kl", shift=True, backend=backend)
    want = token_contrast(x[:, :-1], y[:, :-1], ids[:, 1:], kind="kl", backend=backend)
    for a, e in zip(got, want, strict=True):
        assert a.shape == (2, 6)
        assert torch.equal(a[:, :-1], e) and torch.equal(a[:, -1], torch.zeros(2, device=device))
    assert got.div[0, 2] == 0  # the id at position 3 is ignored
    with pytest.raises(ValueError, match="`shift=True` needs positions"):
        token_contrast(x[0, 0], y[0, 0], ids[0, 0], shift=True)


def test_check_ids_false_skips_the_scan_and_compiles_without_graph_break(monkeypatch):
    import torch._dynamo

    x, y = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    ids = torch.tensor([[0, 9, 1], [2, 3, -100]])
    with pytest.raises(ValueError, match=r"ids\[0, 1\] = 9"):
        token_contrast(x, y, ids)
    monkeypatch.setattr(ops_contrast, "check_id_range", lambda *a: (_ for _ in ()).throw(AssertionError("scanned")))
    out = token_contrast(x, y, ids, check_ids=False)
    assert torch.isnan(out.div[0, 1]) and out.div[1, 2] == 0 and torch.isfinite(out.div[0, 0])

    def step(x, y, ids):
        div, lp, lq = token_contrast(x, y, ids, kind="js", check_ids=False, shift=True)
        return div.sum() + lp.sum() - lq.sum()

    torch._dynamo.reset()
    ids = ids.clamp(0, 8)
    explained = torch._dynamo.explain(step)(x, y, ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert_close(torch.compile(step, fullgraph=True)(x, y, ids), step(x, y, ids), atol=1e-6, rtol=1e-5, name="step")


# -------------------------------------------------------------------------------------------- extreme values
EXTREME = [
    # issue 14 finding 4: ±3e38 and −inf in fp32 (KL genuinely +inf: p has mass where p' has none)
    ([[3e38, -3e38, -math.inf, 1.0]], [[-3e38, 3e38, 0.0, -math.inf]], "kl", 1.0),
    # the same without the −inf: finite, and the fp32 shift (−3e38 − 3e38) overflows
    ([[3e38, -3e38, 0.0, 1.0]], [[-3e38, 3e38, 0.0, 2.0]], "kl", 1.0),
    # KL = ½·6e38 + ½ log ½ ≈ 3e38: finite in float32 although log p'_1 = −6e38 is not (float64 re-do)
    ([[0.0, 0.0]], [[3e38, -3e38]], "kl", 1.0),
    # issue 14 finding 4: js, τ = 1e-6, logits down to −3e38 (x/τ overflows before a shift)
    ([[-3e38, -1e-3, 0.0, -2e38]], [[0.0, -3e38, -1.0, 1.0]], "js", 1e-6),
    ([[-3e38, -3e38 * 0.999, -2.9e38]], [[-3e38, -1e30, -3e38]], "js", 1e-6),
    ([[-3e38, -3e38 * 0.999, -2.9e38]], [[-3e38, -1e30, -3e38]], "kl", 1e-6),
    ([[1e30, -1e30, 3.0]], [[-1e30, 1e30, -math.inf]], "kl", 1e-6),
]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize(("x", "y", "kind", "tau"), EXTREME)
def test_extreme_values_equal_the_float64_reference(x, y, kind, tau, backend, device):
    x, y = torch.tensor(x), torch.tensor(y)
    for id_ in range(x.shape[1]):
        ids = torch.tensor([id_])
        out = token_contrast(x.to(device), y.to(device), ids.to(device), kind=kind, temperature=tau, backend=backend)
        want = reference(x.double(), y.double(), ids, kind=kind, temperature=tau)
        for name, a, e in zip(NAMES, out, want, strict=True):
            e32 = e.float()  # the float64 value rounded to float32 (±inf where it leaves the range)
            assert not torch.isnan(a).any(), f"{name} is NaN"
            same_inf = torch.isinf(e32) & (a == e32)
            assert same_inf.all() or torch.isclose(a.cpu(), e32, rtol=1e-5, atol=1e-5).all(), (name, a, e)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_logits_on_ignored_rows(backend, kind, dtype, device):
    """Issue 11: ignored rows (padding, prompt) scaled ×30 (max logit/τ > 88.7, e^x overflows fp32) change nothing:
    outputs finite, 0 there, the kept rows equal to the float64 reference (and to the other backend)."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 40, generator=g) * 4, torch.randn(6, 40, generator=g) * 4
    ids = torch.randint(0, 40, (6,), generator=g)
    ids[[0, 3]] = -100
    x[[0, 3]] *= 30.0
    y[[0, 3]] *= -30.0
    x, y = x.to(dtype), y.to(dtype)
    out = token_contrast(x.to(device), y.to(device), ids.to(device), kind=kind, temperature=0.5, backend=backend)
    want = reference(x.double(), y.double(), ids, kind=kind, temperature=0.5)
    for name, a, e in zip(NAMES, out, want, strict=True):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a[[0, 3]].cpu(), torch.zeros(2))
        assert_close(a.cpu(), e, atol=ATOL, rtol=RTOL, name=name)


def test_meta_tensors_infer_shapes():
    x = torch.empty(2, 7, 50, device="meta")
    ids = torch.empty(2, 7, dtype=torch.long, device="meta")
    out = token_contrast(x, x, ids, kind="js", shift=True)
    assert all(t.device.type == "meta" and t.shape == (2, 7) and t.dtype == torch.float32 for t in out)


# ------------------------------------------------------------------------------------ static: int64 offsets
_IR_SCRIPT = r"""
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, sys.argv[1])
import gpu_report
from srpo_core.kernels import token_contrast, token_logprobs
want = {"token_logprobs_fwd[fp32,entropy]", "token_logprobs_bwd[fp32,both]", "token_contrast_fwd[kl,fp32]",
        "token_contrast_fwd[js,fp32,f64]"}
pat = re.compile(r",\s*(tensor<[0-9x]*xi64>|i64)\s+loc\(")
seen = 0
for entry in token_logprobs.GPU_REPORT + token_contrast.GPU_REPORT:
    if entry["name"] not in want:
        continue
    seen += 1
    ttir = gpu_report.compile_entry(entry, 80).asm["ttir"]
    adds = [line for line in ttir.splitlines() if "tt.addptr" in line]
    bad = [line.strip() for line in adds if not pat.search(line)]
    assert adds and not bad, (entry["name"], bad[:3])
    print(entry["name"], len(adds), "addptr, all i64")
assert seen == len(want), seen
print("IR OK")
"""


def test_every_pointer_offset_is_int64_in_the_compiled_kernels(tmp_path):
    """Issue 11: compile the kernels for sm_80 (no GPU needed) and check that every ``tt.addptr`` offset in the TTIR
    is i64, so ``index × stride`` past 2³¹ (a ``[V, N]ᵀ`` view at N = 32,768, V = 151,936) cannot wrap."""
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton")
    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _IR_SCRIPT, str(bench)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr and "gpu_report" not in proc.stderr:
        pytest.skip(f"cannot compile here: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and "IR OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_float64_redo_reads_only_rows_it_must(monkeypatch):
    """Torch path: a genuinely infinite KL row (mass where p' has none, as a top-k-masked reference gives) is final
    in fp32 and is not recomputed; an fp32-overflow row is, and gets the float64 value."""
    calls = []
    real = cpu_contrast.ref.token_contrast

    def spy(x, y, ids, **kw):
        if x.dtype == torch.float64:
            calls.append(x.shape[0])
        return real(x, y, ids, **kw)

    monkeypatch.setattr(cpu_contrast.ref, "token_contrast", spy)
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, -math.inf], [1.0, 2.0, 3.0]])
    # row 1: KL = ½(log ½ − 0) + ½(log ½ + 4e38) ≈ 2e38, though (−1e38 − 3e38) overflows fp32
    y = torch.tensor([[0.0, -math.inf, 2.0], [3e38, -1e38, -math.inf], [1.0, 2.0, 3.0]])
    out = token_contrast(x, y, torch.tensor([0, 0, 1]), kind="kl", backend="torch")
    assert calls == [1], calls  # only the overflow row
    assert out.div[0] == math.inf and math.isfinite(out.div[1]) and out.div[1] > 1e38
    assert_close(out.div[1], torch.tensor(2e38), atol=0.0, rtol=1e-5)


def test_shift_scans_only_the_scored_ids():
    """With ``shift=True`` position 0's id is never scored: out of range there is not an error (as token_logprobs)."""
    x, y = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    ids = torch.randint(0, 6, (2, 4))
    ids[:, 0] = 99
    out = token_contrast(x, y, ids, kind="kl", shift=True)
    ref = token_contrast(x[:, :-1], y[:, :-1], ids[:, 1:], kind="kl")
    assert torch.equal(out.div[:, :-1], ref.div) and torch.equal(out.div[:, -1], torch.zeros(2))
    ids[0, 2] = 99
    with pytest.raises(ValueError, match="token_contrast: `ids`"):
        token_contrast(x, y, ids, kind="kl", shift=True)


# -- what the fuzz found: extreme logits and temperatures ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_contrast_kl_extreme_logits(backend, device):
    """Issue 14 finding 4: KL of fp32 logits with ±3e38 and -inf was NaN; the float64 reference is +inf."""
    x = torch.tensor([[3e38, -3e38, -INF, 0.0]], device=device)
    y = torch.tensor([[-3e38, 3e38, 0.0, -INF]], device=device)
    out = token_contrast(x, y, torch.tensor([0], device=device), kind="kl", backend=backend)
    assert float(out.div[0]) == INF, out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_contrast_temperature_overflow(backend, device):
    """Found by the fuzz: logits_ref 3e38 / temperature 0.7 overflows float32; logp_ref was NaN (float64: 0)."""
    out = token_contrast(torch.tensor([[-INF]], device=device), torch.tensor([[3e38]], device=device),
                         torch.tensor([0], device=device), kind="kl", temperature=0.7, backend=backend)
    assert float(out.logp_ref[0]) == 0.0, out
