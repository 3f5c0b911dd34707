"""The case table of `srpo-core bench`: every public op and the anchors it is measured against, at three size presets.

Each case builds its inputs once and returns a closure (``Case.setup``); ``srpo_core.bench.suite`` times it (through
``srpo_core.bench.measure``) and the pytest-benchmark suite (``benchmarks/test_bench_ops.py``) runs the same closures.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

# Size presets: "full" is what the bars are stated at (the linear op at N=1024, H=1024, V=151,936;
# benchmarks/linear_table.py measures it at N=2048 and other shapes); "quick" is a smoke run of every case at small
# sizes (4.4 min with one thread on 2 busy cores; role_tokens below the fast path's compile threshold, so
# role_aware_advantages runs eager there); "tiny" is for the test that checks the JSON.
# what --op accepts
OPS = ("token_logprobs", "token_contrast", "linear_token_logprobs", "role_aware_advantages", "linear_policy_loss")
SIZES = {
    "full": {"logprob_rows": 4096, "vocab": 151_936, "role_tokens": 1 << 20, "linear": (1024, 1024, 151_936),
             "contrast_rows": 1024},
    "quick": {"logprob_rows": 512, "vocab": 32_000, "role_tokens": 1 << 17, "linear": (256, 512, 32_000),
              "contrast_rows": 256},
    "tiny": {"logprob_rows": 16, "vocab": 257, "role_tokens": 1 << 10, "linear": (16, 32, 257), "contrast_rows": 8},
}


@dataclasses.dataclass
class Case:
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    impl: str  # "srpo-core" for ours, otherwise the anchor's name
    shape: str
    dtype: str
    setup: Callable[[], Callable[[], object]]  # builds inputs, returns the timed closure
    devices: tuple[str, ...] = ("cpu", "cuda")


# ----------------------------------------------------------------------------------------------------------- cases
def _logits(n: int, v: int, dtype: torch.dtype, device: str, requires_grad: bool = False):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    return x.requires_grad_(requires_grad), ids


def _fwd_bwd(fn, x):
    def run():
        x.grad = None
        fn().sum().backward()

    run.params = (x,)  # what it differentiates: benchmarks/test_bench_ops.py compares their gradients across impls
    return run


def _token_logprob_cases(sizes, dtypes, device) -> list[Case]:
    n, v = sizes["logprob_rows"], sizes["vocab"]
    shape = f"N={n} V={v}"
    cases = []
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")

        def ours(mode, dtype=dtype):
            from srpo_core import token_logprobs

            x, ids = _logits(n, v, dtype, device, requires_grad=mode != "fwd")
            call = lambda: token_logprobs(x, ids)  # noqa: E731
            return call if mode == "fwd" else _fwd_bwd(call, x)

        def naive(mode, dtype=dtype):
            x, ids = _logits(n, v, dtype, device, requires_grad=mode != "fwd")
            call = lambda: torch.log_softmax(x.float(), -1).gather(-1, ids[:, None]).squeeze(-1)  # noqa: E731
            return call if mode == "fwd" else _fwd_bwd(call, x)

        def trl_sls(mode, dtype=dtype):
            from trl.trainer.utils import selective_log_softmax

            x, ids = _logits(n, v, dtype, device, requires_grad=mode != "fwd")
            call = lambda: selective_log_softmax(x, ids)  # noqa: E731
            return call if mode == "fwd" else _fwd_bwd(call, x)

        def trl_kernel(mode, dtype=dtype):
            from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

            x, ids = _logits(n, v, dtype, device, requires_grad=mode != "fwd")
            call = lambda: selective_log_softmax_and_entropy(x[None], ids[None])[0]  # noqa: E731
            return call if mode == "fwd" else _fwd_bwd(call, x)

        for mode in ("fwd", "fwd+bwd"):
            cases += [
                Case("token_logprobs", mode, "srpo-core", shape, dname, lambda m=mode, f=ours: f(m)),
                Case("token_logprobs", mode, "naive", shape, dname, lambda m=mode, f=naive: f(m)),
                Case("token_logprobs", mode, "trl.selective_log_softmax", shape, dname,
                     lambda m=mode, f=trl_sls: f(m)),
                Case("token_logprobs", mode, "trl.logprob_entropy kernel", shape, dname,
                     lambda m=mode, f=trl_kernel: f(m), devices=("cuda",)),
            ]
    return cases


def _three_gemms(hidden: torch.Tensor, weight: torch.Tensor):
    """The floor of an LM-head op's fwd+bwd: the GEMMs it cannot avoid (logits, grad_hidden, grad_weight)."""
    grad = torch.ones(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)

    def three():
        hidden @ weight.T
        grad @ weight
        grad.T @ hidden

    return three


