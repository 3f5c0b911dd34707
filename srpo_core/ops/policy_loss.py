"""Public ``linear_policy_loss``: the clipped policy-gradient token loss of a GRPO/PPO step straight from hidden states,
with the gradients w.r.t. ``hidden``, ``weight`` and ``bias`` formed during the forward, never materialising
``[N, V]``.

The math is ``srpo_core.reference.policy_loss`` (``L = Σ_t coef_t·ℓ_t``, ``coef`` from ``loss_agg_mode``). Backends
(``backend="auto" | "triton" | "torch"``; auto = Triton for CUDA tensors, torch otherwise):

- **torch** (``srpo_core.cpu.policy_loss``): token chunks with full vocabulary rows; logits tile → logsumexp → logp
  → ``∂ℓ/∂logp`` → ``G = ∂L/∂logits`` in place → ``grad_hidden = G @ W``, ``grad_weight += Gᵀ @ h``: three GEMMs.
- **triton** (``srpo_core.kernels.policy_loss``): the same three-GEMM schedule with library GEMMs and
  ``token_logprobs``' fused row kernels (one read of the tile forward, one read and write backward), in ~1 GiB tiles.

Registered as the custom op ``torch.ops.srpo_core.linear_policy_loss`` (fake kernel + autograd formula), so
``torch.compile(fullgraph=True)`` traces a step through it. Its backward returns the gradients stored in the forward
times the upstream scalar gradient (fp16: and times the power of two each is stored with, in fp32, D171); ``logp``,
``entropy`` and the metrics are returned detached.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from srpo_core import _dispatch
from srpo_core._validate import check_cu_seqlens, describe, require_tensor
from srpo_core.cpu.policy_loss import N_STATS, LossConfig, fp16_store, fused_fwd_bwd, mul_fp32_, token_grads
from srpo_core.ops.linear_token_logprobs_checks import AUTOCAST_DEVICES, autocast_dtype
from srpo_core.reference.policy_loss import KL_KINDS

OP = "linear_policy_loss"
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # [] differentiable in hidden, weight, bias
    logp: torch.Tensor  # [B, T] or [N], 0 at ignored positions, detached
    entropy: torch.Tensor | None  # same layout, when return_entropy (or an entropy bonus) asked for it
    metrics: dict  # token means over the valid tokens: clip_fraction, dual_clip_fraction, ratio_mean, approx_kl, ...


def aggregation_coef(valid: torch.Tensor, seq: torch.Tensor, n_seq: int, mode: str,
                     loss_scale_factor: float | None, global_batch_size: float | None = None) -> torch.Tensor:
    """Per-token weight ``coef [N]`` (0 at invalid tokens) with ``L = Σ_t coef_t·ℓ_t`` equal to verl 0.9.1's
    ``agg_loss`` (``dp_size = 1``), with ``G`` = ``global_batch_size`` or, by default, the number of sequences that
    have a valid token (verl excludes fully masked ones):

    - ``token-mean``: ``1 / #valid`` (all valid tokens of the batch);
    - ``seq-mean-token-sum``: ``1 / G``;  ``seq-mean-token-mean``: ``1 / (G · n_i)`` (``n_i`` valid tokens of ``i``);
    - ``seq-mean-token-sum-norm`` (Dr.GRPO): ``1 / (G · loss_scale_factor)``.

    TRL's means over sequences count every row (``.mean()`` over B): pass ``global_batch_size = B`` for them."""
    acc = torch.float64
    vf = valid.to(acc)
    if mode == "token-mean":
        return vf / vf.sum().clamp(min=1)
    counts = torch.zeros(max(n_seq, 1), dtype=acc, device=valid.device).index_add_(0, seq, vf)
    g = (counts > 0).sum().clamp(min=1).to(acc) if global_batch_size is None else float(global_batch_size)
    if mode == "seq-mean-token-sum":
        return vf / g
    if mode == "seq-mean-token-mean":
        return vf / (counts[seq].clamp(min=1) * g)
    return vf / (g * loss_scale_factor)


