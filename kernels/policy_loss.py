"""Triton path of ``linear_policy_loss``: the three-GEMM schedule, with library GEMMs and ``token_logprobs``' fused
row kernels.

``L = Σ_t coef_t·ℓ_t(logp_t, H_t)`` needs, per token, only ``logp_t`` and ``H_t``, so ``∂L/∂logits`` of a token is
known as soon as its row is. Per chunk of ``k`` tokens the launcher here

1. writes the logits tile ``x = h @ Wᵀ + b`` (``[k, V]``, the input dtype, a library GEMM: GEMM 1),
2. runs ``token_logprobs_fwd_kernel`` on it (one read: ``logp``, ``H``, the row max and log-sum),
3. hands ``logp`` and ``H`` to the per-token loss terms (``srpo_core.common.policy_loss.chunk_terms``, shared with
   the CPU path), which add the chunk's loss and metrics and return ``∂L/∂logp`` (``∂L/∂H = −entropy_coeff·coef``),
4. runs ``token_logprobs_bwd_kernel`` in place: the tile becomes ``G = ∂L/∂logits`` (one read, one write),
5. ``grad_hidden[chunk] = G @ W`` (GEMM 2) and ``grad_weight += Gᵀ @ h`` (GEMM 3), ``grad_bias += Σ_t G``.

So forward + backward is the three GEMMs plus three passes over a ``[k, V]`` tile in HBM; nothing is recomputed.
The GEMMs are torch's, so in fp32 they follow torch's matmul precision setting (TF32 where the user allows it, as
``F.linear`` does), unlike the fused linear kernels, which pin IEEE fp32.
The chunk size is the caller's (``chunk``). bf16/fp16 over several chunks sum their ``grad_weight`` GEMMs in an
fp32 ``[V, H]`` buffer, as the CPU path does. fp16 scales each chunk's upstream gradients by a power of two ``S`` (so
the tile holds ``S·G``, clear of fp16's subnormals) and GEMM 3's ``h`` by ``R`` (one per hidden column), and unscales
both GEMMs' results in
fp32 (``srpo_core.common.policy_loss.fp16_scales``, computed on the device). Every launch runs inside
``device_guard(hidden)``. Int64 offsets, masks and the ``inf·0`` guards are those of ``token_logprobs``' kernels,
which this module does not modify.
"""

from __future__ import annotations

import torch

from srpo_core._dispatch import device_guard, empty
from srpo_core.common.policy_loss import (
    N_STATS,
    LossConfig,
    add_grad_weight,
    chunk_terms,
    fp16_scales,
    fp16_store,
    mul_fp32,
)
from srpo_core.kernels.token_logprobs import token_logprobs_bwd, token_logprobs_fwd

LOW_PRECISION_BYTES = 2
NO_ID = -1  # the caller compacts: every id is in [0, V), so the kernels' ignore_index matches none


def policy_loss_fwd_bwd(hidden, weight, bias, ids, old, adv, ref, coef, *, inv_tau: float, want_entropy: bool,
                        cfg: LossConfig, needs: tuple[bool, bool, bool], chunk: int, valid=None):
    """``hidden [n, H]``, ``weight [V, H]``, ``bias [V] | None`` (one dtype: fp32/bf16/fp16), ``ids [n]`` (each in
    ``[0, V)``), ``old [n] | None`` (None: on-policy), ``adv``, ``coef [n]``, ``ref [n] | None`` (fp32), and, on the
    sync-free path, ``valid [n]`` bool (the other rows are computed and masked out) → ``(loss [], logp [n],
    entropy [n] | None, stats [N_STATS], grad_hidden | None, grad_weight | None, grad_bias | None, gw_inv | None)``,
    as ``srpo_core.cpu.policy_loss.fused_fwd_bwd`` (fp16: ``grad_weight`` scaled, ``gw_inv``, 0-dim or one factor
    per column ``[H]``, times it the gradient). ``chunk``: tokens per tile (the caller's choice)."""
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    assert ids.shape == hidden.shape[:1] and chunk >= 1
    n = hidden.shape[0]
    dev = hidden.device
    f32 = torch.float32
    need_ent = want_entropy or cfg.entropy_coeff != 0
    loss = torch.zeros((), dtype=f32, device=dev)
    stats = torch.zeros(N_STATS, dtype=f32, device=dev)
    stats[-1] = n if valid is None else valid.sum()
    d_h = -cfg.entropy_coeff * coef if cfg.entropy_coeff != 0 else None

    def terms(rows, lp, h_t):  # the per-token loss of these rows: (∂L/∂logp, ∂L/∂H | None)
        d_lp = chunk_terms(lp, h_t, None if old is None else old[rows], adv[rows], None if ref is None else ref[rows],
                           coef[rows], None if valid is None else valid[rows], cfg, loss, stats)
        return d_lp, None if d_h is None else d_h[rows]

    logp, ent, grads = _chunks(hidden, weight, bias, ids, terms, inv_tau=inv_tau, need_ent=need_ent, needs=needs,
                               k_max=min(n, chunk))
    return (loss, logp, ent, stats, *grads)


