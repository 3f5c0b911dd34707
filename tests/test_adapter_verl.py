"""verl adapter.

Part 1 (default suite, torch only): the conversion on tensors shaped exactly like verl's batch — ``advantages``,
``response_mask``, ``old_log_probs`` ``[bs, response_length]``, uid strings — against ``role_aware_advantages`` and
the VPPO preset, plus the batch-preparation helpers.

Part 2 (needs upstream verl 0.9.1, skipped otherwise): the real ``DataProto``, ``core_algos`` registry,
``ray_trainer.compute_advantage``, the v1 trainer's ``compute_advantage_for_multi_trajectories`` and
``RayPPOTrainer._compute_old_log_prob`` (its padding-free path:
``left_right_2_no_padding`` → worker → ``no_padding_2_padding``). The only stand-in is the Ray worker group: a
tiny bigram "VLM" whose next-token distribution depends on the previous token and on the image's mean pixel, so that
every log-prob the adapter receives can be recomputed by hand. Run with the verl environment: ``make test-verl``
(it builds ``.venv-verl`` with the ``verl`` extra on first use).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import uuid

import numpy as np
import pytest
import torch
from srpo_core_test_ablation_oracle import expected_ablated  # tests/ablation_oracle.py, registered by conftest.py

from srpo_core import Role, SRPOConfig, grpo_advantages, role_aware_advantages
from srpo_core.adapters import verl as adapter
from srpo_core.adapters._common import (
    AdapterOptions,
    corrupt_multi_modal_inputs,
    group_ids,
    perception_span_hidden,
    realign_compact,
    sequence_advantages,
)
from srpo_core.adapters._options import OptionDeprecationWarning
from srpo_core.presets import vppo_advantages


def _has_upstream_verl() -> bool:
    try:
        return importlib.util.find_spec("verl.trainer.ppo.core_algos") is not None
    except ModuleNotFoundError:
        return False


HAVE_VERL = _has_upstream_verl()
needs_verl = pytest.mark.skipif(not HAVE_VERL, reason="upstream verl is not installed here (see the module docstring "
                                                      "for the .venv-verl install that runs these)")


def verl_like_batch(bs=8, n=4, resp_len=9, seed=0, dtype=torch.float32):
    """Tensors as verl holds them after ``old_log_prob``: right-padded responses, GRPO advantages, string uids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, resp_len + 1, (bs,), generator=g)
    lengths[0] = resp_len
    response_mask = (torch.arange(resp_len)[None, :] < lengths[:, None]).to(torch.int64)  # verl keeps it int
    uids = np.array([str(uuid.UUID(int=i // n)) for i in range(bs)], dtype=object)
    rewards = torch.randint(0, 2, (bs,), generator=g).to(dtype) + 0.1 * torch.arange(bs, dtype=dtype)
    seq = grpo_advantages(rewards, group_ids(uids))
    advantages = seq[:, None] * response_mask  # what verl's GRPO returns
    old = -torch.rand(bs, resp_len, generator=g, dtype=dtype) * 3
    corrupt = old - torch.rand(bs, resp_len, generator=g, dtype=dtype)
    ablated = (old + torch.randn(bs, resp_len, generator=g, dtype=dtype) * 0.3).clamp(max=0.0)  # log-probs
    roles = torch.randint(0, 3, (bs, resp_len), generator=g) * response_mask
    # Garbage past the response, as a padded batch may hold.
    for t in (old, corrupt, ablated):
        t[response_mask == 0] = float("nan")
    return dict(advantages=advantages, response_mask=response_mask, old=old, corrupt=corrupt, ablated=ablated,
                roles=roles, uids=uids, seq=seq)


# --------------------------------------------------------------------------- part 1: plain torch
def test_group_ids_from_uid_strings():
    uids = np.array(["b", "a", "b", "c", "a"], dtype=object)
    g = group_ids(uids)
    assert g.dtype == torch.int64 and g.tolist() == [1, 0, 1, 2, 0]
    assert group_ids(np.array([], dtype=object)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_srpo_conversion_matches_role_aware_advantages(dtype):
    b = verl_like_batch(dtype=dtype)
    config = SRPOConfig(beta_perception=0.7, beta_reasoning=0.3)
    out, stats = adapter.srpo_token_advantages(
        b["advantages"], b["response_mask"], b["old"], logp_corrupt=b["corrupt"], logp_ablated=b["ablated"],
        roles=b["roles"], options=AdapterOptions(srpo=config))
    # verl's padding-free pass removes the hidden rows: every token it scores has ℓ°, the one right after the span
    # included (D187), so the roles are scored as given
    want = role_aware_advantages(b["seq"], b["old"], b["corrupt"], b["ablated"], b["roles"],
                                 mask=b["response_mask"].bool(), config=config)
    assert out.shape == b["advantages"].shape and out.dtype == dtype
    torch.testing.assert_close(out, want.advantages.to(dtype), rtol=1e-6, atol=1e-6)
    assert bool((out[b["response_mask"] == 0] == 0).all())
    mask = b["response_mask"].bool()
    assert bool((torch.sign(out[mask]) == torch.sign(b["advantages"][mask])).all())
    assert stats["srpo/perception/count"] == int(((b["roles"] == 1) & mask).sum())


def test_srpo_conversion_recovers_grpo_with_zero_strength():
    b = verl_like_batch(seed=3)
    out, _ = adapter.srpo_token_advantages(
        b["advantages"], b["response_mask"], b["old"], logp_corrupt=b["corrupt"], logp_ablated=b["ablated"],
        roles=b["roles"], options=AdapterOptions(srpo=SRPOConfig(beta_perception=0.0, beta_reasoning=0.0)))
    torch.testing.assert_close(out, b["advantages"], rtol=0, atol=1e-6)


def test_reasoning_tokens_without_an_ablated_value_are_scored_like_other():
    """``ablated_valid`` (a counterfactual row without a donor): its reasoning tokens get no signal."""
    b = verl_like_batch(seed=6)
    valid = torch.ones_like(b["response_mask"], dtype=torch.bool)
    valid[1] = False
    out, _ = adapter.srpo_token_advantages(
        b["advantages"], b["response_mask"], b["old"], logp_corrupt=b["corrupt"], logp_ablated=b["ablated"],
        roles=b["roles"], ablated_valid=valid)
    scored = torch.where((b["roles"] == Role.REASONING) & ~valid, 0, b["roles"])
    assert bool((scored != b["roles"]).any())
    want = role_aware_advantages(b["seq"], b["old"], b["corrupt"], b["ablated"].nan_to_num(0.0), scored,
                                 mask=b["response_mask"].bool())
    torch.testing.assert_close(out, want.advantages, rtol=1e-6, atol=1e-6)


def test_srpo_conversion_without_ablated_pass_scores_reasoning_like_other():
    b = verl_like_batch(seed=4)
    out, stats = adapter.srpo_token_advantages(
        b["advantages"], b["response_mask"], b["old"], logp_corrupt=b["corrupt"], logp_ablated=None,
        roles=b["roles"])
    roles_p = torch.where(b["roles"] == Role.REASONING, 0, b["roles"])
    want = role_aware_advantages(b["seq"], b["old"], b["corrupt"], None, roles_p, mask=b["response_mask"].bool())
    torch.testing.assert_close(out, want.advantages, rtol=1e-6, atol=1e-6)
    assert stats["srpo/reasoning/count"] == 0


def test_vppo_estimator_folds_the_loss_mask_into_the_advantages():
    b = verl_like_batch(seed=5)
    opts = AdapterOptions(vppo_beta_min=0.8, vppo_top_k=0.5)
    out, stats = adapter.srpo_token_advantages(b["advantages"], b["response_mask"], b["old"],
                                               logp_corrupt=b["corrupt"], estimator="vppo", options=opts)
    v = vppo_advantages(b["seq"], b["old"], b["corrupt"], mask=b["response_mask"].bool(), beta_min=0.8, top_k=0.5)
    torch.testing.assert_close(out, torch.where(v.loss_mask, v.advantages, 0.0))
    assert stats["vppo/mask_fraction"] == pytest.approx(v.stats["vppo/mask_fraction"])


def test_sequence_advantages_rejects_per_token_estimators():
    mask = torch.ones(2, 3, dtype=torch.int64)
    gae_like = torch.tensor([[1.0, 0.5, 0.2], [0.3, 0.3, 0.3]])
    with pytest.raises(ValueError, match="varies along response 0.*GAE"):
        sequence_advantages(gae_like, mask)
    assert sequence_advantages(torch.tensor([[2.0, 2.0, 0.0]]), torch.tensor([[1, 1, 0]])).tolist() == [2.0]
    assert sequence_advantages(torch.zeros(1, 3), torch.zeros(1, 3)).tolist() == [0.0]


def test_adapter_options_from_mapping():
    opts = AdapterOptions.from_mapping({"beta_perception": 0.2, "corruption_p": 0.3, "ablation_mode": "off"})
    assert opts.srpo.beta_perception == 0.2 and opts.corruption_p == 0.3 and not opts.ablates
    with pytest.raises(ValueError, match="unknown option `beta_perceptoin` .did you mean `beta_perception`"):
        AdapterOptions.from_mapping({"beta_perceptoin": 0.2})
    assert adapter.options_from_config({"srpo": {"u_max": 2.0}}).srpo.u_max == 2.0
    assert adapter.options_from_config(None) == AdapterOptions()


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("corruption_p", 1.5, r"must be a number in \[0, 1\], got 1.5"),
    ("corruption_mode", "blur", r"must be one of \('black', 'mean', 'noise'\), got 'blur'"),
    ("seed", "x", r"must be an integer >= 0, got 'x'"),
    ("ablate", "maybe", r"must be a boolean \(true/false, 1/0, yes/no\), got 'maybe'"),
    ("ablation_mode", "zero", r"must be one of \('mask', 'drop', 'counterfactual', 'off'\), got 'zero'"),
    ("beta_perception", -1.0, r"must be >= 0, got -1.0"),
    ("u_max", "big", r"must be a number, got 'big'"),
    ("vppo_top_k", 0, r"must be a number in \(0, 1\], got 0"),
])
def test_verl_options_are_checked_naming_the_hydra_key(key, value, expected):
    with pytest.raises(ValueError, match=rf"srpo \(verl\): `algorithm\.srpo\.{key}` {expected}"):
        adapter.options_from_config({"srpo": {key: value}})


def test_options_parse_strings_and_read_old_names_with_a_warning():
    opts = adapter.options_from_config({"srpo": {"corruption_p": "0.25", "seed": "7", "beta_reasoning": "0.1"}})
    assert (opts.corruption_p, opts.seed, opts.srpo.beta_reasoning) == (0.25, 7, 0.1)
    for text, on in [("false", False), ("No", False), ("0", False), ("true", True), ("YES", True), ("1", True)]:
        with pytest.warns(OptionDeprecationWarning, match="`algorithm.srpo.ablate` is deprecated.*ablation_mode=off"):
            opts = adapter.options_from_config({"srpo": {"ablate": text}})
        assert opts.ablates is on, text  # the string "false" turns the pass off
    with pytest.warns(OptionDeprecationWarning, match="`algorithm.srpo.corrupt_p` is deprecated.*`algorithm.srpo."
                                                      "corruption_p`"):
        assert adapter.options_from_config({"srpo": {"corrupt_p": 0.3}}).corruption_p == 0.3
    with pytest.warns(OptionDeprecationWarning, match="corrupt_mode"):
        assert adapter.options_from_config({"srpo": {"corrupt_mode": "noise"}}).corruption_mode == "noise"
    with pytest.warns(OptionDeprecationWarning), pytest.raises(ValueError, match="disagree"):
        adapter.options_from_config({"srpo": {"corrupt_p": 0.3, "corruption_p": 0.4}})
    with pytest.warns(OptionDeprecationWarning, match="AdapterOptions.corrupt_p is deprecated"):
        assert AdapterOptions(corruption_p=0.2).corrupt_p == 0.2
    with pytest.raises(ValueError, match="AdapterOptions: `corruption_p` must be a number in"):
        AdapterOptions(corruption_p=1.5)


def _qwen_inputs(grid=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = grid[0] * grid[1] * grid[2]
    return {"pixel_values": torch.randn(rows, 3 * 2 * 14 * 14, generator=g), "image_grid_thw": torch.tensor([grid])}


def test_corrupt_multi_modal_inputs_one_mask_per_group_and_input_untouched():
    samples = [_qwen_inputs(seed=i // 2) for i in range(4)]  # two prompts, two responses each
    before = [s["pixel_values"].clone() for s in samples]
    mm = np.array(samples, dtype=object)
    out = corrupt_multi_modal_inputs(mm, torch.tensor([0, 0, 1, 1]), p=0.5, seed=7)
    for s, b0 in zip(samples, before, strict=True):
        assert torch.equal(s["pixel_values"], b0)
    assert torch.equal(out[0]["pixel_values"], out[1]["pixel_values"])
    assert not torch.equal(out[0]["pixel_values"], samples[0]["pixel_values"])
    assert out[0]["image_grid_thw"] is samples[0]["image_grid_thw"]
    changed0 = (out[0]["pixel_values"] != samples[0]["pixel_values"]).any(1)
    changed2 = (out[2]["pixel_values"] != samples[2]["pixel_values"]).any(1)
    assert not torch.equal(changed0, changed2)  # different prompts, different masks (for this seed)
    text_only = corrupt_multi_modal_inputs(np.array([{}], dtype=object), torch.tensor([0]))
    assert text_only[0] == {}


def test_perception_span_hidden_and_realign_compact():
    roles = torch.tensor([[2, 1, 1, 2, 0, 2], [1, 2, 2, 0, 0, 0]])
    response_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    attention = torch.cat([torch.tensor([[0, 1], [1, 1]]), response_mask], dim=1)
    hidden = perception_span_hidden(attention, response_mask, roles)
    assert hidden.tolist() == [[0, 1, 1, 0, 0, 1, 1, 1], [1, 1, 0, 1, 1, 0, 0, 0]]
    kept = response_mask.bool() & (roles != Role.PERCEPTION)
    compact = torch.tensor([[10.0, 13.0, 14.0, 15.0, 0.0, 0.0], [21.0, 22.0, 0.0, 0.0, 0.0, 0.0]])
    out = realign_compact(compact, kept)
    assert out.tolist() == [[10.0, 0.0, 0.0, 13.0, 14.0, 15.0], [0.0, 21.0, 22.0, 0.0, 0.0, 0.0]]


def test_importing_the_adapters_imports_no_framework():
    code = ("import sys, srpo_core, srpo_core.adapters.verl, srpo_core.adapters.easyr1, srpo_core.adapters.openrlhf;"
            "bad = [m for m in ('verl', 'openrlhf', 'ray', 'deepspeed', 'vllm') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- part 2: the real verl
@pytest.fixture(scope="module")
def verl_mods():
    if not HAVE_VERL:
        pytest.skip("upstream verl is not installed")
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo import core_algos, ray_trainer

    adapter.install()
    return DataProto, core_algos, ray_trainer, OmegaConf


@needs_verl
def test_install_registers_and_patches_idempotently(verl_mods):
    _, core_algos, ray_trainer, _ = verl_mods
    patched = ray_trainer.compute_advantage
    adapter.install()
    assert ray_trainer.compute_advantage is patched and hasattr(patched, "__srpo_original__")
    for name in ("srpo", "vppo"):
        with pytest.raises(RuntimeError, match="install"):
            core_algos.get_adv_estimator_fn(name)()


def _dataproto(DataProto, b, extra=None):  # noqa: N803 - verl's class
    tensors = {"response_mask": b["response_mask"], "old_log_probs": b["old"], "srpo_logp_corrupt": b["corrupt"],
               "srpo_logp_ablated": b["ablated"], "srpo_roles": b["roles"],
               "token_level_rewards": b["rewards_tok"], **(extra or {})}
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": b["uids"]})


@needs_verl
@pytest.mark.parametrize("norm", [True, False], ids=["grpo", "dr_grpo"])
def test_patched_compute_advantage_on_a_real_dataproto(verl_mods, norm):
    DataProto, core_algos, ray_trainer, OmegaConf = verl_mods  # noqa: N806
    b = verl_like_batch(seed=11)
    last = (b["response_mask"].sum(1) - 1).clamp(min=0)
    rewards = torch.arange(8, dtype=torch.float32) % 3
    b["rewards_tok"] = torch.zeros_like(b["old"]).nan_to_num(0.0)
    b["rewards_tok"][torch.arange(8), last] = rewards * (b["response_mask"].sum(1) > 0)
    config = OmegaConf.create({"srpo": {"beta_perception": 0.6}})
    data = ray_trainer.compute_advantage(_dataproto(DataProto, b), "srpo", norm_adv_by_std_in_grpo=norm,
                                         config=config)
    # verl's own GRPO on the same batch, then our conversion by hand.
    grpo, _ = core_algos.compute_grpo_outcome_advantage(b["rewards_tok"], b["response_mask"], b["uids"],
                                                        norm_adv_by_std_in_grpo=norm)
    want, _ = adapter.srpo_token_advantages(grpo, b["response_mask"], b["old"], logp_corrupt=b["corrupt"],
                                            logp_ablated=b["ablated"], roles=b["roles"],
                                            options=AdapterOptions(srpo=SRPOConfig(beta_perception=0.6)))
    torch.testing.assert_close(data.batch["advantages"], want)
    torch.testing.assert_close(data.batch["returns"], want)
    assert "srpo/perception/mu" in data.meta_info["srpo_metrics"]
    # Other estimators are verl's, untouched.
    plain = ray_trainer.compute_advantage(_dataproto(DataProto, b), "grpo", norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(plain.batch["advantages"], grpo)
    # A batch without the contrast passes is refused with the fix in the message.
    bare = DataProto.from_dict(tensors={"response_mask": b["response_mask"], "token_level_rewards": b["rewards_tok"],
                                        "old_log_probs": b["old"]}, non_tensors={"uid": b["uids"]})
    with pytest.raises(KeyError, match="SRPORayPPOTrainer"):
        ray_trainer.compute_advantage(bare, "srpo")


@needs_verl
def test_tested_verl_version(verl_mods):
    import verl

    assert verl.__version__ in adapter.TESTED_VERL, (verl.__version__, adapter.TESTED_VERL)


@needs_verl
def test_v1_trainer_path_reaches_the_same_estimator(verl_mods):
    """verl 0.9's v1 trainer imports ``compute_advantage`` by name into ``ppo.v1.utils`` and sends every estimator
    but ``grpo`` through it from ``compute_advantage_for_multi_trajectories``: after ``install()`` that call gives
    the legacy path's SRPO advantages, on the real v1 code."""
    DataProto, _, ray_trainer, OmegaConf = verl_mods  # noqa: N806
    from verl.trainer.ppo.v1 import utils as v1_utils

    assert v1_utils.compute_advantage is ray_trainer.compute_advantage
    patched = v1_utils.compute_advantage
    # v1.utils imported before install() holds verl's own function: install() replaces that reference too
    v1_utils.compute_advantage = patched.__srpo_original__
    adapter.install()
    assert v1_utils.compute_advantage is patched
    adapter.install()
    assert v1_utils.compute_advantage is ray_trainer.compute_advantage is patched  # idempotent
    b = verl_like_batch(seed=5)
    last = (b["response_mask"].sum(1) - 1).clamp(min=0)
    b["rewards_tok"] = torch.zeros_like(b["old"]).nan_to_num(0.0)
    b["rewards_tok"][torch.arange(8), last] = (torch.arange(8, dtype=torch.float32) % 2) * (b["response_mask"].sum(1)
                                                                                            > 0)
    config = OmegaConf.create({"srpo": {"beta_reasoning": 0.8}})
    keys = [f"{u}_0_0" for u in b["uids"]]  # {uid}_{session}_{index}, as the v1 agent loop names rows
    v1 = v1_utils.compute_advantage_for_multi_trajectories(_dataproto(DataProto, b), batch_keys=keys,
                                                           adv_estimator="srpo", num_repeat=4, config=config)
    legacy = ray_trainer.compute_advantage(_dataproto(DataProto, b), "srpo", num_repeat=4, config=config)
    torch.testing.assert_close(v1.batch["advantages"], legacy.batch["advantages"])
    grpo = ray_trainer.compute_advantage(_dataproto(DataProto, b), "grpo")
    assert not torch.allclose(v1.batch["advantages"], grpo.batch["advantages"])  # SRPO, not GRPO, ran


@needs_verl
def test_entry_point_picks_the_task_runner_by_use_v1(verl_mods):
    _, _, _, OmegaConf = verl_mods  # noqa: N806
    import os

    import verl
    from verl.trainer import main_ppo, main_ppo_v0

    default = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer", "config", "ppo_trainer.yaml"))
    assert default.trainer.use_v1 is True  # verl 0.9.1's default
    assert adapter.task_runner_name(default) == "SRPOTaskRunnerV1Remote"
    assert adapter.task_runner_name(OmegaConf.create({"trainer": {"use_v1": False}})) == "SRPOTaskRunnerRemote"
    assert issubclass(adapter.SRPOTaskRunnerV1, main_ppo.TaskRunnerV1.__ray_actor_class__)
    assert issubclass(adapter.SRPOTaskRunner, main_ppo_v0.TaskRunner.__ray_actor_class__)


class BigramVLM:
    """``log p(next | prev, image) = log_softmax(W[prev] + m(image) · u)[next]``, ``m`` = mean pixel value."""

    def __init__(self, vocab=13, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(vocab, vocab, generator=g, dtype=torch.float64)
        self.u = torch.randn(vocab, generator=g, dtype=torch.float64) * 3

    def logp(self, prev: int, nxt: int, m: float) -> float:
        return float(torch.log_softmax(self.W[prev] + m * self.u, -1)[nxt])


class BigramWorkerGroup:
    """Stands in for verl's actor worker group on the engine path: ``compute_log_prob(TensorDict) -> TensorDict``
    with, for every kept token of the padding-free sequence, the log-prob of the *next* kept token."""

    def __init__(self, model):
        self.model = model
        self.seen_pixel_means = []
        self.seen_positions = []

    def compute_log_prob(self, td):
        from verl.utils import tensordict_utils as tu

        ids = tu.get(td, "input_ids")
        mm = tu.get(td, "multi_modal_inputs")
        means = [float(s["pixel_values"].double().mean()) for s in mm]
        self.seen_pixel_means.append(means)
        self.seen_positions.append([p.tolist() for p in tu.get(td, "position_ids").unbind()])
        rows = []
        for seq, m in zip(ids.unbind(), means, strict=True):
            s = seq.tolist()
            rows.append(torch.tensor([self.model.logp(s[p], s[p + 1], m) for p in range(len(s) - 1)] + [0.0]))
        lp = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
        ent = torch.nested.as_nested_tensor([torch.zeros_like(r) for r in rows], layout=torch.jagged)
        return tu.get_tensordict({"log_probs": lp, "entropy": ent}, non_tensor_dict={"metrics": {"mfu": 0.0}})


def _ragged_batch(DataProto):  # noqa: N803 - verl's class
    """Four responses, two per prompt (groups by ``uid``), left-padded prompts and right-padded responses of
    different lengths, roles per token, Qwen-VL inputs one image per prompt: the batch of the old-log-prob tests."""
    g = torch.Generator().manual_seed(0)
    V, P, R, n = 13, 4, 7, 2  # noqa: N806
    prompt_lens, resp_lens = [3, 4, 2, 4], [7, 5, 6, 1]
    bs = len(prompt_lens)
    prompts = torch.zeros(bs, P, dtype=torch.int64)
    responses = torch.zeros(bs, R, dtype=torch.int64)
    attn = torch.zeros(bs, P + R, dtype=torch.int64)
    for i in range(bs):
        prompts[i, P - prompt_lens[i]:] = torch.randint(1, V, (prompt_lens[i],), generator=g)
        responses[i, :resp_lens[i]] = torch.randint(1, V, (resp_lens[i],), generator=g)
        attn[i, P - prompt_lens[i]:P] = 1
        attn[i, P:P + resp_lens[i]] = 1
    response_mask = attn[:, P:].clone()
    roles = torch.tensor([[2, 1, 1, 2, 0, 2, 2], [1, 1, 2, 2, 2, 0, 0], [0, 2, 2, 2, 1, 2, 0], [2, 0, 0, 0, 0, 0, 0]])
    roles = roles * response_mask
    position_ids = (torch.cumsum(attn, 1) - 1).clamp(min=0)
    uids = np.array([str(uuid.UUID(int=i // n)) for i in range(bs)], dtype=object)
    mm = np.array([_qwen_inputs(seed=i // n) for i in range(bs)], dtype=object)
    batch = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                 "attention_mask": attn, "position_ids": position_ids, "response_mask": response_mask,
                 "srpo_roles": roles},
        non_tensors={"uid": uids, "multi_modal_inputs": mm})
    return types.SimpleNamespace(V=V, P=P, R=R, bs=bs, prompt_lens=prompt_lens, resp_lens=resp_lens, prompts=prompts,
                                 responses=responses, attn=attn, response_mask=response_mask, roles=roles, uids=uids,
                                 mm=mm, batch=batch)


@needs_verl
@pytest.mark.parametrize("mode", ["mask", "drop", "counterfactual"])
def test_trainer_old_log_prob_runs_each_ablation_mode(verl_mods, mode):
    """The legacy trainer's ablated pass in each mode through verl's own padding-free ``_compute_old_log_prob``:
    every ``ℓ°`` and the positions the worker received checked by hand; then the whole advantage step equals
    ``role_aware_advantages`` on the roles as given (the token after a hidden span keeps its value in ``mask``: the
    padding-free pass predicts it from the visible row before the span, D187)."""
    DataProto, core_algos, ray_trainer, OmegaConf = verl_mods  # noqa: N806
    from srpo_core.ablation import counterfactual_donors

    b = _ragged_batch(DataProto)
    V, P, R, bs, prompt_lens, resp_lens = b.V, b.P, b.R, b.bs, b.prompt_lens, b.resp_lens  # noqa: N806
    prompts, responses, response_mask, roles = b.prompts, b.responses, b.response_mask, b.roles
    uids, batch = b.uids, b.batch
    model = BigramVLM(V)
    trainer = object.__new__(adapter.SRPORayPPOTrainer)
    trainer.config = OmegaConf.create({"algorithm": {"adv_estimator": "srpo", "srpo": {
        "ablation_mode": mode, "beta_reasoning": 1.0}}, "actor_rollout_ref": {"actor": {}}})
    trainer.actor_rollout_wg = BigramWorkerGroup(model)
    trainer.tokenizer = None
    trainer.global_steps = 1
    old, _mfu = trainer._compute_old_log_prob(batch)
    clean_m = trainer.actor_rollout_wg.seen_pixel_means[0]
    assert trainer.actor_rollout_wg.seen_pixel_means[2] == clean_m  # the ablated pass sees the clean image
    span = (roles == Role.PERCEPTION) & response_mask.bool()
    donors = counterfactual_donors(group_ids(uids), "group", input_ids=responses, span_mask=span).tolist()
    ablated, valid = old.batch["srpo_logp_ablated"], old.batch["srpo_ablated_valid"].bool()
    seen_positions = trainer.actor_rollout_wg.seen_positions[2]
    for i in range(bs):
        prompt, resp = prompts[i, P - prompt_lens[i]:].tolist(), responses[i, :resp_lens[i]].tolist()
        r = roles[i, :resp_lens[i]].tolist()
        d = donors[i]
        lend = (responses[d, :resp_lens[d]].tolist(), roles[d, :resp_lens[d]].tolist()) if d >= 0 else None
        want = expected_ablated(prompt, resp, r, mode, lend)
        for j, w in want.items():
            if w is None:
                assert not bool(valid[i, j]), (mode, i, j)
                continue
            prev, pos = w
            assert bool(valid[i, j]), (mode, i, j)
            assert float(ablated[i, j]) == pytest.approx(model.logp(prev, resp[j], clean_m[i]), abs=1e-5), (i, j)
            assert pos in seen_positions[i], (mode, i, j, pos, seen_positions[i])
        if mode != "mask":  # the rebuilt sequence is numbered 0, 1, 2, ... like any other
            assert seen_positions[i] == list(range(len(seen_positions[i]))), (i, seen_positions[i])
    assert not bool(valid[~response_mask.bool()].any())

    batch = batch.union(old)
    rewards = torch.zeros(bs, R)
    rewards[torch.arange(bs), (response_mask.sum(1) - 1)] = torch.tensor([1.0, 0.0, 0.5, 1.0])
    batch.batch["token_level_rewards"] = rewards
    out = ray_trainer.compute_advantage(batch, "srpo", config=trainer.config.algorithm)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, response_mask, uids)
    scored = torch.where((roles == Role.REASONING) & ~valid, 0, roles)
    if mode == "mask":
        assert torch.equal(scored, roles)  # row 0's token 3 follows the hidden span and keeps its signal
        assert roles[0, 3] == Role.REASONING and roles[0, 2] == Role.PERCEPTION
    want = role_aware_advantages(sequence_advantages(grpo, response_mask), old.batch["old_log_probs"],
                                 old.batch["srpo_logp_corrupt"], ablated, scored, mask=response_mask.bool(),
                                 config=SRPOConfig(beta_reasoning=1.0))
    torch.testing.assert_close(out.batch["advantages"], want.advantages.to(out.batch["advantages"].dtype))


@needs_verl
def test_trainer_old_log_prob_adds_the_contrast_passes(verl_mods):
    DataProto, _, ray_trainer, OmegaConf = verl_mods  # noqa: N806
    trainer_cls = adapter.SRPORayPPOTrainer
    assert issubclass(trainer_cls, ray_trainer.RayPPOTrainer)
    from verl.trainer import main_ppo_v0

    assert issubclass(adapter.SRPOTaskRunner, main_ppo_v0.TaskRunner.__ray_actor_class__)

    b = _ragged_batch(DataProto)
    V, P, R, bs, prompt_lens, resp_lens = b.V, b.P, b.R, b.bs, b.prompt_lens, b.resp_lens  # noqa: N806
    prompts, responses, attn, response_mask, roles = b.prompts, b.responses, b.attn, b.response_mask, b.roles
    mm, batch = b.mm, b.batch

    model = BigramVLM(V)
    trainer = object.__new__(trainer_cls)
    trainer.config = OmegaConf.create({"algorithm": {"adv_estimator": "srpo", "srpo": {
        "seed": 3, "corruption_p": 0.9, "ablation_mode": "mask"}}, "actor_rollout_ref": {"actor": {}}})
    trainer.actor_rollout_wg = BigramWorkerGroup(model)
    trainer.tokenizer = None
    trainer.global_steps = 1
    old, _mfu = trainer._compute_old_log_prob(batch)
    assert len(trainer.actor_rollout_wg.seen_pixel_means) == 3  # clean, corrupted, ablated passes

    clean_m, corrupt_m, ablated_m = trainer.actor_rollout_wg.seen_pixel_means
    assert clean_m == ablated_m, (clean_m, ablated_m)
    assert all(a != b for a, b in zip(clean_m, corrupt_m, strict=True)), (clean_m, corrupt_m)
    assert corrupt_m[0] == corrupt_m[1] and corrupt_m[2] == corrupt_m[3]  # one corrupted image per prompt
    # The batch itself is untouched: clean pixels and attention mask.
    assert batch.non_tensor_batch["multi_modal_inputs"] is mm and torch.equal(batch.batch["attention_mask"], attn)

    for i in range(bs):
        seq = prompts[i, P - prompt_lens[i]:].tolist()
        resp = responses[i, :resp_lens[i]].tolist()
        full = seq + resp
        for j, tok in enumerate(resp):
            prev = full[len(seq) + j - 1]
            assert float(old.batch["old_log_probs"][i, j]) == pytest.approx(model.logp(prev, tok, clean_m[i]),
                                                                              abs=1e-5)
            assert float(old.batch["srpo_logp_corrupt"][i, j]) == pytest.approx(
                model.logp(prev, tok, corrupt_m[i]), abs=1e-5)
            if roles[i, j] != Role.PERCEPTION:
                # Ablated: the previous token that is not a perception token of the response.
                k = len(seq) + j - 1
                while k >= len(seq) and roles[i, k - len(seq)] == Role.PERCEPTION:
                    k -= 1
                assert float(old.batch["srpo_logp_ablated"][i, j]) == pytest.approx(
                    model.logp(full[k], tok, clean_m[i]), abs=1e-5), (i, j)
    assert torch.equal(old.batch["srpo_roles"], roles)

    # The whole step: union, rewards, the patched compute_advantage.
    batch = batch.union(old)
    rewards = torch.zeros(bs, R)
    rewards[torch.arange(bs), (response_mask.sum(1) - 1)] = torch.tensor([1.0, 0.0, 0.5, 1.0])
    batch.batch["token_level_rewards"] = rewards
    out = ray_trainer.compute_advantage(batch, "srpo", config=trainer.config.algorithm)
    assert out.batch["advantages"].shape == (bs, R)
    assert bool(torch.isfinite(out.batch["advantages"]).all())


# --------------------------------------------------------------------------- part 3: the v1 trainer, on a real TQ
@pytest.fixture(scope="module")
def transfer_queue(verl_mods):
    """A local Ray (logical CPUs only; the TQ controller and storage are actors) and a real TransferQueue."""
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import transfer_queue as tq

    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        tq.init({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}})
        yield tq
        tq.close()
    finally:
        ray.shutdown()


class TQBigramWorkerGroup(BigramWorkerGroup):
    """The bigram worker behind verl's real ``tqbridge``: ``KVBatchMeta`` in, samples read from and log-probs written
    to the TransferQueue, as the v1 engine workers do."""

    def __init__(self, model):
        super().__init__(model)
        from verl.utils.transferqueue_utils import tqbridge

        self.compute_log_prob = tqbridge()(super().compute_log_prob)


def _v1_samples(bs, n, V, g):  # noqa: N803
    """Samples as verl's v1 agent loop stores them (no padding, ``{uid}_{session}_{index}`` keys)."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    prompt_lens, resp_lens = [3, 4, 2, 4], [7, 5, 6, 1]
    roles = [[2, 1, 1, 2, 0, 2, 2], [1, 1, 2, 2, 2], [0, 2, 2, 2, 1, 2], [2]]
    rows, keys = [], []
    for i in range(bs):
        uid = str(uuid.UUID(int=i // n))
        prompt = torch.randint(1, V, (prompt_lens[i],), generator=g)
        resp = torch.randint(1, V, (resp_lens[i],), generator=g)
        ids = torch.cat([prompt, resp])
        rows.append({"prompts": prompt, "responses": resp, "input_ids": ids,
                     "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(len(ids)),
                     "response_mask": torch.ones_like(resp), "loss_mask": torch.ones_like(resp),
                     "srpo_roles": torch.tensor(roles[i]), "rm_scores": torch.zeros(resp_lens[i]),
                     "multi_modal_inputs": _qwen_inputs(seed=i // n), "uid": uid})
        rows[-1]["rm_scores"][-1] = [1.0, 0.0, 0.5, 1.0][i]
        keys.append(f"{uid}_{i % n}_0")
    return keys, rows, list_of_dict_to_tensordict(rows)


@needs_verl
@pytest.mark.parametrize("mode", ["mask", "drop", "counterfactual", "off"])
def test_v1_trainer_adds_the_contrast_passes_through_the_transfer_queue(verl_mods, transfer_queue, mode):
    """verl's own v1 ``_compute_old_log_prob`` and ``_compute_advantage`` (``PPOTrainerSync``), on samples in a
    real TransferQueue, with the bigram worker behind ``tqbridge``: every SRPO log-prob checked by hand, and the
    advantages equal to the legacy path's on the same numbers."""
    DataProto, _, ray_trainer, OmegaConf = verl_mods  # noqa: N806
    tq = transfer_queue
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1 import PPOTrainerSync

    trainer_cls = adapter.srpo_v1_trainer_class(PPOTrainerSync)
    assert issubclass(trainer_cls, PPOTrainerSync) and adapter.srpo_v1_trainer_class(PPOTrainerSync) is trainer_cls

    V, n, bs = 13, 2, 4  # noqa: N806
    keys, rows, td = _v1_samples(bs, n, V, torch.Generator().manual_seed(0))
    tags = [{"seq_len": len(r["input_ids"])} for r in rows]
    tq.kv_batch_put(keys=keys, partition_id="train", fields=td, tags=tags)
    batch = KVBatchMeta(keys=keys, tags=tags, partition_id="train")

    model = BigramVLM(V)
    trainer = object.__new__(trainer_cls)
    trainer.config = OmegaConf.create({
        "algorithm": {"adv_estimator": "srpo", "srpo": {"seed": 3, "corruption_p": 0.9, "ablation_mode": mode},
                      "use_kl_in_reward": False,
                      "gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True},
        "actor_rollout_ref": {"actor": {"loss_agg_mode": "token-mean", "loss_scale_factor": None},
                              "rollout": {"temperature": 1.0, "calculate_log_probs": False, "n": n}}})
    trainer.actor_rollout_wg = TQBigramWorkerGroup(model)
    trainer.tokenizer = None
    trainer.global_steps = 1
    metrics = {}
    batch = trainer._compute_old_log_prob(batch, metrics=metrics)
    # clean, corrupted, ablated passes ("off": no ablated pass)
    assert len(trainer.actor_rollout_wg.seen_pixel_means) == (2 if mode == "off" else 3)
    assert tq.kv_list(adapter.V1_CONTRAST_PARTITION).get(adapter.V1_CONTRAST_PARTITION, {}) == {}  # cleared
    clean_m, corrupt_m = trainer.actor_rollout_wg.seen_pixel_means[:2]
    assert mode == "off" or trainer.actor_rollout_wg.seen_pixel_means[2] == clean_m
    assert all(a != b for a, b in zip(clean_m, corrupt_m, strict=True))
    assert corrupt_m[0] == corrupt_m[1] and corrupt_m[2] == corrupt_m[3]  # one corrupted image per prompt

    ablated_keys = () if mode == "off" else ("srpo_logp_ablated", "srpo_ablated_valid")
    got = tq.kv_batch_get(keys=keys, partition_id="train").select(
        "old_log_probs", "srpo_logp_corrupt", "srpo_roles", "response_mask", *ablated_keys).to_padded_tensor()
    from srpo_core.ablation import counterfactual_donors

    padded_resp = torch.nn.utils.rnn.pad_sequence([r["responses"] for r in rows], batch_first=True)
    span = torch.nn.utils.rnn.pad_sequence([r["srpo_roles"] == Role.PERCEPTION for r in rows], batch_first=True)
    donors = counterfactual_donors(group_ids([r["uid"] for r in rows]), "group", input_ids=padded_resp,
                                   span_mask=span).tolist()
    seen_positions = trainer.actor_rollout_wg.seen_positions[-1]
    for i, r in enumerate(rows):
        seq, resp, roles = r["prompts"].tolist(), r["responses"].tolist(), r["srpo_roles"]
        full = seq + resp
        d = donors[i]
        lend = (rows[d]["responses"].tolist(), rows[d]["srpo_roles"].tolist()) if d >= 0 else None
        want = expected_ablated(seq, resp, roles.tolist(), mode, lend)
        for j, tok in enumerate(resp):
            prev = full[len(seq) + j - 1]
            assert float(got["old_log_probs"][i, j]) == pytest.approx(model.logp(prev, tok, clean_m[i]), abs=1e-5)
            assert float(got["srpo_logp_corrupt"][i, j]) == pytest.approx(model.logp(prev, tok, corrupt_m[i]),
                                                                          abs=1e-5)
            if mode == "off":
                continue
            if want[j] is None:
                assert float(got["srpo_ablated_valid"][i, j]) == 0.0, (mode, i, j)
                continue
            assert float(got["srpo_ablated_valid"][i, j]) == 1.0, (mode, i, j)
            assert float(got["srpo_logp_ablated"][i, j]) == pytest.approx(
                model.logp(want[j][0], tok, clean_m[i]), abs=1e-5), (mode, i, j)
            assert want[j][1] in seen_positions[i], (mode, i, j)
        if mode in ("drop", "counterfactual"):
            assert seen_positions[i] == list(range(len(seen_positions[i]))), (i, seen_positions[i])

    # verl's v1 advantage step: the srpo_* fields reach the estimator; the result is the legacy path's.
    metrics = {}
    batch = trainer._compute_advantage(batch, metrics=metrics)
    assert "srpo/perception/mu" in metrics
    adv = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"]).to_padded_tensor()
    scores = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["rm_scores"]).to_padded_tensor()
    legacy = DataProto.from_dict(
        tensors={"response_mask": got["response_mask"], "old_log_probs": got["old_log_probs"],
                 "srpo_logp_corrupt": got["srpo_logp_corrupt"], **{k: got[k] for k in ablated_keys},
                 "srpo_roles": got["srpo_roles"], "token_level_rewards": scores["rm_scores"]},
        non_tensors={"uid": np.array([r["uid"] for r in rows], dtype=object)})
    want = ray_trainer.compute_advantage(legacy, "srpo", num_repeat=n, config=trainer.config.algorithm)
    torch.testing.assert_close(adv["advantages"], want.batch["advantages"])
    grpo = ray_trainer.compute_advantage(legacy, "grpo", num_repeat=n)
    assert not torch.allclose(adv["advantages"], grpo.batch["advantages"])  # SRPO, not GRPO, ran
    assert adapter._V1_STEP.get() is None
    tq.kv_clear(keys=keys, partition_id="train")


def test_v1_refuses_settings_whose_contrast_would_be_wrong():
    """Before any pass runs: later agent-loop outputs of a session, rollout-correction bypass mode (old log-probs from
    the engine), and separate-async sub-steps after the first (old log-probs from restored π_old weights)."""
    from types import SimpleNamespace

    from srpo_core.adapters.verl import _v1_refuse_unsupported

    def trainer(bypass=False, cls_name="PPOTrainerSync", trigger=0):
        cfg = SimpleNamespace(algorithm={"rollout_correction": {"bypass_mode": bypass}})
        return type(cls_name, (), {"config": cfg, "local_trigger_step": trigger})()

    ok = SimpleNamespace(keys=["a_0", "b_0"])
    _v1_refuse_unsupported(trainer(), ok, "srpo")
    _v1_refuse_unsupported(trainer(trigger=2), ok, "srpo")  # sync trainer: the contrast uses the same weights
    _v1_refuse_unsupported(trainer(cls_name="PPOTrainerSeparateAsync"), ok, "srpo")
    with pytest.raises(NotImplementedError, match="several outputs"):
        _v1_refuse_unsupported(trainer(), SimpleNamespace(keys=["a_0", "a_1"]), "srpo")
    with pytest.raises(NotImplementedError, match="bypass_mode"):
        _v1_refuse_unsupported(trainer(bypass=True), ok, "srpo")
    with pytest.raises(NotImplementedError, match="parameter_sync_step"):
        _v1_refuse_unsupported(trainer(cls_name="PPOTrainerSeparateAsync", trigger=1), ok, "vppo")


def test_every_ablation_mode_is_accepted_and_the_default_is_the_one_constant():
    from srpo_core.ablation import DEFAULT_ABLATION_MODE

    assert AdapterOptions().ablation_mode == DEFAULT_ABLATION_MODE
    assert adapter.options_from_config({}).ablation_mode == DEFAULT_ABLATION_MODE
    for mode in ("mask", "drop", "counterfactual", "off"):
        assert adapter.options_from_config({"srpo": {"ablation_mode": mode}}).ablation_mode == mode


@needs_verl
def test_trainers_check_the_options_when_built(verl_mods):
    """A bad ``algorithm.srpo`` value fails when the trainer is constructed (before workers or rollouts), naming the
    Hydra key, on the legacy trainer and on each v1 trainer class."""
    _, _, _, OmegaConf = verl_mods  # noqa: N806
    from verl.trainer.ppo.v1 import PPOTrainerSync

    bad = OmegaConf.create({"algorithm": {"adv_estimator": "srpo", "srpo": {"ablate": "false!"}}})
    with pytest.raises(ValueError, match=r"`algorithm\.srpo\.ablate` must be a boolean .*got 'false!'"):
        adapter.SRPORayPPOTrainer(bad, None, None, None)
    with pytest.raises(ValueError, match=r"`algorithm\.srpo\.corruption_mode` must be one of .*got 'blur'"):
        adapter.srpo_v1_trainer_class(PPOTrainerSync)(OmegaConf.create({"algorithm": {"srpo": {
            "corruption_mode": "blur"}}}))


def test_any_seed_the_options_accept_is_a_valid_generator_seed():
    """``seed`` is an integer >= 0 with no upper bound; the derived generator seeds stay within torch's range (a seed
    of 10**12 used to overflow ``manual_seed`` in the first corrupted pass)."""
    opts = adapter.options_from_config({"srpo": {"seed": 10**12}})
    samples = np.array([_qwen_inputs()], dtype=object)
    out = corrupt_multi_modal_inputs(samples, torch.tensor([0]), seed=opts.seed * 100_003 + 5)
    assert out[0]["pixel_values"].shape == samples[0]["pixel_values"].shape
