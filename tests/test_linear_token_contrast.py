"""linear_token_contrast: the vocabulary-tiled torch path and the Triton kernel (under TRITON_INTERPRET=1, or on the
GPU with SRPO_TEST_DEVICE=cuda) against the float64 reference (materialised logits, then token_contrast's
reference), with tolerances relative to torch's own error in the same dtype; multi-tile and multi-split walks, the
float64 slow path (−inf bias entries, a logit far above the running log-sum-exp, NaN inputs), the vocab-parallel
combine, errors, and torch.compile tracing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srpo_core import _dispatch, linear_token_contrast
from srpo_core.common import linear_contrast
from srpo_core.cpu import linear_token_contrast as cpu
from srpo_core.cpu import linear_token_logprobs as cpu_logprobs
from srpo_core.reference.linear_token_contrast import linear_token_contrast as reference
from srpo_core.testing import assert_close, assert_close_vs_torch
from srpo_core.tuning import TUNING

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

needs_triton = pytest.mark.skipif(
    not (_dispatch.triton_importable() and (_dispatch.interpreting() or torch.cuda.is_available())),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# absolute floor on top of 2·|torch same dtype − float64|
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-4, torch.float16: 2e-4, torch.float64: 1e-12}
# Every path rounds hidden @ Wᵀ + b once to the inputs' dtype (D48) from its fp32 accumulator, but the accumulators
# differ (summation order; the torch tile GEMM starts from −c): where one lands on the other side of a rounding
# boundary the logits differ by an ulp of the largest |logit/τ|, which moves div and both log-probs by up to ~2 such
# ulps, whatever torch's own error happened to be on that input (it matters for logits of hundreds, where an fp32
# ulp is ~1e-5). bf16/fp16 rows where no logit can land on either side are held to fp32 accuracy (ROUNDED_ATOL).
LOGIT_ULP = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
ROUNDED_ATOL = 2e-5  # plus 16 fp32 ulps of the largest |logit/τ|
NAMES = ("div", "logp", "logp_ref")


def make(n, h, v, dtype, *, seed=0, bias=True, ignore=0.3, scale=1.0, related="noisy", device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    ref = hid + 0.5 * torch.randn(n, h, generator=g, dtype=torch.float64) if related == "noisy" else \
        torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * h ** -0.5 * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    ids[torch.rand(n, generator=g) < ignore] = -100
    cast = [x.to(dtype).to(device) if x is not None else None for x in (hid, ref, w, b)]
    return (*cast, ids.to(device))


def check(outs, hid, ref, w, ids, *, kind, temperature=1.0, bias=None, tag=""):
    """``|ours − ref64| ≤ 2·|reference in the inputs' dtype − ref64| + atol``, NaN/inf parity with ref64."""
    dtype = hid.dtype

    def up(x):
        return None if x is None else x.double().cpu()

    ref64 = reference(up(hid), up(ref), up(w), ids.cpu(), kind=kind, temperature=temperature, bias=up(bias))
    same = reference(hid.cpu(), ref.cpu(), w.cpu(), ids.cpu(), kind=kind, temperature=temperature,
                     bias=None if bias is None else bias.cpu())
    atol = ATOL[dtype]
    if dtype in LOGIT_ULP and ids.numel():
        x64 = up(hid) @ up(w).T, up(ref) @ up(w).T
        big = max(float(x.abs().max()) for x in x64) + (float(up(bias).abs().max()) if bias is not None else 0.0)
        atol += 4 * LOGIT_ULP[dtype] * big / temperature
    for name, a, e, s in zip(NAMES, outs, ref64, same, strict=True):
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), f"{name}: {a.dtype}"
        assert a.shape == ids.shape
        assert_close_vs_torch(a, e, s, atol=atol, name=f"{tag}{name}")
    if dtype in (torch.bfloat16, torch.float16) and ids.numel():
        check_rounded_once(outs, hid, ref, w, ids, kind=kind, temperature=temperature, bias=bias, tag=tag)


