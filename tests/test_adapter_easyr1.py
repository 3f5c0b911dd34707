"""EasyR1 adapter, tested without EasyR1: it cannot be installed on a CPU machine (it requires vllm>=0.8 and
flash-attn, which builds only against CUDA, and transformers<5; it is not on PyPI, and its package is also named
``verl``). Its worker's image cache is reproduced below line for line in behaviour (``FSDPWorker.
_process_multi_modal_inputs``, hiyouga/EasyR1 at b44b311): processed inputs are cached per batch, the cache is kept
while the incoming ``uid`` array equals the cached one, and within a batch samples with the same uid share one
processing. The "processor" is a real computation (mean pixel per image), not an echo.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from srpo_core import SRPOConfig, role_aware_advantages
from srpo_core.adapters import easyr1
from srpo_core.adapters._common import AdapterOptions, without_hidden_successors


class EasyR1ImageCache:
    """Behaviour of ``FSDPWorker._process_multi_modal_inputs`` (EasyR1): cache keyed by the batch's uids."""

    def __init__(self):
        self._cache = {}
        self.processed = 0

    def process(self, data):
        uids = data.non_tensor_batch["uid"]
        if "uid" in self._cache and not np.all(uids == self._cache["uid"]):
            self._cache.clear()
        if "multi_modal_inputs" not in self._cache:
            per_uid, out = {}, []
            for uid, mm in zip(uids, data.non_tensor_batch["multi_modal_data"], strict=True):
                if uid not in per_uid:
                    self.processed += 1
                    per_uid[uid] = {"pixel_mean": [float(np.asarray(im, dtype=np.float64).mean())
                                                   for im in mm["images"]]}
                out.append(per_uid[uid])
            self._cache["uid"] = uids
            self._cache["multi_modal_inputs"] = np.array(out, dtype=object)
        data.non_tensor_batch["multi_modal_inputs"] = self._cache["multi_modal_inputs"]
        return data.non_tensor_batch["multi_modal_inputs"]


def _batch(n_prompts=2, n=2, size=56):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(30, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n_prompts)]
    uids = np.array([f"prompt-{i // n}" for i in range(n_prompts * n)], dtype=object)
    mm = np.array([{"images": [images[i // n]]} for i in range(n_prompts * n)], dtype=object)
    return types.SimpleNamespace(batch={}, non_tensor_batch={"uid": uids, "multi_modal_data": mm}, meta_info={})


def test_same_uids_silently_reuse_clean_pixels_new_uids_do_not():
    worker = EasyR1ImageCache()
    data = _batch()
    clean = [x["pixel_mean"][0] for x in worker.process(data)]
    # The trap: a corrupted copy that keeps the uids gets the cached clean inputs back.
    naive = easyr1.corrupted_batch(data, AdapterOptions(corrupt_p=0.9))
    naive.non_tensor_batch["uid"] = data.non_tensor_batch["uid"]
    assert [x["pixel_mean"][0] for x in worker.process(naive)] == clean
    # The adapter's copy has new uids: reprocessed, corrupted pixels, one corrupted image per prompt.
    before = worker.processed
    corrupt = easyr1.corrupted_batch(data, AdapterOptions(corrupt_p=0.9))
    got = [x["pixel_mean"][0] for x in worker.process(corrupt)]
    assert worker.processed == before + 2  # one processing per prompt group, as for the clean batch
    assert all(g < c for g, c in zip(got, clean, strict=True))  # blacked-out cells lower the mean
    assert got[0] == got[1] and got[2] == got[3]
    assert all(u.endswith(easyr1.CORRUPT_UID_SUFFIX) for u in corrupt.non_tensor_batch["uid"])
    # The original batch is untouched, and the next clean call is clean again.
    assert list(data.non_tensor_batch["uid"]) == [f"prompt-{i // 2}" for i in range(4)]
    assert [x["pixel_mean"][0] for x in worker.process(data)] == clean


def test_realign_scattered_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b, r = 3, 8
        kept = torch.rand(b, r, generator=g) > 0.4
        raw = torch.randn(b, r, generator=g)
        out = easyr1.realign_scattered(raw, kept)
        for i in range(b):
            prev = -1
            for j in range(r):
                if kept[i, j]:
                    assert float(out[i, j]) == float(raw[i, prev + 1])
                    prev = j
                else:
                    assert float(out[i, j]) == 0.0


def _grpo_easyr1(data, adv_estimator, gamma=1.0, lam=1.0):
    """EasyR1's GRPO branch: (score − mean_uid) / (std_uid + 1e-6) over the summed token rewards, times the mask."""
    scores = data.batch["token_level_rewards"].sum(-1)
    uids = data.non_tensor_batch["uid"]
    out = torch.zeros_like(scores)
    for u in set(uids):
        idx = torch.tensor([k for k, v in enumerate(uids) if v == u])
        s = scores[idx]
        out[idx] = (s - s.mean()) / (s.std() + 1e-6) if len(idx) > 1 else 0.0
    data.batch["advantages"] = out[:, None] * data.batch["response_mask"]
    data.batch["returns"] = data.batch["advantages"]
    return data


@pytest.mark.parametrize("with_contrast", [True, False], ids=["srpo", "plain-grpo"])
def test_compute_advantage_refines_grpo_batches(with_contrast):
    g = torch.Generator().manual_seed(1)
    bs, r = 6, 5
    mask = torch.ones(bs, r, dtype=torch.int64)
    mask[2, 3:] = 0
    rewards = torch.zeros(bs, r)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    old = -torch.rand(bs, r, generator=g)
    batch = {"token_level_rewards": rewards, "response_mask": mask, "old_log_probs": old}
    if with_contrast:
        batch.update(srpo_logp_corrupt=old - torch.rand(bs, r, generator=g),
                     srpo_logp_ablated=old + 0.1 * torch.randn(bs, r, generator=g),
                     srpo_roles=torch.randint(0, 3, (bs, r), generator=g))
    data = types.SimpleNamespace(batch=batch, non_tensor_batch={"uid": np.array(list("aaabbb"), dtype=object)},
                                 meta_info={})
    out = easyr1.compute_advantage(data, "grpo", method="srpo", options=AdapterOptions(srpo=SRPOConfig()),
                                   _easyr1_compute_advantage=_grpo_easyr1)
    grpo = _grpo_easyr1(types.SimpleNamespace(batch=dict(batch), non_tensor_batch=data.non_tensor_batch), "grpo")
    if not with_contrast:
        torch.testing.assert_close(out.batch["advantages"], grpo.batch["advantages"])
        return
    seq = grpo.batch["advantages"][:, 0]
    want = role_aware_advantages(seq, old, batch["srpo_logp_corrupt"], batch["srpo_logp_ablated"],
                                 without_hidden_successors(batch["srpo_roles"], mask), mask=mask.bool())  # D180
    torch.testing.assert_close(out.batch["advantages"], want.advantages)
    assert "srpo/perception/count" in out.meta_info["srpo_metrics"]
