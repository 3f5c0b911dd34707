"""The CPU path of ``role_aware_advantages`` (``backend="torch"``, and ``"auto"`` where the Triton kernel does not
run): SPEC steps 1-6 with the value checks, in a few passes over a canonical row grid; ``torch.compile``d (inductor,
dynamic shapes) for large CPU batches, the same functions eagerly otherwise (``SRPO_NO_COMPILE=1``, no C++ compiler,
small batches, CUDA). The plain reference is ``srpo_core/reference/role_aware_advantages.py``. The public entry sends
here only the batches :func:`fits_grid` accepts (the others, no trajectories, no tokens or very uneven lengths, go to
the reference).

**The grid** (decision D58). Trajectory ``i``'s valid tokens, in order, sit at ``[i, 0:len_i]`` of ``[B, L]``
tensors, ``L = max_i len_i``. A right-padded batch (``mask`` rows are prefixes) and an equal-length packed batch
already are that grid (no copy); holes, left padding and unequal packed lengths are gathered into it, and results
scattered back. Both layouts of one batch therefore run the same code on the same values and agree bit for bit
(SPEC property 6), whatever order the reductions take; the segment sums are plain row sums.

**Passes** (all-reduced between them over a process group, in the reference's order: SUM, MAX, then SUM):

1. ``_signals``: ``s`` in the compute dtype and a float role code (``BAD`` -1 where a value read is invalid: NaN/+inf
   log-probs, non-finite precomputed signals, roles outside 0-2; 0 padding, 1 OTHER, 2 PERCEPTION, 3 REASONING),
   and ``clamped`` (1.0 where a log-prob contrast sits at a bound, D87).
   ``_role_sums``: per role the count, ``Σ s`` and extremes in float64 (over the unclamped signals under
   ``role_stats="unclamped"``), the role's token and clamped counts, and the number of ``BAD`` tokens; if it is
   not 0 (or a role with tokens has no signal source), :func:`role_aware_advantages_cpu` raises
   :class:`InvalidValues` and the public entry reports the detailed error (D59).
2. ``_sq_dev``: ``Σ (s − μ_r)²`` per role in float64 (two-pass statistics, D4).
3. ``_standardize``: ``z`` (formed in float64, then cast; D5, D28) and the baselines; ``_weights``: weights,
   renormalisation, token advantages, and each role's weight min / max / sum for the logging statistics.

The per-trajectory sums (baseline, renormalisation) accumulate in float64 where the reference sums in the compute
dtype, so results agree with the reference to rounding, not bit for bit (D60).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812

from srpo_core.common import chunked as _chunked
from srpo_core.common.role_aware_advantages import signal_and_bound
from srpo_core.config import SRPOConfig
from srpo_core.tuning import TUNING

OP = "role_aware_advantages"

BAD, PADDING, OTHER, PERCEPTION, REASONING = -1, 0, 1, 2, 3  # role codes in the grid
# params: one float64 vector, so that a new config value costs no recompile
CLAMP, K3_MAX, EPS, U_MAX, BETA_P, BETA_R, W_MIN = range(7)


class InvalidValues(ValueError):
    """Pass 1 met a value it cannot read (a NaN/+inf log-prob or non-finite precomputed signal where it is read, a
    role outside 0-2, a role with tokens and no signal source); the public entry finds it and raises its error."""


def fits_grid(num_traj: int, num_tokens: int, max_len: int) -> bool:
    """Whether this path takes a batch: at least one trajectory and one token, and a ``[B, L]`` grid not too sparse
    (``B·L`` within ``TUNING.role_advantages_max_grid_waste·N`` or ``TUNING.role_advantages_max_grid_cells``): very
    uneven lengths take the reference, in both layouts so that they still agree."""
    return num_traj > 0 and num_tokens > 0 and num_traj * max_len <= max(
        TUNING.role_advantages_max_grid_waste * num_tokens, TUNING.role_advantages_max_grid_cells)


def _params(config: SRPOConfig, device) -> torch.Tensor:
    # β is rounded to float32 as the reference's ``torch.where(roles == P, β_P, β_R)`` (default dtype) rounds it.
    beta = torch.tensor([config.beta_perception, config.beta_reasoning], dtype=torch.float32).tolist()
    return torch.tensor([config.clamp, config.k3_max, config.eps, config.u_max, *beta, config.w_min],
                        dtype=torch.float64, device=device)


def _source(kind: str, other, given) -> str | None:
    """Where a role's signal comes from: ``"given"``, a log-prob contrast kind, or ``None`` (not computable: an
    error if the batch has tokens of that role, which the public entry reports)."""
    if given is not None:
        return "given"
    if kind in ("logratio", "k3") and other is not None:
        return kind
    return None


# ---------------------------------------------------------------------------------------------------- the passes
def _signals(lengths, roles, logp, input_p, input_r, params, *, dtype, p_src, r_src):
    """Pass 1: signals ``s`` and role codes, ``BAD`` where a value read is invalid (or the role is not 0, 1, 2).

    Written with selects only: inductor's CPU code for ``&`` / ``|`` of masks converts them through int32 vectors,
    several times slower than a float compare (the role code is a float tensor for the same reason)."""
    L = roles.shape[1]  # noqa: N806
    valid = torch.arange(L, device=roles.device)[None, :] < lengths[:, None]
    r = roles.to(dtype)  # exact for 0, 1, 2; no other integer converts to them
    zero = torch.zeros((), dtype=dtype, device=roles.device)
    inf = float("inf")
    signal, ok, sat = [], [], []
    no = torch.zeros((), dtype=torch.bool, device=roles.device)
    for src, x in ((p_src, input_p), (r_src, input_r)):
        if src is None:  # an error if the role has tokens (the caller checks the counts)
            signal.append(zero)
            ok.append(torch.ones((), dtype=torch.bool, device=roles.device))
            sat.append(no)
        elif src == "given":  # precomputed signals must be finite (D29); they are never clamped
            signal.append(x.to(dtype))
            ok.append(x.abs() < inf)
            sat.append(no)
        else:  # log-probs may be -inf, never NaN or +inf (D2)
            value, at_bound = signal_and_bound(logp, x, src, params[CLAMP].to(dtype), params[K3_MAX].to(dtype), dtype)
            signal.append(value)
            sat.append(at_bound)
            ok.append(torch.where(logp < inf, x < inf, False))
    code = torch.where(r == 1, torch.where(ok[0], PERCEPTION, BAD), torch.where(
        r == 2, torch.where(ok[1], REASONING, BAD), torch.where(r == 0, OTHER, BAD)))
    code = torch.where(valid, code, PADDING).to(dtype)
    s = torch.where(code == PERCEPTION, signal[0], torch.where(code == REASONING, signal[1], zero))
    clamped = torch.where(code == PERCEPTION, sat[0], torch.where(code == REASONING, sat[1], False)).to(dtype)
    return s, code, clamped


def _role_sums(s, code, clamped, *, unclamped: bool):
    """Per role ``(count, Σ s, all tokens, clamped)`` and ``(max s, max −s)`` in float64 (count, sum and extremes
    over the unclamped signals when ``unclamped``), and the number of ``BAD`` tokens."""
    s64 = s.to(torch.float64)
    first, extremes = [], []
    for c in (PERCEPTION, REASONING):
        role = code == c
        sel = torch.where(clamped > 0, False, role) if unclamped else role
        first.append(torch.stack([sel.sum(dtype=torch.float64), torch.where(sel, s64, 0.0).sum(),
                                  role.sum(dtype=torch.float64), torch.where(role, clamped, 0.0).sum(
                                      dtype=torch.float64)]))
        extremes.append(torch.stack([torch.where(sel, s64, -float("inf")).amax(),
                                     torch.where(sel, -s64, -float("inf")).amax()]))
    return torch.stack(first), torch.stack(extremes), (code < 0).sum(dtype=torch.float64)


def _sq_dev(s, code, clamped, mu, *, unclamped: bool):
    """Pass 2: ``Σ (s − μ_r)²`` per role (over the unclamped signals when ``unclamped``), float64."""
    s64 = s.to(torch.float64)
    sq = []
    for k, c in enumerate((PERCEPTION, REASONING)):
        sel = torch.where(clamped > 0, False, code == c) if unclamped else code == c
        dev = torch.where(sel, s64 - mu[k], 0.0)
        sq.append((dev * dev).sum())
    return torch.stack(sq)


def _standardize(s, code, params, mu, sigma, *, dtype, standardize):
    """Step 2's ``z`` (float64, then cast; ``σ_r = 0`` gives 0, D5) and step 3's baselines (float64 row sums)."""
    is_p, is_role = code == PERCEPTION, code >= PERCEPTION
    if standardize == "none":
        z = torch.where(is_role, s, 0.0)
    else:
        mu_t, sigma_t = torch.where(is_p, mu[0], mu[1]), torch.where(is_p, sigma[0], sigma[1])
        z64 = torch.where(sigma_t > 0, (s.to(torch.float64) - mu_t) / (sigma_t + params[EPS]), 0.0)
        z = torch.where(is_role, z64, 0.0).to(dtype)
    n_role = is_role.sum(1, dtype=torch.float64)
    baseline = torch.where(n_role > 0, z.to(torch.float64).sum(1) / n_role.clamp(min=1.0), 0.0).to(dtype)
    return z, baseline


def _weight_map(x, params, weight_map: str):
    if weight_map == "exp":
        return torch.exp(x)
    if weight_map == "linear":
        return torch.clamp_min(1.0 + x, params[W_MIN].to(x.dtype))
    return 2.0 * torch.sigmoid(x)


def _weights(z, baseline, code, lengths, adv, params, *, dtype, weight_map, renorm):
    """Steps 4-6 on the grid; also each role's ``(min w, max w, Σ w)`` in float64."""
    is_p, is_r, is_role, valid = code == PERCEPTION, code == REASONING, code >= PERCEPTION, code > PADDING
    # Step 4: centred, clipped, mapped with the role's strength; OTHER tokens weigh 1, padding 0.
    u_max = params[U_MAX].to(dtype)
    u = torch.clamp(z - baseline[:, None], -u_max, u_max)
    beta = torch.where(is_p, params[BETA_P].to(dtype), params[BETA_R].to(dtype))
    w = torch.where(is_role, _weight_map(beta * u, params, weight_map), torch.where(valid, 1.0, 0.0).to(dtype))
    # Step 5: each trajectory's mean weight over its valid tokens becomes 1 (float64 row sums and scale).
    if renorm == "mean":
        n_tok = lengths.to(torch.float64)
        total = w.to(torch.float64).sum(1).clamp(min=torch.finfo(torch.float64).tiny)
        scale = torch.where(n_tok > 0, n_tok / total, 1.0)
        w = (w.to(torch.float64) * scale[:, None]).to(dtype)
    # Step 6 (+0 at padding, as the reference's unpacking gives, not 0 · A_i = -0).
    token_adv = torch.where(valid, w * adv[:, None], 0.0)
    w64 = w.to(torch.float64)
    w_stats = [torch.stack([torch.where(sel, w64, float("inf")).amin(), torch.where(sel, w64, -float("inf")).amax(),
                            torch.where(sel, w64, 0.0).sum()]) for sel in (is_p, is_r)]
    return token_adv, w, torch.stack(w_stats)


