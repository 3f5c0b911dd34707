"""OpenRLHF adapter against the real OpenRLHF 0.11.2 (``make test-openrlhf``; skipped where it is not installed).

Real: OpenRLHF's ``Experience``, ``RemoteExperienceMaker.make_experience_batch`` (its micro-batch split,
``make_experience`` and ``compute_advantages_and_returns`` with the ``group_norm`` estimator), its
``RayActorGroup.async_run_method_batch`` and ``BaseModelActor.execute_batch`` dispatch on a real local Ray, and the
``openrlhf.cli.train_ppo_ray`` entry point with its own argument parser and checks. Stand-ins: the model inside the
Ray actor (a fixed function of the tokens and pixels, in place of a DeepSpeed actor on a GPU) and the CUDA-only
``flash_attn`` (tests/openrlhf_shim: only the names ``openrlhf.models.ring_attn_utils`` imports, each raising if
called), put at the end of ``sys.path`` only when no real ``flash_attn`` imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

SHIM = str(Path(__file__).parent / "openrlhf_shim")


def _flash_attn_importable() -> bool:
    try:
        import flash_attn.bert_padding  # noqa: F401
    except Exception:  # noqa: BLE001 - the real one raises ImportError or a CUDA error on a CPU machine
        return False
    return True


if importlib.util.find_spec("openrlhf") is None:
    pytest.skip("openrlhf is not installed (make test-openrlhf)", allow_module_level=True)
if not _flash_attn_importable():
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]
    sys.path.append(SHIM)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), SHIM) if p)  # Ray workers

ray = pytest.importorskip("ray")
em = pytest.importorskip("openrlhf.trainer.ppo_utils.experience_maker")
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402
from openrlhf.trainer.ray.launcher import BaseModelActor, RayActorGroup  # noqa: E402
from openrlhf.utils.config import hierarchize  # noqa: E402

from srpo_core import SRPOConfig, role_aware_advantages  # noqa: E402
from srpo_core.adapters import openrlhf as adapter  # noqa: E402
from srpo_core.adapters._common import corrupt_multi_modal_inputs  # noqa: E402
from srpo_core.roles import roles_from_token_ids  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_end|>", "[UNK]"]
TAGS = ["<perception>", "</perception>", "<think>", "</think>", "<answer>", "</answer>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz ")
N, PROMPTS, P, A = 4, 3, 3, 24  # samples per prompt, prompts, prompt tokens, response width
OPTIONS = {"method": "srpo", "beta_perception": 0.7}


def tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIAL + TAGS + CHARS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")


def model_logprobs(sequences, mm_train_inputs, width):
    """The stand-in model: log-probs ``[b, width]`` of the last ``width`` tokens, depending on tokens and pixels."""
    tok = sequences[:, -width:].double()
    pix = torch.stack([d["pixel_values"].double().mean() for d in mm_train_inputs])[:, None]
    return (-0.5 - 0.1 * (tok % 7) - 0.3 * torch.tanh(pix * (1 + tok % 3))).float()


class StandInModelActor(BaseModelActor):
    """OpenRLHF's ``BaseModelActor`` (its real ``execute_batch``) with the model replaced by :func:`model_logprobs`."""

    def __init__(self):  # BaseModelActor's wants a GPU id and a torch.distributed rendezvous
        self.strategy = types.SimpleNamespace(is_rank_0=lambda: False)

    def forward(self, sequences, action_mask, attention_mask, packed_seq_lens=None, mm_train_inputs_list=None):
        return model_logprobs(sequences, mm_train_inputs_list, action_mask.shape[1])

    def empty_cache(self):
        return None


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray started the way the launcher starts it: the patch as every worker's setup hook."""
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "srpo_core.adapters.openrlhf.install",
                          "env_vars": {adapter.ENV_OPTIONS: json.dumps(OPTIONS)}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    yield
    _ACTORS.clear()
    ray.shutdown()


_ACTORS: list = []  # two stand-in actors, started once per module (each worker imports OpenRLHF in its setup hook)


def actor_group(n_actors=2):
    group = RayActorGroup.__new__(RayActorGroup)  # its __init__ places GPU actors; the dispatch below is its own
    group.duplicate_actors = 1
    _ACTORS.extend(ray.remote(num_cpus=0)(StandInModelActor).remote() for _ in range(n_actors - len(_ACTORS)))
    group._actor_handlers = _ACTORS[:n_actors]
    return group


