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
from srpo_core_test_ablation_oracle import expected_ablated  # tests/ablation_oracle.py, registered by conftest.py

from srpo_core import SRPOConfig, role_aware_advantages
from srpo_core.adapters import easyr1
from srpo_core.adapters._common import AdapterOptions


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
    naive = easyr1.corrupted_batch(data, AdapterOptions(corruption_p=0.9))
    naive.non_tensor_batch["uid"] = data.non_tensor_batch["uid"]
    assert [x["pixel_mean"][0] for x in worker.process(naive)] == clean
    # The adapter's copy has new uids: reprocessed, corrupted pixels, one corrupted image per prompt.
    before = worker.processed
    corrupt = easyr1.corrupted_batch(data, AdapterOptions(corruption_p=0.9))
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
                                 batch["srpo_roles"], mask=mask.bool())  # padding-free: no D180 rule (D187)
    torch.testing.assert_close(out.batch["advantages"], want.advantages)
    assert "srpo/perception/count" in out.meta_info["srpo_metrics"]


def test_options_are_checked_when_the_adapter_is_built_naming_the_key():
    """EasyR1's config is a closed dataclass tree, so SRPO's options are the ``srpo_options`` mapping; bad values fail
    in ``SRPOWorkerGroup`` / ``install`` (``SRPORayPPOTrainer`` checks before EasyR1's constructor runs)."""
    for key, value, expected in [("corruption_p", 1.5, r"a number in \[0, 1\], got 1.5"),
                                 ("corruption_mode", "blur", "one of .*got 'blur'"),
                                 ("seed", "x", "an integer >= 0, got 'x'"),
                                 ("ablate", "nope", "a boolean .*got 'nope'")]:
        with pytest.raises(ValueError, match=rf'srpo \(EasyR1\): `srpo_options\["{key}"\]` must be {expected}'):
            easyr1.SRPOWorkerGroup(object(), None, "srpo", {key: value})
    with pytest.raises(ValueError, match="`srpo_method` must be one of"):
        easyr1.SRPOWorkerGroup(object(), None, "grpo", {})
    with pytest.warns(DeprecationWarning, match=r'`srpo_options\["ablate"\]` is deprecated'):
        assert not easyr1.options_from_mapping({"ablate": "false"}).ablates


class _Batch(dict):
    def clone(self, recurse=True):
        return _Batch(self)


class _Proto:
    """EasyR1's ``DataProto`` as the adapter uses it: ``batch``, ``non_tensor_batch``, ``meta_info``, ``from_dict``."""

    def __init__(self, batch, non_tensor_batch, meta_info=None):
        self.batch, self.non_tensor_batch, self.meta_info = _Batch(batch), dict(non_tensor_batch), dict(meta_info or {})

    @classmethod
    def from_dict(cls, tensors, non_tensors=None, meta_info=None):
        return cls(tensors, non_tensors or {}, meta_info)


class _PaddingFreeBigramActor:
    """EasyR1's padding-free actor on a bigram model: the kept tokens (attention 1) in order, the log-prob of each
    stored at the slot of the token that predicts it, the response slice ``[:, -R-1:-1]``."""

    def __init__(self, vocab=11):
        self.W = torch.log_softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0),
                                               dtype=torch.float64), -1)
        self.seen = []

    def logp(self, prev, tok):
        return float(self.W[prev, tok])

    def compute_log_probs(self, data):
        ids, attn, r = data.batch["input_ids"], data.batch["attention_mask"], data.batch["responses"].shape[1]
        self.seen.append(data)
        full = torch.zeros(ids.shape, dtype=torch.float64)
        for i in range(ids.shape[0]):
            idx = torch.nonzero(attn[i]).flatten().tolist()
            for a, b in zip(idx[:-1], idx[1:], strict=True):
                full[i, a] = self.logp(int(ids[i, a]), int(ids[i, b]))
        return _Proto({"old_log_probs": full[:, -r - 1:-1].float()}, {})


@pytest.mark.parametrize("mode", ["mask", "drop", "counterfactual"])
def test_worker_group_runs_each_ablation_mode(mode):
    """``SRPOWorkerGroup.compute_log_probs`` in each mode on EasyR1's padding-free layout: every ``ℓ°`` by hand
    (tests/ablation_oracle.py), a row without a donor's reasoning tokens marked as having none."""
    from srpo_core.ablation import counterfactual_donors
    from srpo_core.adapters._common import group_ids

    g = torch.Generator().manual_seed(3)
    V, P, R = 11, 3, 6  # noqa: N806
    prompt_lens, resp_lens = [3, 2, 3, 1, 2], [6, 5, 6, 4, 3]
    roles = torch.tensor([[2, 1, 1, 2, 2, 0], [1, 2, 2, 0, 2, 0], [0, 2, 1, 2, 2, 2], [2, 1, 2, 2, 0, 0],
                          [2, 2, 2, 0, 0, 0]])
    bs = len(prompt_lens)
    prompts, responses = torch.zeros(bs, P, dtype=torch.int64), torch.zeros(bs, R, dtype=torch.int64)
    attn = torch.zeros(bs, P + R, dtype=torch.int64)
    for i in range(bs):
        prompts[i, P - prompt_lens[i]:] = torch.randint(1, V, (prompt_lens[i],), generator=g)
        responses[i, :resp_lens[i]] = torch.randint(1, V, (resp_lens[i],), generator=g)
        attn[i, P - prompt_lens[i]:P] = 1
        attn[i, P:P + resp_lens[i]] = 1
    response_mask = attn[:, P:].clone()
    roles = roles * response_mask
    uids = np.array(["a", "a", "b", "b", "c"], dtype=object)  # "c": a group of one, no donor
    data = _Proto({"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                   "attention_mask": attn, "position_ids": (torch.cumsum(attn, 1) - 1).clamp(min=0),
                   "response_mask": response_mask, "srpo_roles": roles},
                  {"uid": uids, "multi_modal_data": np.array([{"images": []}] * bs, dtype=object)})
    actor = _PaddingFreeBigramActor(V)
    wg = easyr1.SRPOWorkerGroup(actor, None, "srpo", {"ablation_mode": mode})
    out = wg.compute_log_probs(data)
    assert len(actor.seen) == 3 and list(actor.seen[2].non_tensor_batch["uid"]) == list(uids)  # clean images
    span = (roles == 1) & response_mask.bool()
    donors = counterfactual_donors(group_ids(uids), "group", input_ids=responses, span_mask=span).tolist()
    assert donors[4] == -1
    ablated, valid = out.batch["srpo_logp_ablated"], out.batch["srpo_ablated_valid"]
    for i in range(bs):
        prompt, resp = prompts[i, P - prompt_lens[i]:].tolist(), responses[i, :resp_lens[i]].tolist()
        d = donors[i]
        lend = (responses[d, :resp_lens[d]].tolist(), roles[d, :resp_lens[d]].tolist()) if d >= 0 else None
        for j, w in expected_ablated(prompt, resp, roles[i, :resp_lens[i]].tolist(), mode, lend).items():
            assert bool(valid[i, j]) is (w is not None), (mode, i, j)
            if w is not None:
                assert float(ablated[i, j]) == pytest.approx(actor.logp(w[0], resp[j]), abs=1e-6), (mode, i, j)