def _linear_cases(sizes, dtypes, device) -> list[Case]:
    n, h, v = sizes["linear"]
    shape = f"N={n} H={h} V={v}"
    cases = []
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")

        def inputs(mode, dtype=dtype):
            g = torch.Generator(device="cpu").manual_seed(0)
            hidden = (torch.randn(n, h, generator=g)).to(device=device, dtype=dtype)
            weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(device=device, dtype=dtype)
            ids = torch.randint(0, v, (n,), generator=g).to(device)
            if mode != "fwd":
                hidden.requires_grad_(True)
                weight.requires_grad_(True)
            return hidden, weight, ids

        def wrap(mode, call, hidden, weight):
            if mode == "fwd":
                return call

            def run():
                hidden.grad = weight.grad = None
                call().sum().backward()

            run.params = (hidden, weight)
            return run

        def ours(mode):
            from srpo_core import linear_token_logprobs

            hidden, weight, ids = inputs(mode)
            return wrap(mode, lambda: linear_token_logprobs(hidden, weight, ids), hidden, weight)

        def naive(mode):
            hidden, weight, ids = inputs(mode)
            call = lambda: torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, ids[:, None])[:, 0]  # noqa: E731
            return wrap(mode, call, hidden, weight)

        def gemm(mode, dtype=dtype):
            hidden, weight, _ = inputs("fwd", dtype)
            if mode == "fwd":
                return lambda: hidden @ weight.T
            return _three_gemms(hidden, weight)

        def trl_chunked(mode):
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk  # what GRPOTrainer passes

            hidden, weight, ids = inputs(mode)
            call = lambda: ChunkedLogProbFunction.apply(hidden, weight, None, ids, 1.0, chunk, None, 1.0, ())[0]  # noqa: E731
            return wrap(mode, call, hidden, weight)

        def cce(mode):
            from cut_cross_entropy import linear_cross_entropy

            hidden, weight, ids = inputs(mode)
            impl = "cce" if device == "cuda" else "torch_compile"
            call = lambda: -linear_cross_entropy(hidden, weight, ids, reduction="none", impl=impl)  # noqa: E731
            return wrap(mode, call, hidden, weight)

        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in (("srpo-core", ours), ("naive", naive), ("GEMM floor", gemm),
                             ("trl.ChunkedLogProbFunction", trl_chunked), ("cut-cross-entropy", cce)):
                cases.append(Case("linear_token_logprobs", mode, impl, shape, dname, lambda m=mode, f=fn: f(m)))
    return cases


def _contrast_cases(sizes, dtypes, device) -> list[Case]:
    n, v = sizes["contrast_rows"], sizes["vocab"]
    shape = f"N={n} V={v}"
    cases = []
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")

        def ours(dtype=dtype):
            from srpo_core import token_contrast

            x, ids = _logits(n, v, dtype, device)
            y, _ = _logits(n, v, dtype, device)
            y = y.roll(1, 0)
            return lambda: token_contrast(x, y, ids, kind="kl")

        def naive(dtype=dtype):
            x, ids = _logits(n, v, dtype, device)
            y, _ = _logits(n, v, dtype, device)
            y = y.roll(1, 0)

            def call():
                lp, lq = torch.log_softmax(x.float(), -1), torch.log_softmax(y.float(), -1)
                return (lp.exp() * (lp - lq)).sum(-1), lp.gather(-1, ids[:, None]), lq.gather(-1, ids[:, None])

            return call

        cases += [Case("token_contrast", "fwd", "srpo-core", shape, dname, ours),
                  Case("token_contrast", "fwd", "naive", shape, dname, naive)]
    return cases


def _role_cases(sizes, device) -> list[Case]:
    n = sizes["role_tokens"]
    t = 1024 if n >= 1024 else n
    b = n // t
    shape = f"{n} tokens (B={b}, T={t})"

    def inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        mask = torch.rand(b, t, generator=g) < 0.95
        lp, lc, la = (-(torch.rand(b, t, generator=g) * 4) for _ in range(3))
        roles = torch.randint(0, 3, (b, t), generator=g)
        adv = torch.randn(b, generator=g)
        return [x.to(device) for x in (adv, lp, lc, la, roles, mask)]

    def ours():
        from srpo_core import role_aware_advantages

        adv, lp, lc, la, roles, mask = inputs()
        return lambda: role_aware_advantages(adv, lp, lc, la, roles, mask=mask).advantages

    def reference():
        from srpo_core.config import SRPOConfig
        from srpo_core.layout import cu_seqlens_from_mask
        from srpo_core.reference.contrast import contrast
        from srpo_core.reference.role_aware_advantages import role_weights

        adv, lp, lc, la, roles, mask = inputs()
        cfg = SRPOConfig()

        def call():  # the plain composition: pack, contrast, SPEC steps 2-6, unpack
            r = roles[mask]
            s = torch.where(r == 1, contrast(lp[mask], lc[mask], "k3"), contrast(lp[mask], la[mask], "logratio"))
            out = torch.zeros(mask.shape, dtype=s.dtype, device=s.device)
            out[mask] = role_weights(adv, s, r, cu_seqlens_from_mask(mask), cfg).advantages
            return out

        return call

    def vppo():
        from srpo_core.presets import vppo_advantages

        adv, lp, lc, _, _, mask = inputs()
        return lambda: vppo_advantages(adv, lp, lc, mask=mask)

    return [Case("role_aware_advantages", "fwd", "srpo-core", shape, "float32", ours),
            Case("role_aware_advantages", "fwd", "reference composition", shape, "float32", reference),
            Case("role_aware_advantages", "fwd", "vppo_advantages (preset)", shape, "float32", vppo)]