def rounded_once(hid, ref, w, bias):
    """Both conditions' logits as a model computes them (``F.linear``: ``hidden @ Wᵀ + b`` rounded once to the inputs'
    dtype), in float64, and the rows where an fp32 accumulator of that sum could round either way: ``(x, x', amb)``."""
    dtype = hid.dtype
    w64 = w.double().cpu()
    b64 = bias.double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    xs, amb = [], torch.zeros(hid.shape[0], dtype=torch.bool)
    for h in (hid, ref):
        h64 = h.double().cpu()
        x = h64 @ w64.T + b64  # exact but for float64 rounding (bf16/fp16 products are exact in float64)
        g = (h64.abs() @ w64.abs().T + b64.abs()) * (h.shape[-1] + 2) * 2.0 ** -23  # > any fp32 accumulator's error
        amb |= ((x - g).float().to(dtype) != (x + g).float().to(dtype)).any(-1)
        xs.append(x.float().to(dtype).double())
    return xs[0], xs[1], amb


def check_rounded_once(outs, hid, ref, w, ids, *, kind, temperature=1.0, bias=None, tag=""):
    """bf16/fp16: the float64 ``token_contrast`` of the once-rounded logits, to fp32 accuracy, on every row whose
    rounding cannot depend on the accumulation order."""
    from srpo_core.reference.token_contrast import token_contrast

    x, y, amb = rounded_once(hid, ref, w, bias)
    model = token_contrast(x, y, ids.cpu(), kind=kind, temperature=temperature)
    big = max(float(x.abs().max()), float(y.abs().max())) if x.numel() else 0.0
    atol = ROUNDED_ATOL + 16 * 2.0 ** -24 * big / temperature
    for name, a, e in zip(NAMES, outs, model, strict=True):
        assert_close(a.cpu()[~amb], e[~amb], atol=atol, rtol=0, name=f"{tag}{name} (logits rounded once)")


@st.composite
def cases(draw):
    n = draw(st.sampled_from([0, 1, 1, 2, 3, 5, 7, 17]))
    h = draw(st.sampled_from([1, 3, 8, 16, 19]))
    v = draw(st.integers(1, 90) | st.sampled_from([1, 2, 16, 17, 63, 64, 65]))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    return dict(n=n, h=h, v=v, dtype=dtype, seed=draw(st.integers(0, 2**31 - 1)), bias=draw(st.booleans()),
                ignore=draw(st.sampled_from([0.0, 0.3, 1.0])), scale=draw(st.sampled_from([0.3, 1.0, 4.0])),
                related=draw(st.sampled_from(["noisy", "independent"])), kind=draw(st.sampled_from(["kl", "js"])),
                temperature=draw(st.sampled_from([1.0, 0.7, 2.0])))


def _run(c, backend, device="cpu"):
    hid, ref, w, b, ids = make(c["n"], c["h"], c["v"], c["dtype"], seed=c["seed"], bias=c["bias"],
                               ignore=c["ignore"], scale=c["scale"], related=c["related"], device=device)
    outs = linear_token_contrast(hid, ref, w, ids, kind=c["kind"], temperature=c["temperature"], bias=b,
                                 backend=backend)
    check(outs, hid, ref, w, ids, kind=c["kind"], temperature=c["temperature"], bias=b)


@given(c=cases())
def test_torch_path_matches_float64_reference(c):
    _run(c, "torch")