def experience_maker(tok, estimator="group_norm"):
    args = hierarchize(types.SimpleNamespace(**{
        "algo.advantage.estimator": estimator, "algo.advantage.gamma": 1.0, "algo.advantage.no_std_norm": False,
        "algo.kl.use_loss": True, "algo.kl.estimator": "k3", "rollout.n_samples_per_prompt": N,
        "rollout.micro_batch_size": 5, "train.dynamic_batch_enable": False, "train.colocate_all": False,
        "train.colocate_actor_ref": False, "train.colocate_critic_reward": False, "ds.ring_attn_size": 1,
        "ds.tensor_parallel_size": 1, "reward.clip_range": (-10.0, 10.0), "reward.overlong_buffer_len": None,
        "reward.stop_properly_penalty_coef": None}))
    return em.RemoteExperienceMaker(actor_group(), None, None, None, FixedKLController(0.0),
                                    types.SimpleNamespace(args=args), tok)


RESPONSES = ["<perception>red a</perception><think>so b</think><answer>b</answer>",
             "<perception>blue</perception><answer>c</answer>", "<think>no look</think><answer>a</answer>",
             "<perception>green sky</perception><think>hm</think>"]


def rollout_samples(tok, seed=0):
    """One ``Experience`` per sample, as OpenRLHF's generator hands them over: prompt + response (``A`` wide, pad
    after the end), a scalar reward, and Qwen-VL processor outputs (one image per prompt)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (PROMPTS * N,), generator=g).float()
    rewards[:N] = 1.0  # a group with std 0: its advantages are 0 (an edge of group_norm's 1e-9)
    images = [torch.rand(16, 1176, generator=g) for _ in range(PROMPTS)]
    out = []
    for i in range(PROMPTS * N):
        ids = tok(RESPONSES[i % len(RESPONSES)], add_special_tokens=False)["input_ids"][:A - 1] + [tok.eos_token_id]
        resp = torch.full((A,), tok.pad_token_id)
        resp[:len(ids)] = torch.tensor(ids)
        prompt = torch.randint(len(SPECIAL), len(SPECIAL) + len(CHARS), (P,), generator=g)
        mask = torch.arange(A) < len(ids)
        out.append(Experience(
            sequences=torch.cat([prompt, resp])[None], attention_mask=torch.cat([torch.ones(P, dtype=torch.long),
                                                                                 mask.long()])[None],
            action_mask=mask[None], rewards=rewards[i:i + 1], response_length=mask.sum()[None].float(),
            total_length=torch.tensor([float(P + len(ids))]), prompts=["p"], labels=["l"],
            mm_train_inputs=[{"pixel_values": images[i // N], "image_grid_thw": torch.tensor([[1, 4, 4]])}]))
    return out, rewards


@pytest.fixture
def patched(monkeypatch):
    """``install()`` on the real class, undone after the test."""
    cls = em.RemoteExperienceMaker
    for name in ("make_experience", "compute_advantages_and_returns"):
        monkeypatch.setattr(cls, name, cls.__dict__[name])
    monkeypatch.setattr(cls, "__srpo_installed__", False, raising=False)
    return cls


def group_norm(rewards):
    r = rewards.reshape(-1, N)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)).reshape(-1)


def test_real_group_norm_is_the_sequence_advantage_the_adapter_reads(ray_cluster, patched):
    """Unpatched OpenRLHF: the advantage is group_norm's, broadcast over each response's tokens."""
    tok = tokenizer()
    samples, rewards = rollout_samples(tok)
    exps = experience_maker(tok).make_experience_batch(samples)
    assert [len(e.index) for e in exps] == [5, 5, 2]  # micro_batch_size 5
    idx = torch.tensor([i for e in exps for i in e.index])
    adv = torch.cat([e.advantages for e in exps])
    mask = torch.cat([e.action_mask for e in exps])
    torch.testing.assert_close(adv, group_norm(rewards)[idx, None] * mask)
    assert not any(hasattr(e, "srpo_logp_corrupt") for e in exps)


@pytest.mark.parametrize("method", ["srpo", "vppo"])
def test_install_refines_the_real_experience_makers_advantages(ray_cluster, patched, method):
    tok = tokenizer()
    samples, rewards = rollout_samples(tok, seed=1)
    adapter.install(method, adapter.AdapterOptions.from_mapping({"beta_perception": 0.7, "vppo_top_k": 0.5}))
    assert patched.__srpo_installed__
    exps = experience_maker(tok).make_experience_batch(samples)
    # Reference, computed here from the inputs: the corrupted images (srpo-core's corruption, groups = prompts),
    # the model on both, group_norm of the rewards, roles from the tokenizer.
    idx = [i for e in exps for i in e.index]
    seqs = torch.cat([samples[i].sequences for i in idx])
    mask = torch.cat([samples[i].action_mask for i in idx])
    mm = [samples[i].mm_train_inputs[0] for i in idx]
    corrupt = list(corrupt_multi_modal_inputs(mm, torch.tensor([i // N for i in idx])))
    logp, logp_c = model_logprobs(seqs, mm, A), model_logprobs(seqs, corrupt, A)
    assert (logp_c != logp)[mask].any()
    torch.testing.assert_close(torch.cat([e.srpo_logp_corrupt for e in exps]), logp_c)
    torch.testing.assert_close(torch.cat([e.action_log_probs for e in exps]), logp)
    seq_adv = group_norm(rewards)[idx]
    got = torch.cat([e.advantages for e in exps])
    if method == "srpo":
        roles = roles_from_token_ids(seqs[:, -A:], tok, mask).roles
        assert (roles == 1).any() and (roles == 2).any()
        torch.testing.assert_close(torch.cat([e.srpo_roles for e in exps]), roles)
        # The ablated pass (default mode, counterfactual: donors within each prompt group, across micro-batches):
        # the stand-in model reads no context, so ℓ° equals ℓ wherever the pass gives a value.
        ablated = torch.cat([e.srpo_logp_ablated for e in exps])
        valid = torch.cat([e.srpo_ablated_valid for e in exps])
        assert valid[(roles == 2) & mask].any() and not valid[roles == 1].any()
        torch.testing.assert_close(ablated[valid], logp[valid])
        want = role_aware_advantages(seq_adv, logp, logp_c, ablated, torch.where((roles == 2) & ~valid, 0, roles),
                                     mask=mask, config=SRPOConfig(beta_perception=0.7))
        torch.testing.assert_close(got, want.advantages)
        assert "srpo/perception/mu" in exps[0].info
    else:
        from srpo_core.presets import vppo_advantages

        want, keep = vppo_advantages(seq_adv, logp, logp_c, mask=mask, top_k=0.5)
        torch.testing.assert_close(got, want * keep)
    assert not torch.equal(got, seq_adv[:, None] * mask)


def test_other_estimators_are_left_alone(ray_cluster, patched):
    tok = tokenizer()
    samples, rewards = rollout_samples(tok, seed=2)
    adapter.install("srpo")
    exps = experience_maker(tok, "dr_grpo").make_experience_batch(samples)
    idx = torch.tensor([i for e in exps for i in e.index])
    r = rewards.reshape(-1, N)
    want = (r - r.mean(-1, keepdim=True)).reshape(-1)[idx, None] * torch.cat([e.action_mask for e in exps])
    torch.testing.assert_close(torch.cat([e.advantages for e in exps]), want)
    assert not any(hasattr(e, "srpo_logp_corrupt") for e in exps), "no corrupted pass for another estimator"


def test_ray_workers_run_the_patch_as_their_setup_hook(ray_cluster):
    @ray.remote(num_cpus=0)
    def patched_in_worker():
        from openrlhf.trainer.ppo_utils import experience_maker

        return getattr(experience_maker.RemoteExperienceMaker, "__srpo_installed__", False), os.environ.get(
            adapter.ENV_OPTIONS)

    installed, env = ray.get(patched_in_worker.remote())
    assert installed is True and json.loads(env) == OPTIONS


ARGS = ["--algo.advantage.estimator", "group_norm", "--algo.kl.use_loss", "--rollout.n_samples_per_prompt", "2",
        "--rollout.batch_size", "1", "--rollout.micro_batch_size", "1", "--actor.num_gpus_per_node", "4"]


def _launch(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_num_cpus": "1"}
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.append({SHIM!r}); "
                           "from srpo_core.adapters.openrlhf import launch; launch()", *argv],
                          capture_output=True, text=True, timeout=300, env=env)


def test_launch_runs_the_real_train_ppo_ray_parser_and_checks():
    """The wrapper's arguments reach OpenRLHF's own parser and checks, run as ``__main__`` after the wrapper has
    started Ray: 2 samples × 1 prompt / micro-batch 1 = 2 batches for 4 actor GPUs fails OpenRLHF's last check
    before ``train()`` (which would ask Ray for GPUs)."""
    proc = _launch("--srpo", '{"beta_perception": 0.7}', *ARGS)
    assert proc.returncode != 0
    assert "The number of sample batches must be greater than or equal to the effective number" in proc.stderr
    assert 'File "<frozen runpy>"' in proc.stderr or "runpy" in proc.stderr
    # An argument OpenRLHF's parser does not know is refused by that parser, not by the wrapper.
    proc = _launch(*ARGS, "--algo.advantage.no_such_flag")
    assert proc.returncode == 2 and "unrecognized arguments: --algo.advantage.no_such_flag" in proc.stderr