# ---------------------------------------------------------------------------------------------------------------------
# the flat op: rows with ``valid`` False are dropped before any backend runs


TRITON_TILE_BYTES = 1 << 30  # the Triton path's [k, V] logits tile: k = 1 GiB / (V · itemsize) tokens (D154)


def triton_chunk(n: int, v: int, itemsize: int) -> int:
    """Tokens per chunk of the Triton path: as many as a ``TRITON_TILE_BYTES`` tile holds, a multiple of 128 when
    over 128 (the GEMMs' tile), at least 1."""
    k = max(1, TRITON_TILE_BYTES // max(1, v * itemsize))
    return min(n, k if k < 128 else k - k % 128)


def _flat(hidden, weight, bias, ids, old, adv, ref, coef, valid, inv_tau, want_entropy, cfg, needs, backend,
          check_ids=True):
    n = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    live = None
    if check_ids:  # drop the rows that are not valid tokens (a host read: how many there are)
        compact = not bool(valid.all())
        rows = torch.nonzero(valid)[:, 0] if compact else None

        def take(x, dtype=None):
            if x is None:
                return None
            x = x[rows] if compact else x
            return x.to(dtype) if dtype is not None else x

        h_k, ids_k = take(hidden), take(ids)
        old_k, adv_k, ref_k, coef_k = take(old, acc), take(adv, acc), take(ref, acc), take(coef, acc)
    else:  # sync-free: every row is computed; the others' inputs are zeroed (finite) and their terms masked out
        compact, rows, live = False, None, valid
        ok = valid & (ids >= 0) & (ids < weight.shape[0])
        zero = torch.zeros((), dtype=acc, device=dev)

        def keep(x):
            return None if x is None else torch.where(valid, x.to(acc), zero)

        h_k = torch.where(valid[:, None], hidden, torch.zeros((), dtype=hidden.dtype, device=dev))
        ids_k = torch.where(ok, ids, torch.zeros((), dtype=ids.dtype, device=dev))
        old_k, ref_k, coef_k = keep(old), keep(ref), coef.to(acc)
        # an id outside [0, V) at a valid token: NaN loss and gradients instead of the error a check would raise
        adv_k = torch.where(valid & ~ok, torch.full((), float("nan"), dtype=acc, device=dev), keep(adv))
    need_ent = want_entropy or cfg.entropy_coeff != 0
    if h_k.shape[0] == 0:
        loss = torch.zeros((), dtype=acc, device=dev)
        lp_k = torch.zeros(0, dtype=acc, device=dev)
        ent_k = torch.zeros(0, dtype=acc, device=dev) if need_ent else None
        stats = torch.zeros(N_STATS, dtype=acc, device=dev)
        gh = torch.zeros(0, hidden.shape[1], dtype=acc, device=dev) if needs[0] else None
        gw = torch.zeros_like(weight) if needs[1] else None
        gb = torch.zeros_like(bias, dtype=acc) if needs[2] else None
        gw_inv = None
    elif backend == "triton":
        from srpo_core.kernels.policy_loss import policy_loss_fwd_bwd

        loss = torch.zeros((), dtype=acc, device=dev)
        stats = torch.zeros(N_STATS, dtype=acc, device=dev)
        stats[-1] = h_k.shape[0] if live is None else live.sum()
        d_h = -cfg.entropy_coeff * coef_k if cfg.entropy_coeff != 0 else None

        def token_fn(rows, logp, ent):
            c = coef_k[rows]
            ell, d_lp, st = token_grads(logp, logp if old_k is None else old_k[rows], adv_k[rows],
                                        None if ref_k is None else ref_k[rows], ent, cfg)
            if live is not None:  # as in fused_fwd_bwd: a masked row's terms may overflow, so where, not · 0
                lv = live[rows]
                ell, d_lp, st = (torch.where(lv, ell, 0.0), torch.where(lv, d_lp, 0.0),
                                 torch.where(lv[None, :], st, 0.0))
            loss.add_((ell * c).sum())
            stats[:-1] += st.sum(1)
            return d_lp * c, None if d_h is None else d_h[rows]

        lp_k, ent_k, (gh, gw, gb, gw_inv) = policy_loss_fwd_bwd(
            h_k, weight, bias, ids_k, token_fn, inv_tau=inv_tau, want_entropy=need_ent, needs=needs,
            chunk=triton_chunk(h_k.shape[0], weight.shape[0], weight.element_size()))
    else:
        loss, lp_k, ent_k, stats, gh, gw, gb, gw_inv = fused_fwd_bwd(
            h_k, weight, bias, ids_k, old_k, adv_k, ref_k, coef_k, inv_tau=inv_tau, want_entropy=want_entropy,
            cfg=cfg, needs=needs, valid=live)

    def full(x, width=None):
        if not compact:
            return x
        shape = (n,) if width is None else (n, width)
        return torch.zeros(shape, dtype=x.dtype, device=dev).index_copy_(0, rows, x)

    logp = full(lp_k)
    ent = full(ent_k) if (want_entropy and ent_k is not None) else None
    if live is not None:  # 0 at the rows that are not valid tokens, as the compacted path leaves them
        logp = torch.where(live, logp, 0.0)
        ent = None if ent is None else torch.where(live, ent, 0.0)
    # fp16 gradients are stored times powers of two (fp16_store; grad_weight's per column from one chunk), ``inv``
    # ``[2 + H]`` holding the inverses (grad_hidden's, grad_bias's, grad_weight's per column; 1 elsewhere)
    one = torch.ones((), dtype=torch.float32, device=dev)
    inv = [one, one]
    inv_w = torch.ones(hidden.shape[1], dtype=torch.float32, device=dev) if gw_inv is None else (
        gw_inv.expand(hidden.shape[1]))
    fp16 = hidden.dtype == torch.float16
    if gh is not None:
        gh = full(gh, hidden.shape[1])
        gh, inv[0] = fp16_store(gh) if fp16 else (gh.to(hidden.dtype), one)
    if gb is not None:
        gb, inv[1] = fp16_store(gb) if fp16 else (gb.to(bias.dtype), one)
    return loss, logp, ent, stats, gh, gw, gb, torch.cat([torch.stack(inv), inv_w])


@torch.library.custom_op("srpo_core::linear_policy_loss", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
        old_logp: torch.Tensor | None, advantages: torch.Tensor, ref_logp: torch.Tensor | None, coef: torch.Tensor,
        valid: torch.Tensor, inv_tau: float, epsilon_low: float, epsilon_high: float, clip_ratio_c: float | None,
        beta: float, kl_kind: str, entropy_coeff: float, want_entropy: bool, need_h: bool, need_w: bool,
        need_b: bool, backend: str, kl_ratio_correction: bool, check_ids: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                   torch.Tensor]:
    """→ ``(loss, logp, entropy or [0], stats [N_STATS], grad_hidden or [0], grad_weight or [0], grad_bias or [0],
    inv [2 + H])``: the stored grad_hidden times ``inv[0]``, grad_bias times ``inv[1]`` and grad_weight times
    ``inv[2:]`` (per column) are the gradients (fp32; powers of two for fp16, else 1)."""
    cfg = LossConfig(epsilon_low, epsilon_high, clip_ratio_c, beta, kl_kind, entropy_coeff, kl_ratio_correction)
    dev = hidden.device.type
    # the public function has cast the inputs as F.linear would; every GEMM in here keeps the dtypes chosen there
    off = dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)
    with torch.autocast(device_type=dev, enabled=False) if off else contextlib.nullcontext():
        loss, logp, ent, stats, gh, gw, gb, inv = _flat(hidden, weight, bias, ids, old_logp, advantages, ref_logp, coef,
                                                   valid, inv_tau, want_entropy, cfg, (need_h, need_w, need_b),
                                                   backend, check_ids)

    def e():  # a fresh empty tensor per absent output (custom-op outputs must not alias each other)
        return hidden.new_empty(0)

    return (loss, logp, ent if ent is not None else logp.new_empty(0), stats, gh if gh is not None else e(),
            gw if gw is not None else e(), gb if gb is not None else e(), inv)


