"""The methods compared by ``linear_table.py`` / ``bench_linear_logprobs.py``, each ``fn(hidden, weight, ids, *,
backward) -> result`` returning the per-token log-probs (after a backward of their sum when ``backward``).

- ``naive``: ``log_softmax((hidden @ Wᵀ).float()).gather`` (materialises ``[N, V]``);
- ``trl``: TRL 1.16's ``ChunkedLogProbFunction`` (its CPU path: torch tiles of 4096 tokens × 32768 vocabulary, the
  chunk size its trainer uses), log-probs only;
- ``cce``: cut-cross-entropy's ``linear_cross_entropy(..., impl="torch_compile", reduction="none")``, negated;
- ``ours``: ``srpo_core.linear_token_logprobs(backend="torch")``;
- floors: ``gemm`` (``hidden @ Wᵀ``) and ``three_gemms`` (``hidden @ Wᵀ``, ``G @ W``, ``Gᵀ @ hidden`` with a
  pre-made ``G [N, V]``, the three products a forward+backward cannot avoid).
"""

from __future__ import annotations

import torch


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype).mul_(h ** -0.5)
    ids = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, ids


def _leaf(x, backward):
    return x.detach().requires_grad_() if backward else x


def naive(hidden, weight, ids, *, backward=False):
    with torch.set_grad_enabled(backward):
        h, w = _leaf(hidden, backward), _leaf(weight, backward)
        lp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, ids[:, None])[:, 0]
        if backward:
            lp.sum().backward()
    return lp


def trl(hidden, weight, ids, *, backward=False):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    with torch.set_grad_enabled(backward):
        h, w = _leaf(hidden, backward), _leaf(weight, backward)
        lp = ChunkedLogProbFunction.apply(h, w, None, ids, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]
        if backward:
            lp.sum().backward()
    return lp


def cce(hidden, weight, ids, *, backward=False):
    from cut_cross_entropy import linear_cross_entropy

    with torch.set_grad_enabled(backward):
        h, w = _leaf(hidden, backward), _leaf(weight, backward)
        lp = -linear_cross_entropy(h, w, ids, impl="torch_compile", reduction="none")
        if backward:
            lp.sum().backward()
    return lp


def ours(hidden, weight, ids, *, backward=False):
    from srpo_core.ops.linear_token_logprobs import linear_token_logprobs

    with torch.set_grad_enabled(backward):
        h, w = _leaf(hidden, backward), _leaf(weight, backward)
        lp = linear_token_logprobs(h, w, ids, backend="torch")
        if backward:
            lp.sum().backward()
    return lp


def gemm(hidden, weight, ids, *, backward=False):
    return hidden @ weight.T


def three_gemms(hidden, weight, ids, *, backward=False, grad=None):
    g = grad if grad is not None else torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype).normal_()
    return hidden @ weight.T, g @ weight, g.T @ hidden


METHODS = {"naive": naive, "trl": trl, "cce": cce, "ours": ours}
