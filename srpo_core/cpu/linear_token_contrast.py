"""The torch path of ``linear_token_contrast`` (the default off-GPU): vocabulary-tiled passes over both conditions'
logits that never hold more than a few ``[token_chunk, vocab_tile]`` tiles, with the tiling of
``linear_token_logprobs`` (:func:`srpo_core.cpu.linear_token_logprobs.tile_sizes`, forward tiles) and its tile GEMM
(:func:`~srpo_core.cpu.linear_token_logprobs._tile_logits_shifted`: the GEMM starts from ``−c``, base-2 units).

Per row and condition the pass keeps ``(c, s)`` with ``s = Σ 2^(u₂ − c)`` (``u₂ = u·log₂e``, ``u = x/τ``), rebased
after every tile to ``c = log₂ Σ 2^u₂`` (the running log-sum-exp), ``s = 1``, exactly as ``linear_token_logprobs``.

- ``kl``, one pass: with ``a = u₂ − c`` and ``b = u₂' − c'`` (each condition shifted by its own running
  log-sum-exp, so ``a − b`` carries no large constant when ``x' ≈ x + const``), ``t = Σ 2^a (a − b)`` is kept
  alongside; rebasing ``c += log₂ s``, ``c' += log₂ s'`` turns it into ``t/s + log₂ s' − log₂ s``, and after the
  last tile ``KL = ln 2 · t``.
- ``js`` over a vocabulary shard (vocab-parallel), two passes: pass 1 is the same walk without ``t`` (the two
  log-sum-exps, combined over the shards); pass 2 recomputes each tile shifted by them, so it holds ``log₂ p`` and
  ``log₂ p'``, and sums ``½ p (log₂ p − log₂ m) + ½ p' (log₂ p' − log₂ m)`` with ``log₂ m = log₂(p + p') − 1``.
- ``js`` unsharded (:func:`js_rows`, D214): row chunks of both logit sets over the whole vocabulary (at most
  ``TUNING.linear_contrast_js_chunk_elements`` each), each through ``token_contrast``'s torch path: one GEMM per
  condition, not two.

The first tile of each row is shifted by its own maximum (one extra pass over that tile only), so no later tile can
underflow the whole row. A row whose tile sums are not finite (a logit more than ~127 bits above the running
log-sum-exp, ``−inf`` logits from a ``−inf`` bias entry, a NaN/inf input) leaves the fast path: at the end its logits
are materialised in row chunks and its values computed in float64 with the conventions of the float64 reference
(``srpo_core/reference/token_contrast.py``: ``0·log 0 = 0``, genuine ``+inf`` KL, NaN for a row without a
distribution). Everything is per vocabulary shard: :func:`local_stats` returns each row's ``(lse, lse', t or None,
target, target')`` of this shard, which ``srpo_core/ops/linear_token_contrast.py`` combines over a process group.

Peak extra memory of the ``kl`` pass: three fp32 tiles (``a``, ``b``, ``2^a``; plus one low-precision tile for
bf16/fp16 inputs) and O(N) per-row state; sharded ``js`` pass 2 holds four; unsharded ``js`` two logit chunks of
``TUNING.linear_contrast_js_chunk_elements`` and ``token_contrast``'s chunk temporaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srpo_core.common import linear_contrast
from srpo_core.cpu.linear_token_logprobs import LN2, LOG2E, _acc_dtype, _tile_logits_shifted, tile_sizes
from srpo_core.tuning import TUNING

# Unsharded js takes row chunks of at most TUNING.linear_contrast_js_chunk_elements logits per condition.


class _Walk:
    """Row state of one condition over the tiles: ``c`` (base-2 shift), ``s``, and the sampled-token logit."""

    def __init__(self, n: int, acc: torch.dtype, dev: torch.device):
        self.c = torch.zeros(n, dtype=acc, device=dev)
        self.s = torch.zeros(n, dtype=acc, device=dev)
        self.tgt = torch.zeros(n, dtype=acc, device=dev)


def _pick_target(walk: _Walk, u: torch.Tensor, c: torch.Tensor, n0: int, loc: torch.Tensor) -> None:
    """``tgt[n] = u₂[n, id] `` (absolute base-2 units) for the rows whose id falls in this tile (``loc`` = id − v0)."""
    n1 = n0 + u.shape[0]
    sel = (loc >= 0) & (loc < u.shape[1])
    idx = loc.clamp(0, u.shape[1] - 1)[:, None]
    walk.tgt[n0:n1] = torch.where(sel, u.gather(1, idx)[:, 0] + c, walk.tgt[n0:n1])


def _lse_walk(hidden, hidden_ref, weight, bias, ids_local, inv_tau, want_t):
    """The fast vocabulary-tiled pass. Returns ``(walk_x, walk_y, t, bad)`` after the last rebase (``s = 1`` on good
    rows, ``c`` = the log-sum-exp in base-2 units; ``t`` = ``Σ p (log₂ p − log₂ p')`` when ``want_t``); ``bad``
    marks the rows that must take the slow path."""
    n_all = hidden.shape[0]
    v_all = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    scale = inv_tau * LOG2E
    wx, wy = _Walk(n_all, acc, dev), _Walk(n_all, acc, dev)
    t = torch.zeros(n_all, dtype=acc, device=dev) if want_t else None
    bad = torch.zeros(n_all, dtype=torch.bool, device=dev)
    nc, vt = tile_sizes(n_all, v_all, forward=True)
    bufs = [torch.empty(nc * vt, dtype=acc, device=dev) for _ in range(3)]
    for v0 in range(0, v_all, vt):
        v1 = min(v_all, v0 + vt)
        w = weight[v0:v1]
        b = None if bias is None else bias[v0:v1]
        for n0 in range(0, n_all, nc):
            n1 = min(n_all, n0 + nc)
            rows = slice(n0, n1)
            A, B, E = (x[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0) for x in bufs)
            loc = ids_local[rows] - v0
            for walk, h, u in ((wx, hidden, A), (wy, hidden_ref, B)):
                if v0 == 0:  # shift the first tile by its own row max: s ≥ 1 from here on, nothing underflows
                    _tile_logits_shifted(h[rows], w, b, torch.zeros_like(walk.c[rows]), scale, u)
                    m = u.amax(1)
                    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # that row goes slow (bad) below
                    u.sub_(m[:, None])
                    walk.c[rows] = m
                else:
                    _tile_logits_shifted(h[rows], w, b, walk.c[rows], scale, u)
                _pick_target(walk, u, walk.c[rows], n0, loc)
            torch.exp2(B, out=E)
            sy = E.sum(1)
            torch.exp2(A, out=E)
            sx = E.sum(1)
            ok = torch.isfinite(sx) & torch.isfinite(sy)
            if want_t:
                torch.sub(A, B, out=B).mul_(E)  # 2^a (a − b); NaN/inf where a or b is −inf (slow path)
                tt = B.sum(1)
                ok &= torch.isfinite(tt)
            sx_new = wx.s[rows] + sx
            sy_new = wy.s[rows] + sy
            ok &= (sx_new > 0) & (sy_new > 0)
            bad[rows] |= ~ok
            # rebase to the running log-sum-exps (bad rows: harmless values, recomputed on the slow path)
            one = torch.ones((), dtype=acc, device=dev)
            sx_new = torch.where(ok, sx_new, one)
            sy_new = torch.where(ok, sy_new, one)
            lx, ly = torch.log2(sx_new), torch.log2(sy_new)
            if want_t:
                t[rows] = (t[rows] + torch.where(ok, tt, torch.zeros_like(tt))) / sx_new + ly - lx
            wx.c[rows] += lx
            wy.c[rows] += ly
            wx.s[rows] = 1.0
            wy.s[rows] = 1.0
    return wx, wy, t, bad


def _js_walk(hidden, hidden_ref, weight, bias, inv_tau, lse_x2, lse_y2):
    """Pass 2 of ``js``: ``Σ_v ½ p (log₂ p − log₂ m) + ½ p' (log₂ p' − log₂ m)`` (base-2 units) per row over this
    shard, ``p = 2^(u₂ − lse_x2)``; ``bad`` marks rows whose sums are not finite (``−inf`` logits)."""
    n_all = hidden.shape[0]
    v_all = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    scale = inv_tau * LOG2E
    js = torch.zeros(n_all, dtype=acc, device=dev)
    nc, vt = tile_sizes(n_all, v_all, forward=True)
    bufs = [torch.empty(nc * vt, dtype=acc, device=dev) for _ in range(4)]
    for v0 in range(0, v_all, vt):
        v1 = min(v_all, v0 + vt)
        w = weight[v0:v1]
        b = None if bias is None else bias[v0:v1]
        for n0 in range(0, n_all, nc):
            n1 = min(n_all, n0 + nc)
            A, B, E, F = (x[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0) for x in bufs)
            _tile_logits_shifted(hidden[n0:n1], w, b, lse_x2[n0:n1], scale, A)  # log₂ p
            _tile_logits_shifted(hidden_ref[n0:n1], w, b, lse_y2[n0:n1], scale, B)  # log₂ p'
            torch.exp2(A, out=E)
            torch.exp2(B, out=F)
            G = torch.add(E, F)  # p + p'
            G.log2_().sub_(1.0)  # log₂ m
            A.sub_(G).mul_(E)
            B.sub_(G).mul_(F)
            js[n0:n1] += A.sum(1) + B.sum(1)
            del G
    return 0.5 * js


def local_stats(hidden, hidden_ref, weight, bias, ids_local, inv_tau, kind):
    """This shard's per-row ``(lse, lse_ref, t, tgt, tgt_ref)`` in natural units of ``u = x/τ`` (acc dtype):
    ``lse`` over the shard, ``t = Σ_v p_v (log p_v − log p'_v)`` of the shard's own softmaxes (``kl``; None for
    ``js``), ``tgt = u[id]`` where the id falls in the shard (0 elsewhere). Rows are ``hidden``'s (ignored rows already
    dropped by the caller)."""
    acc = _acc_dtype(hidden.dtype)
    wx, wy, t, bad = _lse_walk(hidden, hidden_ref, weight, bias, ids_local, inv_tau, kind == "kl")
    lse_x, lse_y = wx.c * LN2, wy.c * LN2
    tgt_x, tgt_y = wx.tgt * LN2, wy.tgt * LN2
    t = t * LN2 if t is not None else None
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:, 0]
        slow = linear_contrast.slow_rows(hidden, hidden_ref, weight, bias, ids_local, inv_tau, rows, kind, None).to(acc)
        lse_x, lse_y, tgt_x, tgt_y = lse_x.clone(), lse_y.clone(), tgt_x.clone(), tgt_y.clone()
        lse_x[rows], lse_y[rows], tgt_x[rows], tgt_y[rows] = slow[0], slow[1], slow[3], slow[4]
        if t is not None:
            t = t.clone()
            t[rows] = slow[2]
    return lse_x, lse_y, t, tgt_x, tgt_y


def js_local(hidden, hidden_ref, weight, bias, inv_tau, lse_x, lse_y):
    """This shard's ``Σ_v ½ p (log p − log m) + ½ p' (log p' − log m)`` per row (natural units), ``p`` the whole
    vocabulary's softmax (``lse_x``, ``lse_y``: its log-sum-exps, natural units)."""
    acc = _acc_dtype(hidden.dtype)
    js = _js_walk(hidden, hidden_ref, weight, bias, inv_tau, lse_x * LOG2E, lse_y * LOG2E) * LN2
    bad = ~torch.isfinite(js) & torch.isfinite(lse_x) & torch.isfinite(lse_y)
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:, 0]
        slow = linear_contrast.slow_rows(hidden, hidden_ref, weight, bias, None, inv_tau, rows, "js",
                                         (lse_x[rows], lse_y[rows]))
        js = js.clone()
        js[rows] = slow.to(acc)
    return js


def js_rows(hidden, hidden_ref, weight, bias, ids, temperature, ignore_index):
    """Unsharded ``js`` (D214): row chunks of both conditions' logits over the whole vocabulary (at most
    ``TUNING.linear_contrast_js_chunk_elements`` per condition), each handed to ``token_contrast``'s torch path
    (compiled on the CPU for large chunks, float64 redo of non-finite rows). One GEMM per condition and chunk, against
    the two of the vocabulary-tiled two-pass walk. ``ids`` are global; returns ``(div, logp, logp_ref)`` ``[N]``."""
    from srpo_core.cpu.token_contrast import _torch_path

    n, v = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    outs = [torch.zeros(n, dtype=acc, device=hidden.device) for _ in range(3)]
    step = max(1, TUNING.linear_contrast_js_chunk_elements // max(v, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        xs = []
        for h in (hidden, hidden_ref):  # in the compute dtype, rounded once, as the reference computes them
            xs.append(F.linear(h[r0:r1], weight, bias))
        for out, part in zip(outs, _torch_path(xs[0], xs[1], ids[r0:r1], "js", temperature, ignore_index),
                             strict=True):
            out[r0:r1] = part
        del xs
    return tuple(outs)


__all__ = ["js_local", "js_rows", "local_stats"]
