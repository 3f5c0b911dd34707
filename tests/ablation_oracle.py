"""By-hand ablated sequences for the adapter tests: what each reasoning contrast mode feeds the model, written as
plain list operations (independent of ``srpo_core.ablation``), for a bigram stand-in model whose log-prob of a token
depends only on the token before it."""

from __future__ import annotations

from srpo_core import Role


def expected_ablated(prompt, resp, roles, mode, donor=None):
    """By hand: for each response token, ``(previous token, new position)`` of the ablated sequence in ``mode``
    (``None``: no value), with ``donor = (tokens, roles)`` of the response lending its span (counterfactual)."""
    span = [j for j, r in enumerate(roles) if r == Role.PERCEPTION]
    if mode in ("mask", "drop"):
        new = [(j, t) for j, t in enumerate(resp) if roles[j] != Role.PERCEPTION]
    elif not span:
        new = list(enumerate(resp))
    elif donor is None:  # the row unchanged, no value from its span on
        return {j: ((prompt + resp)[len(prompt) + j - 1], len(prompt) + j) if j < span[0] else None
                for j in range(len(resp))}
    else:
        d_tokens, d_roles = donor
        d_span = [j for j, r in enumerate(d_roles) if r == Role.PERCEPTION]
        lent = d_tokens[d_span[0]:d_span[-1] + 1] if d_span else []
        new = ([(j, resp[j]) for j in range(span[0])] + [(None, t) for t in lent]
               + [(j, resp[j]) for j in range(span[-1] + 1, len(resp))])
    seq = list(prompt) + [t for _, t in new]
    out = {j: None for j in range(len(resp))}
    for k, (j, _) in enumerate(new):
        if j is not None:
            # mask keeps the original positions; drop / counterfactual number the new sequence
            out[j] = (seq[len(prompt) + k - 1], len(prompt) + (j if mode == "mask" else k))
    return out