@_op.register_fake
def _(hidden, weight, bias, ids, old_logp, advantages, ref_logp, coef, valid, inv_tau, epsilon_low, epsilon_high,
      clip_ratio_c, beta, kl_kind, entropy_coeff, want_entropy, need_h, need_w, need_b, backend, kl_ratio_correction,
      check_ids):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(n, dtype=acc),
            hidden.new_empty(n if want_entropy else 0, dtype=acc), hidden.new_empty(N_STATS, dtype=acc),
            torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else hidden.new_empty(0),
            hidden.new_empty(2 + hidden.shape[1], dtype=torch.float32))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the outputs other than the loss get no gradient: no [V, H] zeros for them
    ctx.need = inputs[17:20]
    ctx.check_ids = inputs[22]
    ctx.fp16 = inputs[0].dtype == torch.float16  # the stored gradients carry the scales output[7] (fp16_store)
    # The stored gradients are outputs of this node: non-differentiable, they carry no grad_fn, so holding them on
    # ctx makes no reference cycle (a forward without backward would otherwise keep its [V, H] gradient alive).
    ctx.mark_non_differentiable(*output[1:])
    if torch.compiler.is_compiling():
        ctx.save_for_backward(*output[4:])
        ctx.grads = None
    else:  # eager: held by ctx alone, so backward hands them over and AccumulateGrad takes them without a copy
        ctx.grads = list(output[4:])