_COMPILED = {fn.__name__: _chunked.Compiled(fn) for fn in (_signals, _role_sums, _sq_dev, _standardize, _weights)}


def _run(fn, compiled: bool, *args, **kwargs):
    if compiled and _chunked.compile_wanted(args[0].device):
        try:
            return _COMPILED[fn.__name__](*args, **kwargs)
        except Exception as err:  # no C++ compiler, an inductor error: warn once, eager from now on
            _chunked.compile_failed(OP, err)
    return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------------ the grid
def _grid_index(cu, lengths, ar, flat, size: int):
    """For each grid cell: ``src``, the flat index of its token in the caller's tensors (clamped to a valid one in
    padding cells), and ``dst``, the same for valid cells and ``size`` (a scratch slot) for padding cells."""
    cell = cu[:-1, None] + ar  # packed index of each grid cell
    src = cell.clamp(max=cu[-1] - 1)
    if flat is not None:  # padded with holes: packed index -> flat padded index
        src = flat[src]
    return src, torch.where(ar < lengths[:, None], src, size)


def _holes(mask):
    """How many valid tokens follow a padding position in their row (0: right padding)."""
    return torch.where(mask[:, 1:], torch.where(mask[:, :-1], 0, 1), 0).sum()


def _gather(src, *xs):
    return [x.reshape(-1)[src] for x in xs]