@given(c=cases())
def test_torch_path_small_tiles_match_float64_reference(c):
    """Several vocabulary tiles and token chunks per call (the online KL sum across tiles and the rebasing), several
    row chunks for js."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TUNING, "linear_contrast_js_chunk_elements", 50)
        mp.setattr(TUNING, "linear_vocab_tile", 4)
        mp.setattr(TUNING, "linear_tile_elements", 16)
        mp.setattr(TUNING, "linear_forward_tile_scale", 1)
        assert cpu_logprobs.tile_sizes(17, 90, forward=True) == (4, 4)
        _run(c, "torch")


@needs_triton
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # `device` is a constant: sharing it is intended
@given(c=cases())
def test_triton_matches_float64_reference(c, device):
    _run(c, "triton", device)


@needs_triton
@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_small_blocks_and_splits(kind, dtype, device):
    """16-wide blocks, several row blocks and vocabulary splits (the split combine), an H loop of 3 steps."""
    from srpo_core.kernels.linear_token_contrast import linear_contrast_js, linear_contrast_stats

    hid, ref, w, b, ids = make(37, 40, 101, DTYPES[dtype], seed=3, device=device)
    ids_local = torch.where(ids == -100, torch.full_like(ids, -1), ids)
    cfg = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_H": 16, "num_warps": 2, "num_stages": 1}
    lse_x, lse_y, t, tx, ty = linear_contrast_stats(hid, ref, w, b, ids_local, inv_tau=1 / 0.8, kind=kind,
                                                    config=cfg, splits=3)
    div = t if kind == "kl" else linear_contrast_js(hid, ref, w, b, lse_x, lse_y, inv_tau=1 / 0.8, config=cfg,
                                                    splits=4)
    keep = ids != -100
    outs = tuple(torch.where(keep, x, torch.zeros_like(x)) for x in (div, tx - lse_x, ty - lse_y))
    check(outs, hid, ref, w, ids, kind=kind, temperature=0.8, bias=b)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_logits_are_rounded_once(dtype, kind, backend, device):
    """``hidden @ Wᵀ + b`` rounded once to the inputs' dtype on every path, as ``F.linear`` rounds it (D48). Inputs
    with few significant bits make every fp32 accumulation exact, so no summation order can round differently: each
    path must give the float64 ``token_contrast`` of the once-rounded logits to fp32 accuracy (mm then + bias, two
    roundings, or an unrounded kernel tile were ~0.1 nats off in bf16)."""
    from srpo_core.reference.token_contrast import token_contrast

    dt = DTYPES[dtype]
    dev = device if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(21)
    n, h, v = 24, 48, 300
    hid = torch.randint(-16, 17, (n, h), generator=g, dtype=torch.float64) / 8
    ref = hid + torch.randint(-4, 5, (n, h), generator=g, dtype=torch.float64) / 8
    w = torch.randint(-16, 17, (v, h), generator=g, dtype=torch.float64) / 32
    b = torch.randint(-64, 65, (v,), generator=g, dtype=torch.float64) / 16
    ids = torch.randint(0, v, (n,), generator=g)
    ids[::5] = -100
    x, y = ((z @ w.T + b).float().to(dt).double() for z in (hid, ref))  # exact sums (2^-8 steps, |x| < 2^7), rounded
    assert not torch.equal(x, (hid @ w.T).float().to(dt).double() + b)  # the case tells one rounding from two
    model = token_contrast(x, y, ids, kind=kind, temperature=0.7)
    outs = linear_token_contrast(*(z.to(dt).to(dev) for z in (hid, ref, w)), ids.to(dev), kind=kind,
                                 temperature=0.7, bias=b.to(dt).to(dev), backend=backend)
    atol = ROUNDED_ATOL + 16 * 2.0 ** -24 * max(float(x.abs().max()), float(y.abs().max())) / 0.7
    for name, a, e in zip(NAMES, outs, model, strict=True):
        assert_close(a, e, atol=atol, name=name)


@needs_triton
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_triton_launchers_take_no_rows(kind, device):
    """N = 0 (a vocab-parallel rank whose batch is empty or all ignored reaches the launchers with no rows): empty
    results, no launch (the split count divided by the number of row blocks)."""
    from srpo_core.kernels.linear_token_contrast import linear_contrast_js, linear_contrast_stats

    _, _, w, b, _ = make(1, 16, 40, torch.float32, seed=24, device=device)
    h = torch.zeros(0, 16, device=device)
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    stats = linear_contrast_stats(h, h, w, b, ids, inv_tau=1.0, kind=kind)
    assert (stats[2] is None) == (kind == "js")
    assert all(x.shape == (0,) and x.dtype == torch.float32 for x in stats if x is not None)
    js = linear_contrast_js(h, h, w, b, stats[0], stats[1], inv_tau=1.0)
    assert js.shape == (0,) and js.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_slow_path_rows_match_float64_reference(kind, backend, device):
    """Rows the fp32 walk cannot finish, recomputed in float64: ``−inf`` bias entries (``0·log 0`` terms), logits
    ~1e3 with the largest one in a later tile (more than 127 bits above the running log-sum-exp), next to plain rows."""
    dev = device if backend == "triton" else torch.device("cpu")
    hid, ref, w, b, ids = make(6, 8, 50, torch.float32, seed=5, ignore=0.0)
    b[[3, 17, 40]] = -math.inf
    ids[0] = 3  # a sampled token of probability 0: logp = −inf
    hid[2] *= 300.0  # logits of a few hundred: the walk's later tiles overflow 2^(u − c)
    ref[4] = hid[4] * 200.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TUNING, "linear_vocab_tile", 8)
        mp.setattr(TUNING, "linear_forward_tile_scale", 1)
        outs = linear_token_contrast(*(x.to(dev) for x in (hid, ref, w)), ids.to(dev), kind=kind, bias=b.to(dev),
                                     backend=backend)
    assert math.isinf(outs.logp[0]) and outs.logp[0] < 0
    check(outs, hid, ref, w, ids, kind=kind, bias=b)


def test_slow_path_is_taken_for_overflowing_rows(monkeypatch):
    """The row with huge logits takes the float64 slow path (and only it): a wrong fast path cannot hide behind it."""
    hid, ref, w, b, ids = make(4, 8, 50, torch.float32, seed=6, ignore=0.0)
    hid[1] *= 500.0
    seen = []
    real = linear_contrast.slow_rows

    def spy(*args, **kw):
        seen.append(args[6].tolist())
        return real(*args, **kw)

    monkeypatch.setattr(linear_contrast, "slow_rows", spy)
    monkeypatch.setattr(TUNING, "linear_vocab_tile", 8)
    monkeypatch.setattr(TUNING, "linear_forward_tile_scale", 1)
    outs = linear_token_contrast(hid, ref, w, ids, bias=b, backend="torch")
    assert seen == [[1]]
    check(outs, hid, ref, w, ids, kind="kl", bias=b)


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_nan_input_raises_naming_the_row_or_returns_nan(kind):
    hid, ref, w, b, ids = make(5, 8, 30, torch.float32, seed=2, ignore=0.0)
    ref[3, 2] = math.nan
    with pytest.raises(ValueError, match=r"linear_token_contrast: the logits of row 3 are not finite"):
        linear_token_contrast(hid, ref, w, ids, kind=kind, backend="torch")
    outs = linear_token_contrast(hid, ref, w, ids, kind=kind, backend="torch", check_ids=False)
    assert torch.isnan(outs.div[3]) and torch.isnan(outs.logp_ref[3]) and not torch.isnan(outs.logp[3])
    assert torch.isfinite(outs.div[[0, 1, 2, 4]]).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_strided_bias_reads_as_its_values(kind, backend, device):
    """A bias view with stride 2 (``randn(2V)[::2]``) gives the float64 reference's values: the kernel reads the bias
    with unit stride, so the launcher hands it a contiguous copy (it read the wrong entries)."""
    dev = device if backend == "triton" else torch.device("cpu")
    hid, ref, w, _, ids = make(5, 16, 40, torch.float32, seed=22, device=dev)
    full = torch.randn(80, generator=torch.Generator().manual_seed(23)) * 3
    bias = full.to(dev)[::2]
    assert bias.stride() == (2,)
    outs = linear_token_contrast(hid, ref, w, ids, kind=kind, bias=bias, backend=backend)
    check(outs, hid, ref, w, ids, kind=kind, bias=bias.contiguous())


@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_shards_combine_to_the_whole_vocabulary(kind, world):
    """Each shard's local statistics (the torch path, uneven shards, ids owned by one shard), combined with the same
    functions the process-group path all-reduces with, give the unsharded result."""
    from srpo_core.ops.linear_token_logprobs import _rows

    hid, ref, w, b, ids = make(9, 8, 31, torch.float64, seed=4)
    sizes = [31 // world + (1 if r < 31 % world else 0) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    keep, rows, h_k, _ = _rows(hid, ids, -100, 0, True)
    r_k = ref[rows]
    stats, owned = [], []
    for s0, sz in zip(starts, sizes, strict=True):
        _, _, _, idl = _rows(hid, ids, -100, s0, True)
        stats.append(cpu.local_stats(h_k, r_k, w[s0:s0 + sz], b[s0:s0 + sz], idl, 1.0, kind))
        owned.append((idl >= 0) & (idl < sz))
    t = torch.stack([s[2] for s in stats]) if kind == "kl" else None
    lse_x, lse_y, kl, tx, ty = linear_contrast.combine_stats(*(torch.stack([s[i] for s in stats]) for i in (0, 1)), t,
                                                 *(torch.stack([s[i] for s in stats]) for i in (3, 4)),
                                                 torch.stack(owned), lambda x: x.amax(1), lambda x: x.sum(1))
    if kind == "js":
        kl = sum(cpu.js_local(h_k, r_k, w[s0:s0 + sz], b[s0:s0 + sz], 1.0, lse_x, lse_y)
                 for s0, sz in zip(starts, sizes, strict=True))
    e = reference(hid, ref, w, ids, kind=kind, bias=b)
    for name, a, ex in zip(NAMES, (kl, tx - lse_x, ty - lse_y), e, strict=True):
        assert_close(a, ex[rows], atol=1e-12, rtol=1e-12, name=name)


def test_leading_dims_and_dtype_of_outputs():
    hid, ref, w, b, ids = make(12, 8, 20, torch.float32, seed=8)
    outs = linear_token_contrast(hid.view(3, 4, 8), ref.view(3, 4, 8), w, ids.view(3, 4), bias=b, kind="js")
    flat = linear_token_contrast(hid, ref, w, ids, bias=b, kind="js")
    for a, f in zip(outs, flat, strict=True):
        assert a.shape == (3, 4) and a.dtype == torch.float32
        assert torch.equal(a.reshape(-1), f)


def test_requires_grad_inputs_give_detached_outputs():
    """Forward only (D210): the contrast is a signal, read without gradient."""
    hid, ref, w, b, ids = make(4, 8, 20, torch.float32, seed=9)
    outs = linear_token_contrast(hid.requires_grad_(), ref, w.requires_grad_(), ids, bias=b)
    assert all(not x.requires_grad and x.grad_fn is None for x in outs)


def test_mixed_precision_runs_in_fp32():
    hid, ref, w, b, ids = make(5, 8, 20, torch.float32, seed=10)
    outs = linear_token_contrast(hid.bfloat16(), ref.bfloat16(), w, ids, bias=b)
    check(outs, hid.bfloat16().float(), ref.bfloat16().float(), w, ids, kind="kl", bias=b)


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_torch_compile_fullgraph_traces_the_custom_op(kind):
    hid, ref, w, b, ids = make(5, 8, 19, torch.float32, seed=11)

    def step(h, r, w, ids):
        div, logp, logp_ref = linear_token_contrast(h * 1.0, r, w, ids, kind=kind, temperature=0.9)
        return div * 2.0, logp - logp_ref

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fake kernel + tracing, no C++ toolchain
    for a, e in zip(compiled(hid, ref, w, ids), step(hid, ref, w, ids), strict=True):
        assert_close(a, e, atol=1e-6, name="compiled")


def test_custom_op_opcheck():
    hid, ref, w, b, ids = make(4, 8, 10, torch.float32, seed=12)
    torch.library.opcheck(torch.ops.srpo_core.linear_token_contrast.default,
                          (hid, ref, w, b, ids, "kl", 1.0, -100, "torch"))


def test_meta_tensors_infer_shapes():
    hid, ref, w, b, ids = make(4, 8, 10, torch.float32, seed=13, device="meta")
    outs = linear_token_contrast(hid, ref, w, ids, bias=b)
    assert all(x.shape == (4,) and x.device.type == "meta" for x in outs)


@pytest.mark.parametrize("bad, match", [
    (dict(hidden_ref=torch.zeros(4, 7)), r"`hidden_ref` must have the shape, dtype and device of `hidden` \(\[4, 8\], "
                                         r"torch.float32, cpu\), got .*\(4, 7\)"),
    (dict(hidden_ref=torch.zeros(4, 8, dtype=torch.float64)), r"`hidden_ref` must have the shape, dtype and device"),
    (dict(hidden_ref=[[0.0] * 8] * 4), r"`hidden_ref` must be a tensor"),
    (dict(weight=torch.zeros(10, 5)), r"linear_token_contrast: `weight` must be \[V, H\] with H = 8"),
    (dict(ids=torch.tensor([0, 1, 10, 2])),
     r"linear_token_contrast: `ids` must lie in \[0, V\) = \[0, 10\).*ids\[2\] = 10"),
    (dict(ids=torch.zeros(3, dtype=torch.int64)), r"linear_token_contrast: `ids` must have shape \[4\]"),
    (dict(kind="k3"), r"linear_token_contrast: `kind` must be one of \('kl', 'js'\), got 'k3'"),
    (dict(temperature=0.0), r"linear_token_contrast: `temperature` must be a positive finite float, got 0.0"),
    (dict(bias=torch.zeros(9)), r"linear_token_contrast: `bias` must have shape \[V\] = \[10\]"),
    (dict(vocab_start=3), r"linear_token_contrast: `vocab_start` must be 0 without a process_group"),
    (dict(backend="cuda"), r"linear_token_contrast"),
])
def test_errors_name_the_argument(bad, match):
    args = dict(hidden=torch.zeros(4, 8), hidden_ref=torch.zeros(4, 8), weight=torch.zeros(10, 8),
                ids=torch.tensor([0, 1, -100, 2]))
    args.update(bad)
    pos = [args.pop(k) for k in ("hidden", "hidden_ref", "weight", "ids")]
    with pytest.raises((ValueError, TypeError), match=match):
        linear_token_contrast(*pos, **args)


@pytest.mark.parametrize("kind", ["k" * 100_000, [["kl"] * 512] * 64], ids=["long string", "nested list"])
def test_kind_error_describes_the_value_without_echoing_it(kind):
    """D190: a long or bulky ``kind`` is described (type, size, a short preview), never printed whole."""
    with pytest.raises(ValueError, match=r"linear_token_contrast: `kind` must be one of \('kl', 'js'\), got ") as e:
        linear_token_contrast(torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(10, 8), torch.tensor([0, 1, -100, 2]),
                              kind=kind)
    assert len(str(e.value)) < 400, str(e.value)[:400]


@pytest.mark.parametrize("world", [2, 3], ids=["2 ranks", "3 ranks"])
def test_vocab_parallel_process_group_matches_unsharded(world, tmp_path):
    """The process-group path for real: gloo ranks, uneven shards, kl and js, empty and fully ignored batches."""
    import os
    import pathlib
    import socket
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed gloo")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = pathlib.Path(__file__).with_name("linear_contrast_dist_worker.py")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(worker), str(port), str(world)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert f"linear-contrast-dist: OK {world}" in proc.stdout