def _backward(ctx, g_loss, *_):
    """The stored gradients times the upstream scalar, scaled in place: neither a ``gw * g`` copy nor AccumulateGrad's
    copy of a tensor still referenced elsewhere doubles the peak by a ``[V, H]`` gradient. In eager mode the
    gradients are handed over once; a second backward through the same graph (``retain_graph=True``) raises."""
    if ctx.grads is None:
        gh, gw, gb, inv = ctx.saved_tensors
    else:
        if not ctx.grads:
            raise RuntimeError("linear_policy_loss: backward ran twice through the same graph; its gradients are "
                               "computed in the forward and handed over once (retain_graph is not supported)")
        gh, gw, gb, inv = ctx.grads
        ctx.grads = []
    need_h, need_w, need_b = ctx.need
    # ``loss.backward()`` seeds 1: skip the [V, H] pass then (asked only of a CPU scalar in eager mode: no device sync;
    # not asked at all with check_ids=False, which reads no value on the host)
    # (a seed that requires grad, create_graph=True, must stay in the graph)
    one = (not ctx.fp16 and ctx.check_ids and g_loss.device.type == "cpu" and not g_loss.requires_grad
           and not torch.compiler.is_compiling() and bool(g_loss == 1))

    def scaled(g, inv_g):
        # the seed itself, not rounded to g's dtype: a bf16 1/3 is 0.334, an fp16 65536 (DeepSpeed's initial loss
        # scale) is inf; fp16: seed × the stored gradient's scale, in fp32, then one rounding to fp16. mul_fp32_, not
        # g.mul_: CUDA casts a 0-dim device factor to g's dtype before multiplying
        if one:
            return g
        return mul_fp32_(g, g_loss * inv_g if ctx.fp16 else g_loss)

    return (scaled(gh, inv[0]) if need_h else None, scaled(gw, inv[2:]) if need_w else None,
            scaled(gb, inv[1]) if need_b else None) + (None,) * 20


_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------------------------
# validation and the public function


def _number(name, x, *, low=None, low_open=False, allow_none=False):
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise TypeError(f"{OP}: `{name}` must be a finite float, got {describe(x)}")
    if low is not None and (x <= low if low_open else x < low):
        raise ValueError(f"{OP}: `{name}` must be {'>' if low_open else '>='} {low}, got {x!r}")