def _scatter(dst, size: int, *ys):
    """Grid results into ``[size]`` flat outputs, 0 where no valid cell lands."""
    return [y.new_zeros(size + 1).index_put_((dst.reshape(-1),), y.reshape(-1))[:size] for y in ys]


_COMPILED.update({fn.__name__: _chunked.Compiled(fn) for fn in (_grid_index, _holes, _gather, _scatter)})


class _Grid:
    """The canonical ``[B, L]`` grid of a batch: ``take(*xs)`` gives the inputs' grids (contiguous), ``give(*ys)``
    puts grid results back in the caller's layout (0 outside the mask)."""

    def __init__(self, mask: torch.Tensor | None, cu: torch.Tensor, lengths: torch.Tensor, L: int,  # noqa: N803
                 compiled: bool):
        self.B, self.L, self.compiled = lengths.numel(), L, compiled
        self.n = int(cu[-1])
        self.T = None if mask is None else mask.shape[1]
        if mask is None and self.B * L == self.n:  # packed, equal lengths: a view
            self.kind = "view"
        elif mask is not None and not int(_run(_holes, compiled, mask)):  # right padding: a slice
            self.kind = "slice"
        else:  # holes in the mask, or packed with unequal lengths: gather the valid tokens into the grid
            self.kind = "gather"
            self.size = self.n if mask is None else mask.numel()
            flat = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)  # flat index of each token
            ar = torch.arange(L, device=cu.device)
            self.src, self.dst = _run(_grid_index, compiled, cu, lengths, ar, flat, self.size)

    def take(self, *xs: torch.Tensor | None) -> list[torch.Tensor | None]:
        given = [x for x in xs if x is not None]
        if self.kind == "view":
            grids = [x.reshape(self.B, self.L).contiguous() for x in given]
        elif self.kind == "slice":
            grids = [x[:, : self.L].contiguous() for x in given]
        else:
            grids = _run(_gather, self.compiled, self.src, *given)
        it = iter(grids)
        return [None if x is None else next(it) for x in xs]

    def give(self, *ys: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "view":
            return [y.reshape(-1) for y in ys]
        if self.kind == "slice":
            return [F.pad(y, (0, self.T - self.L)) if self.T > self.L else y for y in ys]
        outs = _run(_scatter, self.compiled, self.dst, self.size, *ys)
        return [y if self.T is None else y.view(self.B, self.T) for y in outs]


# ------------------------------------------------------------------------------------------------------ the entry
def role_aware_advantages_cpu(advantages, logp, logp_corrupt, logp_ablated, roles, perception_signal,
                              reasoning_signal, *, mask, cu, max_len: int, config: SRPOConfig, group, dtype):
    """SPEC steps 1-6 on a batch :func:`fits_grid` accepts, whose shapes, dtypes and ``cu`` the entry has checked
    (``max_len``: the longest trajectory); ``advantages`` finite, in ``dtype``. Returns ``(token advantages, weights,
    z, baseline, stats rows float64 [2, 7])`` in the caller's layout; raises :class:`InvalidValues` when a value read
    is invalid (before any collective, so a process group's ranks stay paired only on valid batches, as before)."""
    lengths = cu[1:] - cu[:-1]
    p_src = _source(config.perception_contrast, logp_corrupt, perception_signal)
    r_src = _source(config.reasoning_contrast, logp_ablated, reasoning_signal)
    compiled = lengths.numel() * max_len >= TUNING.role_advantages_min_compile_tokens
    grid = _Grid(mask, cu, lengths, max_len, compiled)
    params = _params(config, logp.device)
    p_in = perception_signal if p_src == "given" else logp_corrupt if p_src else None
    r_in = reasoning_signal if r_src == "given" else logp_ablated if r_src else None
    roles_g, logp_g, p_g, r_g = grid.take(roles, logp, p_in, r_in)
    s, code, clamped = _run(_signals, compiled, lengths, roles_g, logp_g, p_g, r_g, params, dtype=dtype,
                            p_src=p_src, r_src=r_src)
    unclamped = config.role_stats == "unclamped"
    first, extremes, n_bad = _run(_role_sums, compiled, s, code, clamped, unclamped=unclamped)
    n_bad, n_p, n_r = torch.cat([n_bad.view(1), first[:, 2]]).tolist()
    if n_bad or (n_p and p_src is None) or (n_r and r_src is None):
        raise InvalidValues(f"{OP}: an invalid value in pass 1")
    mu, sigma, local_count = _moments(s, code, clamped, first, extremes, group, compiled, unclamped)
    z, baseline = _run(_standardize, compiled, s, code, params, mu, sigma, dtype=dtype,
                       standardize=config.standardize)
    token_adv, w, w_stats = _run(_weights, compiled, z, baseline, code, lengths, advantages, params, dtype=dtype,
                                 weight_map=config.weight_map, renorm=config.renorm)
    has = local_count > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=w.device)
    rows = torch.stack([first[:, 2], mu, sigma, torch.where(has, w_stats[:, 0], nan),
                        w_stats[:, 2] / local_count.clamp(min=1.0), torch.where(has, w_stats[:, 1], nan),
                        first[:, 3]], dim=1)
    return (*grid.give(token_adv, w, z), baseline, rows)


def _moments(s, code, clamped, first, extremes, group, compiled: bool, unclamped: bool):
    """Step 2's ``μ_r`` and ``σ_r`` over the batch (all-reduced over ``group`` in the reference's order: SUM, MAX, then
    SUM), and this rank's token count per role (``first`` is all-reduced in place)."""
    local_count = first[:, 2].clone()
    if group is not None:
        dist.all_reduce(first, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    count = first[:, 0]
    mu = first[:, 1] / count.clamp(min=1.0)
    sq = _run(_sq_dev, compiled, s, code, clamped, mu, unclamped=unclamped)
    if group is not None:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    constant = extremes[:, 0] == -extremes[:, 1]
    sigma = torch.where(constant, 0.0, torch.sqrt(sq / count.clamp(min=1.0)))
    return mu, sigma, local_count
