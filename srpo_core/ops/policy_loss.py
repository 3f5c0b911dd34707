"""Public ``linear_policy_loss``: the clipped policy-gradient token loss of a GRPO/PPO step straight from hidden states,
with the gradients w.r.t. ``hidden``, ``weight`` and ``bias`` formed during the forward, never materialising
``[N, V]``.

The math is ``srpo_core.reference.policy_loss`` (``L = Σ_t coef_t·ℓ_t``, ``coef`` from ``loss_agg_mode``); the loss
options are one :class:`srpo_core.config.PolicyLossConfig`. This module validates once, picks the backend once
(``backend="auto" | "triton" | "torch" | "reference"``; auto = Triton for CUDA tensors, torch otherwise) and calls
one path:

- **reference** (``srpo_core.reference.policy_loss``): the materialised ``[N, V]`` logits, gradients by autograd.
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
import dataclasses
from typing import NamedTuple

import torch

from srpo_core import _dispatch
from srpo_core._validate import AUTOCAST_DEVICES, autocast_dtype, check_cu_seqlens, describe, require_tensor
from srpo_core.common.policy_loss import N_STATS, LossConfig, fp16_store, mul_fp32_
from srpo_core.config import LOSS_AGG_MODES, PolicyLossConfig
from srpo_core.cpu.policy_loss import fused_fwd_bwd
from srpo_core.reference import policy_loss as reference
from srpo_core.tuning import TUNING

OP = "linear_policy_loss"


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




def triton_chunk(n: int, v: int, itemsize: int) -> int:
    """Tokens per chunk of the Triton path: as many as a ``TUNING.policy_loss_triton_tile_bytes`` tile holds, a
    multiple of 128 when over 128 (the GEMMs' tile), at least 1."""
    k = max(1, TUNING.policy_loss_triton_tile_bytes // max(1, v * itemsize))
    return min(n, k if k < 128 else k - k % 128)


def _take_rows(rows, hidden, ids, old, adv, ref, coef):
    """The valid tokens' rows (``rows`` their indices; None: every row is one) → ``(hidden, ids, old, adv, ref,
    coef)``, the float inputs in the accumulation dtype."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def take(x, dtype=None):
        if x is None:
            return None
        x = x[rows] if rows is not None else x
        return x.to(dtype) if dtype is not None else x

    return take(hidden), take(ids), take(old, acc), take(adv, acc), take(ref, acc), take(coef, acc)


def _mask_rows(valid, hidden, weight, ids, old, adv, ref, coef):
    """Sync-free: every row is computed; the others' inputs are zeroed (finite) and their terms masked out →
    ``(hidden, ids, old, adv, ref, coef)``."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    ok = valid & (ids >= 0) & (ids < weight.shape[0])
    zero = torch.zeros((), dtype=acc, device=dev)

    def keep(x):
        return None if x is None else torch.where(valid, x.to(acc), zero)

    h_k = torch.where(valid[:, None], hidden, torch.zeros((), dtype=hidden.dtype, device=dev))
    ids_k = torch.where(ok, ids, torch.zeros((), dtype=ids.dtype, device=dev))
    # an id outside [0, V) at a valid token: NaN loss and gradients instead of the error a check would raise
    adv_k = torch.where(valid & ~ok, torch.full((), float("nan"), dtype=acc, device=dev), keep(adv))
    return h_k, ids_k, keep(old), adv_k, keep(ref), coef.to(acc)


def _no_rows(hidden, weight, bias, need_ent: bool, needs):
    """The result of a path on zero rows: ``(loss 0, logp [0], entropy [0] | None, stats 0, grads | None, None)``."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    return (torch.zeros((), dtype=acc, device=dev), torch.zeros(0, dtype=acc, device=dev),
            torch.zeros(0, dtype=acc, device=dev) if need_ent else None, torch.zeros(N_STATS, dtype=acc, device=dev),
            torch.zeros(0, hidden.shape[1], dtype=acc, device=dev) if needs[0] else None,
            torch.zeros_like(weight) if needs[1] else None, torch.zeros_like(bias, dtype=acc) if needs[2] else None,
            None)


def _rows_out(n: int, rows, live, logp, ent, gh, gb, gw_inv, hidden, bias):
    """A path's per-row results back on all ``n`` rows (0 at the rows that are not valid tokens), and the stored
    gradients: fp16 ones times powers of two (``fp16_store``; grad_weight's per column from one chunk), ``inv [2 + H]``
    holding the inverses (grad_hidden's, grad_bias's, grad_weight's per column; 1 elsewhere)."""
    dev = hidden.device

    def full(x, width=None):
        if rows is None:
            return x
        shape = (n,) if width is None else (n, width)
        return torch.zeros(shape, dtype=x.dtype, device=dev).index_copy_(0, rows, x)

    logp = full(logp)
    ent = None if ent is None else full(ent)
    if live is not None:  # 0 at the rows that are not valid tokens, as the compacted path leaves them
        logp = torch.where(live, logp, 0.0)
        ent = None if ent is None else torch.where(live, ent, 0.0)
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
    return logp, ent, gh, gb, torch.cat([torch.stack(inv), inv_w])


def _flat(hidden, weight, bias, ids, old, adv, ref, coef, valid, inv_tau, want_entropy, cfg, needs, backend,
          check_ids=True):
    """The fast paths on flat rows: the rows that are not valid tokens dropped (or masked), one path run, the results
    put back. → ``(loss, logp, entropy | None, stats, grad_hidden, grad_weight, grad_bias, inv)`` (see ``_op``)."""
    if check_ids:  # drop the rows that are not valid tokens (a host read: how many there are)
        rows, live = (None if bool(valid.all()) else torch.nonzero(valid)[:, 0]), None
        h_k, ids_k, old_k, adv_k, ref_k, coef_k = _take_rows(rows, hidden, ids, old, adv, ref, coef)
    else:
        rows, live = None, valid
        h_k, ids_k, old_k, adv_k, ref_k, coef_k = _mask_rows(valid, hidden, weight, ids, old, adv, ref, coef)
    need_ent = want_entropy or cfg.entropy_coeff != 0
    if h_k.shape[0] == 0:
        res = _no_rows(hidden, weight, bias, need_ent, needs)
    elif backend == "triton":
        from srpo_core.kernels.policy_loss import policy_loss_fwd_bwd

        res = policy_loss_fwd_bwd(h_k, weight, bias, ids_k, old_k, adv_k, ref_k, coef_k, inv_tau=inv_tau,
                                  want_entropy=need_ent, cfg=cfg, needs=needs,
                                  chunk=triton_chunk(h_k.shape[0], weight.shape[0], weight.element_size()), valid=live)
    else:
        res = fused_fwd_bwd(h_k, weight, bias, ids_k, old_k, adv_k, ref_k, coef_k, inv_tau=inv_tau,
                            want_entropy=want_entropy, cfg=cfg, needs=needs, valid=live)
    loss, lp_k, ent_k, stats, gh, gw, gb, gw_inv = res
    logp, ent, gh, gb, inv = _rows_out(hidden.shape[0], rows, live, lp_k, ent_k if want_entropy else None, gh, gb,
                                       gw_inv, hidden, bias)
    return loss, logp, ent, stats, gh, gw, gb, inv


@torch.library.custom_op("srpo_core::linear_policy_loss", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
        old_logp: torch.Tensor | None, advantages: torch.Tensor, ref_logp: torch.Tensor | None, coef: torch.Tensor,
        valid: torch.Tensor, inv_tau: float, epsilon_low: float, epsilon_high: float, clip_ratio_c: float | None,
        beta: float, kl_kind: str, entropy_coeff: float, kl_ratio_correction: bool, want_entropy: bool,
        need_h: bool, need_w: bool, need_b: bool, backend: str, check_ids: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                   torch.Tensor]:
    """→ ``(loss, logp, entropy or [0], stats [N_STATS], grad_hidden or [0], grad_weight or [0], grad_bias or [0],
    inv [2 + H])``: the stored grad_hidden times ``inv[0]``, grad_bias times ``inv[1]`` and grad_weight times
    ``inv[2:]`` (per column) are the gradients (fp32; powers of two for fp16, else 1). The scalars are
    ``_op_scalars``' (a flat schema: a dataclass cannot cross ``torch.library``)."""
    cfg = LossConfig(epsilon_low, epsilon_high, clip_ratio_c, beta, kl_kind, entropy_coeff, kl_ratio_correction)
    with _autocast_off(hidden.device):
        loss, logp, ent, stats, gh, gw, gb, inv = _flat(hidden, weight, bias, ids, old_logp, advantages, ref_logp, coef,
                                                   valid, inv_tau, want_entropy, cfg, (need_h, need_w, need_b),
                                                   backend, check_ids)

    def e():  # a fresh empty tensor per absent output (custom-op outputs must not alias each other)
        return hidden.new_empty(0)

    return (loss, logp, ent if ent is not None else logp.new_empty(0), stats, gh if gh is not None else e(),
            gw if gw is not None else e(), gb if gb is not None else e(), inv)


def _op_scalars(config: PolicyLossConfig, inv_tau: float, want_entropy: bool, needs, backend: str,
                check_ids: bool) -> tuple:
    """``_op``'s scalar arguments in its schema's order, unpacked from the config once: ``LossConfig``'s fields
    (``epsilon_high`` None resolved to ``epsilon_low``), then the flags."""
    eps_high = config.epsilon_low if config.epsilon_high is None else config.epsilon_high
    c = config.clip_ratio_c
    return (inv_tau, float(config.epsilon_low), float(eps_high), None if c is None else float(c), float(config.beta),
            config.kl_kind, float(config.entropy_coeff), bool(config.kl_ratio_correction), want_entropy, *needs,
            backend, check_ids)


def _autocast_off(device: torch.device):
    """The public function has cast the inputs as F.linear would; every GEMM below keeps the dtypes chosen there."""
    dev = device.type
    off = dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)
    return torch.autocast(device_type=dev, enabled=False) if off else contextlib.nullcontext()


@_op.register_fake
def _(hidden, weight, bias, ids, old_logp, advantages, ref_logp, coef, valid, inv_tau, epsilon_low, epsilon_high,
      clip_ratio_c, beta, kl_kind, entropy_coeff, kl_ratio_correction, want_entropy, need_h, need_w, need_b, backend,
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
    ctx.need = inputs[18:21]
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


def _check_params(hidden, weight, bias) -> None:
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


def _check_options(config, return_entropy, ignore_index, check_ids, ref_logp, moved) -> None:
    if moved:  # the loss keywords of the previous release moved into the config
        name = next(iter(moved))
        fields = {f.name for f in dataclasses.fields(PolicyLossConfig)}
        if name in fields:
            raise TypeError(f"{OP}: `{name}` is now a field of the loss config: pass "
                            f"config=PolicyLossConfig({name}=...) (from srpo_core import PolicyLossConfig)")
        raise TypeError(f"{OP}() got an unexpected keyword argument {name!r}")
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"{OP}: `config` must be a srpo_core.PolicyLossConfig, got {describe(config)}")
    for name, flag in (("return_entropy", return_entropy), ("check_ids", check_ids)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: `{name}` must be a bool, got {describe(flag)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: `ignore_index` must be an int, got {describe(ignore_index)}")
    if config.beta != 0 and ref_logp is None:
        raise ValueError(f"{OP}: `beta` = {config.beta} needs `ref_logp` (the reference policy's log-probs)")


def _check_values(valid, ids, v: int, ignore_index: int, old, adv, ref) -> None:
    """``ids`` in ``[0, V)`` and the float inputs finite at every valid token (host reads)."""
    bad = valid & ((ids < 0) | (ids >= v))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{OP}: `ids` must lie in [0, V) = [0, {v}) or equal ignore_index={ignore_index} at "
                         f"every valid token, got flat ids[{i}] = {int(ids[i])} ({int(bad.sum())} such)")
    for name, x in (("old_logp", old), ("advantages", adv), ("ref_logp", ref)):
        if x is not None and bool((valid & ~torch.isfinite(x)).any()):
            i = int(torch.nonzero(valid & ~torch.isfinite(x))[0, 0])
            raise ValueError(f"{OP}: `{name}` must be finite at every valid token, got {float(x[i])} at flat "
                             f"token {i}")


def _reference(flat, weight, bias, ids, old, adv, ref, coef, valid, config: PolicyLossConfig, check_ids: bool):
    """``backend="reference"``: the materialised-logits math, gradients by autograd → ``(loss, logp, entropy,
    metrics)``. Without ``check_ids`` an id outside ``[0, V)`` at a valid token gives NaN, as on the fast paths."""
    if not check_ids:
        ok = (ids >= 0) & (ids < weight.shape[0])
        ids = torch.where(ok, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
        adv = torch.where(valid & ~ok, torch.full((), float("nan"), dtype=adv.dtype, device=adv.device), adv)
    eps_high = config.epsilon_low if config.epsilon_high is None else config.epsilon_high
    with _autocast_off(flat.device):
        return reference.linear_policy_loss(
            flat, weight, bias, ids, old, adv, ref, coef, valid, temperature=config.temperature,
            epsilon_low=config.epsilon_low, epsilon_high=eps_high, clip_ratio_c=config.clip_ratio_c, beta=config.beta,
            kl_kind=config.kl_kind, entropy_coeff=config.entropy_coeff, kl_ratio_correction=config.kl_ratio_correction)


def _metrics(stats, has_ref: bool, has_entropy: bool) -> dict:
    s = stats.detach()
    n = s[6].clamp(min=1)
    metrics = {"clip_fraction": s[0] / n, "dual_clip_fraction": s[1] / n, "ratio_mean": s[2] / n,
               "approx_kl": s[3] / n}
    if has_ref:
        metrics["kl"] = s[4] / n
    if has_entropy:
        metrics["entropy"] = s[5] / n
    return metrics


def _pick(backend: str, hidden: torch.Tensor) -> str:
    if backend == "reference":
        return "reference"
    return _dispatch.pick_backend(backend, hidden.device, op=OP, dtypes={"hidden": hidden.dtype})


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
    config: PolicyLossConfig = PolicyLossConfig(),  # noqa: B008 - frozen dataclass, safe as a default
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    check_ids: bool = True,
    **moved,
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
        config: :class:`srpo_core.PolicyLossConfig`, the loss options: clip range ``epsilon_low``/``epsilon_high``,
            dual-clip ``clip_ratio_c``, KL ``beta``/``kl_kind``/``kl_ratio_correction``, ``entropy_coeff``,
            ``loss_agg_mode`` (verl 0.9.1's ``agg_loss``, see :func:`aggregation_coef`) with ``loss_scale_factor``
            (``"seq-mean-token-sum-norm"``: default ``T`` in the padded layout, required in the packed one) and
            ``global_batch_size`` (TRL's sequence means count every row: pass ``B``), ``temperature``.
        return_entropy: also return the per-token entropy.
        backend: ``"auto"`` (Triton for CUDA tensors, else torch), ``"triton"``, ``"torch"`` (the chunked CPU path)
            or ``"reference"`` (the materialised ``[N, V]`` logits, gradients by autograd: for tests).
        check_ids: check the values of the inputs (the default): ``ids`` in ``[0, V)`` at valid tokens, ``old_logp``,
            ``advantages``, ``ref_logp`` finite there, ``cu_seqlens`` a valid partition of ``N``, and drop the rows
            that are not valid tokens before any work. Each reads values on the host (a device sync). ``False``, as in
            the log-prob ops, reads no value on the host in the forward or the backward (the step can be captured in
            a CUDA graph): nothing of the above is checked, every row is computed (the others with zeroed inputs, and
            masked out), an id outside ``[0, V)`` at a valid token gives a NaN loss and NaN gradients, a non-finite
            input at a valid token gives non-finite results, and a bad ``cu_seqlens`` an unspecified result.

    The loss keywords of the previous release (``epsilon_low=``, ``beta=``, ...) raise a TypeError that names the
    config field to set instead.

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
    _check_params(hidden, weight, bias)
    _check_options(config, return_entropy, ignore_index, check_ids, ref_logp, moved)
    flat, ids_f, old, adv, ref, valid, seq, b, t, tok = _layout(hidden, ids, old_logp, advantages, ref_logp, mask,
                                                                cu_seqlens, check_ids)
    scale_factor = config.loss_scale_factor
    if config.loss_agg_mode == "seq-mean-token-sum-norm" and scale_factor is None:
        if t is None:
            raise ValueError(f"{OP}: loss_agg_mode='seq-mean-token-sum-norm' in the packed layout needs "
                             f"`loss_scale_factor` (the constant normaliser, e.g. the max response length)")
        scale_factor = float(t)
    valid = valid & (ids_f != ignore_index)
    if check_ids and not torch.compiler.is_compiling() and valid.any():
        _check_values(valid, ids_f, weight.shape[0], ignore_index, old, adv, ref)
    chosen = _pick(backend, hidden)
    coef = aggregation_coef(valid, seq, b, config.loss_agg_mode, scale_factor, config.global_batch_size)
    want_ent = return_entropy or config.entropy_coeff != 0
    if chosen == "reference":
        loss, logp, ent, m = _reference(flat, weight, bias, ids_f, old, adv, ref, coef, valid, config, check_ids)
        metrics = {k: x for k, x in m.items() if k != "entropy" or want_ent}
    else:
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                 bias is not None and grad_on and bias.requires_grad)
        loss, logp, ent, stats, *_ = _op(flat, weight, bias, ids_f, old, adv, ref, coef, valid,
                                         *_op_scalars(config, 1.0 / float(config.temperature), return_entropy, needs,
                                                      chosen, check_ids))
        metrics = _metrics(stats, ref_logp is not None, want_ent)
    entropy = ent.detach().reshape(tok) if return_entropy else None
    return PolicyLossOutput(loss, logp.detach().reshape(tok), entropy, metrics)


__all__ = ["LOSS_AGG_MODES", "PolicyLossConfig", "PolicyLossOutput", "aggregation_coef", "linear_policy_loss"]