# Shapes of the fused policy loss (issue 12's bars are stated at N=1024, H=1024, V ∈ {32,000, 151,936}, fp32).
POLICY_LOSS_SHAPES = {"full": [(4, 256, 1024, 32_000), (4, 256, 1024, 151_936)], "quick": [(2, 128, 512, 32_000)],
                      "tiny": [(2, 8, 32, 257)]}


def _policy_loss_cases(preset, dtypes, device) -> list[Case]:
    """fwd+bwd of a GRPO step's loss (PPO-clip, token-mean, per-sequence advantages so that Liger can take them) from
    hidden states: ours, naive torch, the three GEMMs, our log-prob op + the loss in torch, Liger's fused GRPO loss."""
    return [c for s in POLICY_LOSS_SHAPES[preset] for d in dtypes for c in policy_loss_shape(*s, d, preset, device)]


def policy_loss_shape(b, t, h, v, dtype, preset, device) -> list[Case]:
    from srpo_core.reference.policy_loss import token_loss

    shape, dname, n = f"N={b * t} H={h} V={v}", str(dtype).removeprefix("torch."), b * t

    def inputs():
        # drawn where they are used: a [151,936, 2,048] CPU randn per row would cost the GPU check seconds each
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(b, t, h, generator=g, device=device).to(dtype).requires_grad_(True)
        weight = (torch.randn(v, h, generator=g, device=device) / math.sqrt(h)).to(dtype).requires_grad_(True)
        ids = torch.randint(0, v, (b, t), generator=g, device=device)
        old = -torch.rand(b, t, generator=g, device=device) * 8
        return hidden, weight, ids, old, torch.randn(b, generator=g, device=device), torch.ones(
            b, t, dtype=torch.bool, device=device)

    def step(loss_fn, hidden, weight):
        def run():
            hidden.grad = weight.grad = None
            loss_fn().backward()

        run.params = (hidden, weight)  # the memory table frees their gradients before measuring one call
        return run

    def torch_loss(logp, old, adv, mask):
        ell, _ = token_loss(logp, old, adv[:, None].expand_as(old), None, None, epsilon_low=0.2,
                            epsilon_high=0.28, clip_ratio_c=None, beta=0.0, kl_kind="k3", entropy_coeff=0.0)
        return (ell * mask).sum() / mask.sum()

    def ours(backend="auto"):
        from srpo_core import PolicyLossConfig, linear_policy_loss

        hidden, weight, ids, old, adv, mask = inputs()
        cfg = PolicyLossConfig(epsilon_high=0.28)
        return step(lambda: linear_policy_loss(hidden, weight, ids, old, adv, mask=mask, config=cfg,
                                               backend=backend).loss, hidden, weight)

    def naive():
        hidden, weight, ids, old, adv, mask = inputs()
        lp = lambda: torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, ids[..., None])[..., 0]  # noqa: E731
        return step(lambda: torch_loss(lp(), old, adv, mask), hidden, weight)

    def ours_logprobs():
        from srpo_core import linear_token_logprobs

        hidden, weight, ids, old, adv, mask = inputs()
        lp = lambda: linear_token_logprobs(hidden.reshape(-1, h), weight, ids.reshape(-1)).reshape(b, t)  # noqa: E731
        return step(lambda: torch_loss(lp(), old, adv, mask), hidden, weight)

    def gemm():
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden, weight = (torch.randn(n, h, generator=g).to(device, dtype), torch.randn(v, h, generator=g).to(
            device, dtype))
        return _three_gemms(hidden, weight)

    def liger():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        hidden, weight, ids, old, adv, mask = inputs()
        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                      loss_type="bnpo", compiled=True)
        return step(lambda: fn(hidden, weight, ids, mask.long(), adv, old_per_token_logps=old)[0], hidden, weight)

    impls = [("srpo-core", ours), ("naive", naive), ("GEMM floor", gemm),
             ("our log-probs + loss", ours_logprobs)]
    if device == "cuda":  # auto is the Triton path there; the torch path: the same schedule, torch elementwise ops
        impls.insert(1, ("srpo-core (torch path)", lambda: ours("torch")))
    if preset != "tiny":  # Liger's compile alone takes longer than the whole tiny run
        impls.append(("liger.LigerFusedLinearGRPOLoss", liger))
    return [Case("linear_policy_loss", "fwd+bwd", impl, shape, dname, fn) for impl, fn in impls]


def build_cases(preset: str, device: str) -> list[Case]:
    sizes = SIZES[preset]
    dtypes = (torch.float32, torch.bfloat16) if preset != "tiny" else (torch.float32,)
    cases = (_token_logprob_cases(sizes, dtypes, device) + _contrast_cases(sizes, dtypes[:1], device)
             + _linear_cases(sizes, dtypes[:1], device) + _role_cases(sizes, device)
             + _policy_loss_cases(preset, dtypes[:1], device))
    return [c for c in cases if device in c.devices]
