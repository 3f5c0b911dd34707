"""OpenRLHF adapter, tested without OpenRLHF: ``openrlhf==0.11.2`` requires ``flash-attn==2.8.3`` (CUDA-only build),
``deepspeed`` and ``vllm``, and its ``experience_maker`` module imports ``flash_attn`` at import time (checked:
``pip install --no-deps openrlhf==0.11.2`` then ``import openrlhf.trainer.ppo_utils.experience_maker`` fails with
``No module named 'flash_attn'``). So :func:`refine_experiences` is tested on objects with the documented fields of
``openrlhf.trainer.ppo_utils.experience.Experience`` (``action_mask``, ``action_log_probs``, ``advantages``,
``index``, ``info``), advantages made by a transcription of OpenRLHF's ``group_norm``.
"""

from __future__ import annotations

import dataclasses

import torch

from srpo_core import role_aware_advantages
from srpo_core.adapters import openrlhf
from srpo_core.adapters._common import AdapterOptions


@dataclasses.dataclass
class Experience:  # the fields of OpenRLHF's Experience that the adapter reads or writes
    action_mask: torch.Tensor
    action_log_probs: torch.Tensor
    advantages: torch.Tensor | None = None
    index: list | None = None
    info: dict = dataclasses.field(default_factory=dict)


def group_norm(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """OpenRLHF 0.11: ``(r − mean) / (std + 1e-9)`` per prompt (rewards in prompt order, n per prompt)."""
    r = rewards.reshape(-1, n)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)).reshape(-1)


def test_refine_experiences_is_one_batch_across_micro_batches():
    g = torch.Generator().manual_seed(0)
    n, widths, sizes = 4, [6, 9], [4, 4]
    seq_adv = group_norm(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5]), n)
    exps, start = [], 0
    for w, b in zip(widths, sizes, strict=True):
        lengths = torch.randint(1, w + 1, (b,), generator=g)
        mask = torch.arange(w)[None, :] < lengths[:, None]
        e = Experience(action_mask=mask, action_log_probs=-torch.rand(b, w, generator=g),
                       index=list(range(start, start + b)))
        e.advantages = seq_adv[start:start + b, None] * mask  # group_norm's returns, gamma = 1, KL as a loss
        e.srpo_logp_corrupt = e.action_log_probs - torch.rand(b, w, generator=g)
        e.srpo_roles = torch.randint(0, 3, (b, w), generator=g) * mask
        exps.append(e)
        start += b
    before = [e.advantages.clone() for e in exps]
    stats = openrlhf.refine_experiences(exps, n, "srpo", AdapterOptions())
    # Reference: the whole batch padded to one width, reasoning scored like OTHER (no ablated pass here).
    W = max(widths)  # noqa: N806
    pad = lambda ts, v: torch.cat([torch.nn.functional.pad(t, (0, W - t.shape[1]), value=v) for t in ts])  # noqa: E731
    mask = pad([e.action_mask for e in exps], False)
    roles = pad([e.srpo_roles for e in exps], 0)
    roles = torch.where(roles == 2, 0, roles)
    want = role_aware_advantages(seq_adv, pad([e.action_log_probs for e in exps], 0.0),
                                 pad([e.srpo_logp_corrupt for e in exps], 0.0), None, roles, mask=mask)
    got = pad([e.advantages for e in exps], 0.0)
    torch.testing.assert_close(got, want.advantages)
    assert [e.advantages.shape for e in exps] == [b.shape for b in before]
    assert stats["srpo/reasoning/count"] == 0
    assert exps[0].info["srpo/perception/mu"].shape == (4,)


def test_refine_experiences_vppo_and_empty():
    assert openrlhf.refine_experiences([], 2) == {}
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    e = Experience(action_mask=mask, action_log_probs=-torch.rand(4, 5, generator=g))
    e.advantages = group_norm(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)[:, None] * mask
    e.srpo_logp_corrupt = e.action_log_probs - torch.rand(4, 5, generator=g)
    openrlhf.refine_experiences([e], 2, "vppo", AdapterOptions(vppo_top_k=0.4))
    assert (e.advantages != 0).sum(1).tolist() == [2, 2, 0, 0]  # ceil(0.4·5) kept; the 2nd group has A = 0