def _layout(hidden, ids, old_logp, advantages, ref_logp, mask, cu_seqlens, check_ids=True):
    """→ flat ``(hidden [N, H], ids, old, adv, ref [N], valid [N], seq [N], B, T or None, out_shape)``."""
    if (mask is None) == (cu_seqlens is None):
        raise ValueError(f"{OP}: give exactly one of `mask` (padded layout, hidden [B, T, H]) and `cu_seqlens` "
                         f"(packed layout, hidden [N, H]); got mask={describe(mask)}, "
                         f"cu_seqlens={describe(cu_seqlens)}")
    dev = hidden.device
    if mask is not None:
        if hidden.dim() != 3:
            raise ValueError(f"{OP}: with `mask`, `hidden` must be [B, T, H], got {describe(hidden)}")
        b, t = hidden.shape[:2]
        require_tensor(OP, "mask", mask, kind="bool", ndim=2)
        tok = (b, t)
        seq = torch.arange(b, device=dev).repeat_interleave(t)
        valid = mask.reshape(-1)
    else:
        if hidden.dim() != 2:
            raise ValueError(f"{OP}: with `cu_seqlens`, `hidden` must be [N, H], got {describe(hidden)}")
        n = hidden.shape[0]
        if check_ids and not torch.compiler.is_compiling():
            check_cu_seqlens(OP, cu_seqlens, n)
        else:
            require_tensor(OP, "cu_seqlens", cu_seqlens, kind="int", ndim=1)
        b, t = cu_seqlens.numel() - 1, None
        tok = (n,)
        seq = torch.repeat_interleave(torch.arange(b, device=dev), (cu_seqlens[1:] - cu_seqlens[:-1]).to(dev),
                                      output_size=n)
        valid = torch.ones(n, dtype=torch.bool, device=dev)
    named = (("mask", mask), ("ids", ids), ("old_logp", old_logp), ("ref_logp", ref_logp))
    for name, x in named:
        if x is None:
            continue
        require_tensor(OP, name, x, kind="int" if name == "ids" else ("bool" if name == "mask" else "float"))
        if tuple(x.shape) != tok:
            raise ValueError(f"{OP}: `{name}` must have shape {list(tok)} (one value per token), got {describe(x)}")
    require_tensor(OP, "advantages", advantages, kind="float")
    if tuple(advantages.shape) == tok:
        adv = advantages.reshape(-1)
    elif tuple(advantages.shape) == (b,):
        adv = advantages.to(dev)[seq]
    else:
        raise ValueError(f"{OP}: `advantages` must be per token {list(tok)} or per sequence [{b}], got "
                         f"{describe(advantages)}")
    for name, x in (("mask", mask), ("ids", ids), ("old_logp", old_logp), ("advantages", advantages),
                    ("ref_logp", ref_logp), ("cu_seqlens", cu_seqlens)):
        if x is not None and x.device != dev:
            raise ValueError(f"{OP}: `{name}` must be on {dev} like `hidden`, got {describe(x)}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    ref = None if ref_logp is None else ref_logp.reshape(-1)
    old = None if old_logp is None else old_logp.reshape(-1)
    return flat, ids.reshape(-1), old, adv, ref, valid, seq, b, t, tok


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    clip_ratio_c: float | None = None,
    beta: float = 0.0,
    kl_kind: str = "k3",
    kl_ratio_correction: bool = False,
    entropy_coeff: float = 0.0,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    global_batch_size: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    check_ids: bool = True,
) -> PolicyLossOutput:
    """Clipped policy-gradient loss ``L = agg_t(pg_t + β·KL_t − entropy_coeff·H_t)`` of ``softmax((h·Wᵀ + b)/τ)``.

    Args:
        hidden: ``[B, T, H]`` (padded, with ``mask``) or ``[N, H]`` (packed, with ``cu_seqlens [B+1]``).
        weight: ``[V, H]`` LM head (same dtype/device); ``bias``: optional ``[V]``.
        ids: sampled tokens ``[B, T]`` / ``[N]``; a token whose id is ``ignore_index`` is ignored like a masked one.
        old_logp: ``[B, T]`` / ``[N]`` behaviour-policy log-probs (``π_old``); None: on-policy (``π_old = π``
            detached, ratio 1: TRL's ``num_iterations = 1`` case).
        advantages: per token ``[B, T]`` / ``[N]`` (SRPO's ``out.advantages``) or per sequence ``[B]``.
        mask: ``bool [B, T]``, the response tokens that enter the loss.
        ref_logp: optional reference log-probs (same shape as ``ids``) for the KL term and the ``kl`` metric.
        epsilon_low, epsilon_high: PPO clip range ``[1 − ε_low, 1 + ε_high]`` (``epsilon_high`` None: = ε_low).
        clip_ratio_c: dual-clip constant ``c > 1`` (verl's name; its default there is 3.0), None: off.
        beta, kl_kind: KL coefficient and estimator, ``"k1" | "k2" | "k3" | "low_var_kl"``; kl_ratio_correction:
            weight the KL term by the ratio ``r_t`` (TRL's ``use_bias_correction_kl``).
        entropy_coeff: entropy bonus coefficient (subtracted).
        loss_agg_mode: verl's names and arithmetic (verl 0.9.1's ``agg_loss``), see :func:`aggregation_coef`;
            ``"seq-mean-token-sum-norm"`` also divides by ``loss_scale_factor`` (default ``T`` in the padded layout,
            verl's default; required in the packed one).
        global_batch_size: what the sequence means divide by (default: the sequences with a valid token, as verl
            without a ``global_batch_size``; TRL's sequence means count every row: pass ``B``).
        temperature: ``τ > 0``; return_entropy: also return the per-token entropy.
        check_ids: check the values of the inputs (the default): ``ids`` in ``[0, V)`` at valid tokens, ``old_logp``,
            ``advantages``, ``ref_logp`` finite there, ``cu_seqlens`` a valid partition of ``N``, and drop the rows
            that are not valid tokens before any work. Each reads values on the host (a device sync). ``False``, as in
            the log-prob ops, reads no value on the host in the forward or the backward (the step can be captured in
            a CUDA graph): nothing of the above is checked, every row is computed (the others with zeroed inputs, and
            masked out), an id outside ``[0, V)`` at a valid token gives a NaN loss and NaN gradients, a non-finite
            input at a valid token gives non-finite results, and a bad ``cu_seqlens`` an unspecified result.

    Under ``torch.autocast`` the op follows ``F.linear``: floating inputs other than float64 are cast to the autocast
    dtype (the gradients reach the original parameters through the casts) and the logits are computed in it.

    Returns:
        :class:`PolicyLossOutput` ``(loss, logp, entropy, metrics)``.
    """
    if isinstance(hidden, torch.Tensor):
        cast = autocast_dtype(hidden.device)
        if cast is not None:  # like F.linear under autocast: floating inputs other than float64, to its dtype
            hidden, weight, bias = (x.to(cast) if isinstance(x, torch.Tensor) and x.is_floating_point()
                                    and x.dtype != torch.float64 else x for x in (hidden, weight, bias))
    require_tensor(OP, "hidden", hidden, kind="float", ndim=(2, 3))
    require_tensor(OP, "weight", weight, kind="float", ndim=2)
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{OP}: `weight` must be [V >= 1, H = {hidden.shape[-1]}] (H the last size of `hidden`), "
                         f"got {describe(weight)}")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and (x.dtype != hidden.dtype or x.device != hidden.device):
            raise TypeError(f"{OP}: `{name}` must be {hidden.dtype} on {hidden.device} like `hidden`, "
                            f"got {describe(x)}")
    if bias is not None:
        require_tensor(OP, "bias", bias, kind="float", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{OP}: `bias` must be [V] = [{weight.shape[0]}], got {describe(bias)}")
    if epsilon_high is None:
        epsilon_high = epsilon_low
    _number("epsilon_low", epsilon_low, low=0)
    _number("epsilon_high", epsilon_high, low=0)
    _number("clip_ratio_c", clip_ratio_c, low=1, low_open=True, allow_none=True)
    _number("beta", beta)
    _number("entropy_coeff", entropy_coeff)
    _number("temperature", temperature, low=0, low_open=True)
    _number("loss_scale_factor", loss_scale_factor, low=0, low_open=True, allow_none=True)
    _number("global_batch_size", global_batch_size, low=0, low_open=True, allow_none=True)
    if kl_kind not in KL_KINDS:
        raise ValueError(f"{OP}: `kl_kind` must be one of {KL_KINDS}, got {kl_kind!r}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"{OP}: `loss_agg_mode` must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    for name, flag in (("return_entropy", return_entropy), ("check_ids", check_ids)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: `{name}` must be a bool, got {describe(flag)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: `ignore_index` must be an int, got {describe(ignore_index)}")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"{OP}: `beta` = {beta} needs `ref_logp` (the reference policy's log-probs)")
    flat, ids_f, old, adv, ref, valid, seq, b, t, tok = _layout(hidden, ids, old_logp, advantages, ref_logp, mask,
                                                                cu_seqlens, check_ids)
    if loss_agg_mode == "seq-mean-token-sum-norm" and loss_scale_factor is None:
        if t is None:
            raise ValueError(f"{OP}: loss_agg_mode='seq-mean-token-sum-norm' in the packed layout needs "
                             f"`loss_scale_factor` (the constant normaliser, e.g. the max response length)")
        loss_scale_factor = float(t)
    valid = valid & (ids_f != ignore_index)
    v = weight.shape[0]
    if check_ids and not torch.compiler.is_compiling() and valid.any():
        bad = valid & ((ids_f < 0) | (ids_f >= v))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"{OP}: `ids` must lie in [0, V) = [0, {v}) or equal ignore_index={ignore_index} at "
                             f"every valid token, got flat ids[{i}] = {int(ids_f[i])} ({int(bad.sum())} such)")
        for name, x in (("old_logp", old), ("advantages", adv), ("ref_logp", ref)):
            if x is not None and bool((valid & ~torch.isfinite(x)).any()):
                i = int(torch.nonzero(valid & ~torch.isfinite(x))[0, 0])
                raise ValueError(f"{OP}: `{name}` must be finite at every valid token, got {float(x[i])} at flat "
                                 f"token {i}")
    chosen = _dispatch.pick_backend(backend, hidden.device, op=OP, dtypes={"hidden": hidden.dtype})
    coef = aggregation_coef(valid, seq, b, loss_agg_mode, loss_scale_factor, global_batch_size)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    need_b = bias is not None and grad_on and bias.requires_grad
    loss, logp, ent, stats, *_ = _op(flat, weight, bias, ids_f, old, adv, ref, coef, valid, 1.0 / float(temperature),
                                     float(epsilon_low), float(epsilon_high),
                                     None if clip_ratio_c is None else float(clip_ratio_c), float(beta), kl_kind,
                                     float(entropy_coeff), return_entropy, need_h, need_w, need_b, chosen,
                                     bool(kl_ratio_correction), check_ids)
    s = stats.detach()
    n = s[6].clamp(min=1)
    metrics = {"clip_fraction": s[0] / n, "dual_clip_fraction": s[1] / n, "ratio_mean": s[2] / n,
               "approx_kl": s[3] / n}
    if ref_logp is not None:
        metrics["kl"] = s[4] / n
    if return_entropy or entropy_coeff != 0:
        metrics["entropy"] = s[5] / n
    entropy = ent.detach().reshape(tok) if return_entropy else None
    return PolicyLossOutput(loss, logp.detach().reshape(tok), entropy, metrics)


__all__ = ["LOSS_AGG_MODES", "PolicyLossOutput", "aggregation_coef", "linear_policy_loss"]