def _chunks(hidden, weight, bias, ids, terms, *, inv_tau: float, need_ent: bool, needs: tuple[bool, bool, bool],
            k_max: int):
    """The chunk loop → ``(logp, H | None, (grad_hidden, grad_weight, grad_bias, gw_inv))``; ``terms(rows, logp, H)``
    gives each chunk's ``(∂L/∂logp, ∂L/∂H | None)``."""
    with device_guard(hidden):
        n, hd = hidden.shape
        v = weight.shape[0]
        dev = hidden.device
        f32 = torch.float32
        need_h, need_w, need_b = needs
        low = hidden.element_size() == LOW_PRECISION_BYTES
        scaled = hidden.dtype == torch.float16 and any(needs)
        tile = empty((k_max * v,), dtype=hidden.dtype, device=dev)
        logp = empty((n,), dtype=f32, device=dev)
        ent = empty((n,), dtype=f32, device=dev) if need_ent else None
        gh = empty((n, hd), dtype=f32, device=dev) if need_h else None
        gw = empty(tuple(weight.shape), dtype=weight.dtype, device=dev) if need_w else None
        gw_acc = empty((v, hd), dtype=f32, device=dev) if (need_w and low and k_max < n) else None
        inv_w = None
        gb = bias.new_zeros(v, dtype=f32) if need_b else None
        w_absmax = weight.abs().amax().float() if scaled else None
        for n0 in range(0, n, k_max):
            rows = slice(n0, min(n, n0 + k_max))
            h = hidden[rows]
            k = h.shape[0]
            x = tile[: k * v].view(k, v)
            if bias is None:
                torch.mm(h, weight.T, out=x)
            else:
                torch.addmm(bias, h, weight.T, out=x)
            lp, h_t, row_max, row_logsum = token_logprobs_fwd(x, ids[rows], temperature=1.0 / inv_tau,
                                                              ignore_index=NO_ID, return_entropy=need_ent)
            logp[rows] = lp
            if need_ent:
                ent[rows] = h_t
            d_logp, d_ent = terms(rows, lp, h_t)
            if not any(needs):
                continue
            inv_s = inv_w = None
            if scaled:  # the kernel is linear in the upstream gradients: it writes S·G
                s16, r16 = fp16_scales(d_logp, d_ent, h_t, inv_tau, w_absmax, h)
                d_logp, d_ent = d_logp * s16, None if d_ent is None else d_ent * s16
                inv_s, inv_w = 1.0 / s16, 1.0 / (s16 * r16)
                h = mul_fp32(h, r16)  # in fp32: CUDA rounds a 0-dim device factor to fp16 first
            g = token_logprobs_bwd(d_logp, d_ent, x, ids[rows], row_max, row_logsum, h_t, temperature=1.0 / inv_tau,
                                   ignore_index=NO_ID, inplace=True)
            if need_b:
                gb += g.sum(0, dtype=f32) if inv_s is None else g.sum(0, dtype=f32).mul_(inv_s)
            if need_h:
                if low:
                    gh[rows] = torch.mm(g, weight)
                    if inv_s is not None:
                        gh[rows].mul_(inv_s)
                else:
                    torch.mm(g, weight, out=gh[rows])
            if need_w:
                add_grad_weight(gw, gw_acc, g, h, first=n0 == 0, inv=inv_w)
        gw_inv = inv_w if (scaled and need_w) else None  # one fp16 chunk: gw[:, j] holds (S·R_j)·grad[:, j]
        if gw_acc is not None:
            if scaled:
                gw, gw_inv = fp16_store(gw_acc, out=gw)
            else:
                gw.copy_(gw_acc)
        return logp, ent, (gh, gw, gb, gw_inv)
