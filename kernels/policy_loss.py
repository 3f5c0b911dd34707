"""Triton path of ``linear_policy_loss``: the three-GEMM schedule, with library GEMMs and ``token_logprobs``' fused
row kernels.

``L = Σ_t coef_t·ℓ_t(logp_t, H_t)`` needs, per token, only ``logp_t`` and ``H_t``, so ``∂L/∂logits`` of a token is
known as soon as its row is. Per chunk of ``k`` tokens the launcher here

1. writes the logits tile ``x = h @ Wᵀ + b`` (``[k, V]``, the input dtype, a library GEMM: GEMM 1),
2. runs ``token_logprobs_fwd_kernel`` on it (one read: ``logp``, ``H``, the row max and log-sum),
3. hands ``logp`` and ``H`` to ``token_fn`` — the caller's loss math (kernels hold no policy), which returns
   ``(∂L/∂logp, ∂L/∂H | None)`` for those rows,
4. runs ``token_logprobs_bwd_kernel`` in place: the tile becomes ``G = ∂L/∂logits`` (one read, one write),
5. ``grad_hidden[chunk] = G @ W`` (GEMM 2) and ``grad_weight += Gᵀ @ h`` (GEMM 3), ``grad_bias += Σ_t G``.

So forward + backward is the three GEMMs plus three passes over a ``[k, V]`` tile in HBM; nothing is recomputed.
The GEMMs are torch's, so in fp32 they follow torch's matmul precision setting (TF32 where the user allows it, as
``F.linear`` does), unlike the fused linear kernels, which pin IEEE fp32.
The chunk size is the caller's (``chunk``). bf16/fp16 over several chunks sum their ``grad_weight`` GEMMs in an
fp32 ``[V, H]`` buffer, as the CPU path does. fp16 scales each chunk's upstream gradients by a power of two ``S`` (so
the tile holds ``S·G``, clear of fp16's subnormals) and GEMM 3's ``h`` by ``R`` (one per hidden column), and unscales
both GEMMs' results in
fp32 (``srpo_core.cpu.policy_loss.fp16_scales``, computed on the device). Every launch runs inside
``device_guard(hidden)``. Int64 offsets, masks and the ``inf·0`` guards are those of ``token_logprobs``' kernels,
which this module does not modify.
"""

from __future__ import annotations

import torch

from srpo_core._dispatch import device_guard, empty
from srpo_core.cpu.policy_loss import add_grad_weight, fp16_scales, fp16_store, mul_fp32
from srpo_core.kernels.token_logprobs import token_logprobs_bwd, token_logprobs_fwd

LOW_PRECISION_BYTES = 2
NO_ID = -1  # the caller compacts: every id is in [0, V), so the kernels' ignore_index matches none


def policy_loss_fwd_bwd(hidden, weight, bias, ids, token_fn, *, inv_tau: float, want_entropy: bool,
                        needs: tuple[bool, bool, bool], chunk: int):
    """``hidden [n, H]``, ``weight [V, H]``, ``bias [V] | None`` (one dtype: fp32/bf16/fp16), ``ids [n]`` (each in
    ``[0, V)``) → ``(logp [n] fp32, H [n] fp32 | None, (grad_hidden fp32 | None, grad_weight | None,
    grad_bias fp32 | None, gw_inv | None))`` (fp16: ``grad_weight`` scaled, ``gw_inv``, 0-dim or one factor per
    column ``[H]``, times it the gradient),
    gradients of the loss whose per-token derivatives ``token_fn`` gives.

    ``token_fn(rows: slice, logp [k], H [k] | None) -> (∂L/∂logp [k], ∂L/∂H [k] | None)``; the caller accumulates
    its loss and metrics there, chunk by chunk."""
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    assert ids.shape == hidden.shape[:1] and chunk >= 1
    n, hd = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    need_h, need_w, need_b = needs
    k_max = min(n, chunk)
    low = hidden.element_size() == LOW_PRECISION_BYTES
    scaled = hidden.dtype == torch.float16 and any(needs)
    with device_guard(hidden):
        tile = empty((k_max * v,), dtype=hidden.dtype, device=dev)
        logp = empty((n,), dtype=f32, device=dev)
        ent = empty((n,), dtype=f32, device=dev) if want_entropy else None
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
                                                              ignore_index=NO_ID, return_entropy=want_entropy)
            logp[rows] = lp
            if want_entropy:
                ent[rows] = h_t
            d_logp, d_ent = token_fn(rows, lp, h_t)
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
