"""OpenRLHF adapter, tested without OpenRLHF (the main suite; tests/test_adapter_openrlhf_real.py runs the real
0.11.2 in ``make test-openrlhf``, with flash-attn stood in for at import). A plain ``pip install openrlhf==0.11.2``
fails on a CPU machine: it pins
``flash-attn==2.8.3``, which the index has only as a source archive whose ``setup.py`` imports torch (with build
isolation: ``No module named 'torch'``) and, without isolation, even with ``FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE``,
parses ``torch.version.cuda`` (``InvalidVersion: None`` on a CPU torch). Forced to build without its extension
(``FLASH_ATTENTION_FORCE_BUILD=TRUE`` as well) it installs, but ``import flash_attn.bert_padding`` then fails with
``No module named 'flash_attn_2_cuda'`` (the package's ``__init__`` loads the CUDA extension), and
``experience_maker`` imports ``flash_attn`` through ``openrlhf.models`` (``ring_attn_utils``). So
:func:`refine_experiences` is tested on objects with the documented fields of
``openrlhf.trainer.ppo_utils.experience.Experience`` (``action_mask``, ``action_log_probs``, ``advantages``,
``index``, ``info``), advantages made by a transcription of OpenRLHF's ``group_norm``, and the launch wrapper on
file stand-ins for the two modules it touches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from srpo_core_test_ablation_oracle import expected_ablated  # tests/ablation_oracle.py, registered by conftest.py

from srpo_core import Role, SRPOConfig, role_aware_advantages
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


FAKE_ENTRY = """
import json, os, sys
from openrlhf.trainer.ppo_utils import experience_maker as em
with open(os.environ["SRPO_TEST_OUT"], "w") as f:
    json.dump({"name": __name__, "argv": sys.argv, "patched": getattr(em.RemoteExperienceMaker, "__srpo_installed__",
               False), "env": os.environ.get("SRPO_OPENRLHF")}, f)
"""


def _fake_openrlhf(root):
    """The two modules of OpenRLHF the launcher touches, as files (the real package does not install on CPU):
    ``cli/train_ppo_ray`` records how it was run; ``experience_maker`` has the two methods ``install`` patches."""
    pkg = root / "openrlhf"
    for sub in ("", "cli", "trainer", "trainer/ppo_utils"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "cli" / "train_ppo_ray.py").write_text(FAKE_ENTRY)
    (pkg / "trainer" / "ppo_utils" / "experience_maker.py").write_text(
        "class RemoteExperienceMaker:\n"
        "    def make_experience(self, samples_list):\n        return samples_list\n"
        "    def compute_advantages_and_returns(self, experiences):\n        return experiences\n")


GOOD = ["--algo.advantage.estimator", "group_norm", "--algo.kl.use_loss", "--rollout.n_samples_per_prompt", "8"]


def test_launch_wrapper_starts_ray_with_the_hook_and_runs_train_ppo_ray_as_main(tmp_path, monkeypatch):
    import json
    import sys
    import types

    _fake_openrlhf(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
        monkeypatch.delitem(sys.modules, name)
    calls = []
    fake_ray = types.SimpleNamespace(is_initialized=lambda: bool(calls), init=lambda **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setenv("SRPO_TEST_OUT", str(tmp_path / "out.json"))
    monkeypatch.delenv(openrlhf.ENV_OPTIONS, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        openrlhf.launch(["--srpo", '{"beta_perception": 0.7}', *GOOD])
    finally:  # the fake package must not outlive the test
        for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
            del sys.modules[name]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["name"] == "__main__" and got["argv"][1:] == GOOD and got["patched"] is True
    # the workers get every option, checked, under its current name
    sent = json.loads(got["env"])
    assert sent["method"] == "srpo" and sent["beta_perception"] == 0.7
    assert AdapterOptions.from_mapping({k: v for k, v in sent.items() if k != "method"}) == AdapterOptions(
        srpo=SRPOConfig(beta_perception=0.7))
    (init,) = calls
    env = init["runtime_env"]
    assert env["worker_process_setup_hook"] == "srpo_core.adapters.openrlhf.install"
    assert json.loads(env["env_vars"][openrlhf.ENV_OPTIONS]) == sent
    assert env["env_vars"]["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] == "1"  # OpenRLHF's own defaults kept


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--algo.advantage.estimator", "gae", "--algo.kl.use_loss"], "group_norm", id="estimator"),
        pytest.param(["--algo.advantage.estimator", "group_norm"], "--algo.kl.use_loss", id="kl-in-reward"),
        pytest.param(["--srpo", '{"beta_perceptoin": 1}', *GOOD], "unknown option .*beta_perceptoin", id="typo"),
        pytest.param(["--srpo", "[1]", *GOOD], "not a JSON object", id="not-object"),
        pytest.param(["--srpo", '{"method": "ppo"}', *GOOD], r'`"method" in --srpo JSON` must be one of', id="method"),
        pytest.param(["--srpo"], "--srpo takes a JSON object", id="missing"),
        pytest.param(["--srpo.corruption_p", "1.5", *GOOD], r"`--srpo\.corruption_p` must be a number in \[0, 1\], "
                     "got '1.5'", id="corruption_p"),
        pytest.param(["--srpo.corruption_mode=blur", *GOOD], r"`--srpo\.corruption_mode` must be one of .*'blur'",
                     id="corruption_mode"),
        pytest.param(["--srpo.seed", "x", *GOOD], r"`--srpo\.seed` must be an integer >= 0, got 'x'", id="seed"),
        pytest.param(["--srpo.ablate", "flase", *GOOD], r"`--srpo\.ablate` must be a boolean .*got 'flase'",
                     id="ablate"),
        pytest.param(["--srpo", '{"corruption_p": 2}', *GOOD], r'`"corruption_p" in --srpo JSON` must be a number',
                     id="json-value"),
        pytest.param(["--srpo.ablation_mode", "mask", *GOOD], r"`--srpo\.ablation_mode='mask'` is not implemented "
                     "here.*computes positions itself", id="mask"),
        pytest.param(["--srpo.u_max", *GOOD], r"--srpo\.u_max takes a value", id="no-value"),
    ],
)
def test_launch_wrapper_checks_before_ray_starts(monkeypatch, argv, expected):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(
        is_initialized=lambda: pytest.fail("Ray must not be asked"), init=None))
    monkeypatch.delenv(openrlhf.ENV_OPTIONS, raising=False)
    with pytest.raises(SystemExit, match=expected):
        openrlhf.launch(argv)


def test_launch_wrapper_flags_parse_strings_and_old_names(tmp_path, monkeypatch):
    import json
    import sys
    import types

    _fake_openrlhf(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setenv("SRPO_TEST_OUT", str(tmp_path / "out.json"))
    monkeypatch.delenv(openrlhf.ENV_OPTIONS, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        with pytest.warns(DeprecationWarning, match=r"`--srpo\.ablate` is deprecated.*`--srpo\.ablation_mode=off`"):
            openrlhf.launch(["--srpo.ablate", "false", "--srpo.corruption_p=0.25", "--srpo.seed", "7",
                             "--srpo.beta_reasoning", "0.1", *GOOD])
    finally:
        for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
            del sys.modules[name]
    sent = json.loads(json.loads((tmp_path / "out.json").read_text())["env"])
    assert (sent["ablation_mode"], sent["corruption_p"], sent["seed"], sent["beta_reasoning"]) == ("off", 0.25, 7, 0.1)
    assert "ablate" not in sent and "corrupt_p" not in sent


def test_install_checks_the_environment_options(monkeypatch):
    monkeypatch.setenv(openrlhf.ENV_OPTIONS, '{"corruption_p": "2"}')
    with pytest.raises(ValueError, match=r'`"corruption_p" in \$SRPO_OPENRLHF` must be a number in \[0, 1\]'):
        openrlhf._options_from_env()
    monkeypatch.setenv(openrlhf.ENV_OPTIONS, '{"ablation_mode": "mask"}')
    with pytest.raises(NotImplementedError, match="computes positions itself"):
        openrlhf._options_from_env()
    monkeypatch.setenv(openrlhf.ENV_OPTIONS, '{"method": "vppo", "ablation_mode": "mask"}')
    assert openrlhf._options_from_env()[0] == "vppo"  # no ablated pass in VPPO: nothing to refuse


class _BigramActorGroup:
    """OpenRLHF's actor ``forward`` (unpacked) through ``async_run_method_batch`` on a bigram model: the log-prob of
    each next token, ``[:, :-1]``, its last ``A`` columns times the action mask."""

    def __init__(self, vocab):
        self.W = torch.log_softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(5),
                                               dtype=torch.float64), -1)
        self.calls = []

    def async_run_method_batch(self, method_name, sequences, action_mask, attention_mask, mm_train_inputs_list):
        assert method_name == "forward"
        self.calls.append(sequences)
        outs = []
        for seq, am, attn in zip(sequences, action_mask, attention_mask, strict=True):
            lp = torch.zeros(seq.shape[0], seq.shape[1] - 1, dtype=torch.float64)
            for i in range(seq.shape[0]):
                for p in range(seq.shape[1] - 1):
                    if attn[i, p + 1]:
                        lp[i, p] = self.W[seq[i, p], seq[i, p + 1]]
            outs.append((lp[:, -am.shape[1]:] * am.double()).float())
        return [outs]


@pytest.mark.parametrize("mode", ["drop", "counterfactual"])
def test_ablated_pass_on_openrlhf_samples(monkeypatch, mode):
    """The ablated pass over two micro-batches (donors may sit in the other one): OpenRLHF's layout (prompt +
    response, right-padded; ``action_mask`` over ``sequences[:, 1:]``), every ``ℓ°`` by hand."""
    import sys
    import types

    from srpo_core.ablation import counterfactual_donors

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=lambda ref: ref))
    g = torch.Generator().manual_seed(2)
    V, n = 11, 2  # noqa: N806
    prompts = [[3, 4], [3, 4], [5, 6, 7], [5, 6, 7]]
    roles = [[2, 1, 1, 2, 2], [1, 1, 2, 0], [2, 1, 2, 2, 2, 0], [2, 2]]
    resps = [torch.randint(1, V, (len(r),), generator=g).tolist() for r in roles]
    rows = [(p, r, ro) for p, r, ro in zip(prompts, resps, roles, strict=True)]
    samples = []
    for chunk, index in (([rows[0], rows[2]], [0, 2]), ([rows[1], rows[3]], [1, 3])):  # groups split across chunks
        width = max(len(p) + len(r) for p, r, _ in chunk)
        seq = torch.zeros(len(chunk), width, dtype=torch.int64)
        attn = torch.zeros(len(chunk), width, dtype=torch.int64)
        action = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
        rl = torch.zeros(len(chunk), width - 1, dtype=torch.int64)
        for i, (p, r, ro) in enumerate(chunk):
            seq[i, :len(p) + len(r)] = torch.tensor(p + r)
            attn[i, :len(p) + len(r)] = 1
            action[i, len(p) - 1:len(p) - 1 + len(r)] = True
            rl[i, len(p) - 1:len(p) - 1 + len(r)] = torch.tensor(ro)
        samples.append((types.SimpleNamespace(sequences=seq, attention_mask=attn, action_mask=action, index=index,
                                              mm_train_inputs=[None] * len(chunk)), rl))
    group = _BigramActorGroup(V)
    maker = types.SimpleNamespace(
        args=types.SimpleNamespace(rollout=types.SimpleNamespace(n_samples_per_prompt=n)),
        strategy=types.SimpleNamespace(args=types.SimpleNamespace(ds=types.SimpleNamespace(
            ring_attn_size=1, tensor_parallel_size=1))),
        actor_model_group=group, tokenizer=types.SimpleNamespace(pad_token_id=0))
    out = openrlhf._ablated_pass(maker, [s for s, _ in samples], [r for _, r in samples],
                                 AdapterOptions(ablation_mode=mode))
    assert len(group.calls) == 1 and len(group.calls[0]) == 2  # one forward per micro-batch
    flat_resp = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in resps], batch_first=True)
    span = torch.nn.utils.rnn.pad_sequence([torch.tensor(ro) == Role.PERCEPTION for ro in roles], batch_first=True)
    donors = counterfactual_donors(torch.tensor([0, 0, 1, 1]), "group", input_ids=flat_resp, span_mask=span).tolist()
    assert donors == [1, 0, 3, 2]
    checked = 0
    for (s, _), (lp, valid), chunk_rows in zip(samples, out, ([0, 2], [1, 3]), strict=True):
        assert lp.shape == s.action_mask.shape == valid.shape
        for i, k in enumerate(chunk_rows):
            p, r, ro = rows[k]
            d = donors[k]
            want = expected_ablated(p, r, ro, mode, (resps[d], roles[d]))
            for j, w in want.items():
                col = len(p) - 1 + j
                assert bool(valid[i, col]) is (w is not None), (mode, k, j)
                if w is not None:
                    assert float(lp[i, col]) == pytest.approx(float(group.W[w[0], r[j]]), abs=1e-6), (mode, k, j)
                    checked += 1
    assert checked >= 10
    assert not bool(valid[~s.action_mask].any())


def test_refine_experiences_uses_the_ablated_values():
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(4, 5, dtype=torch.bool)
    e = Experience(action_mask=mask, action_log_probs=-torch.rand(4, 5, generator=g))
    seq = group_norm(torch.tensor([1.0, 0.0, 1.0, 0.5]), 2)
    e.advantages = seq[:, None] * mask
    e.srpo_logp_corrupt = e.action_log_probs - torch.rand(4, 5, generator=g)
    e.srpo_roles = torch.tensor([[1, 2, 2, 0, 2]] * 4)
    e.srpo_logp_ablated = e.action_log_probs - torch.rand(4, 5, generator=g)
    e.srpo_ablated_valid = torch.ones(4, 5, dtype=torch.bool)
    e.srpo_ablated_valid[3] = False  # no donor: its reasoning tokens are scored like OTHER
    openrlhf.refine_experiences([e], 2, "srpo", AdapterOptions())
    roles = e.srpo_roles.clone()
    roles[3] = torch.where(roles[3] == 2, 0, roles[3])
    want = role_aware_advantages(seq, e.action_log_probs, e.srpo_logp_corrupt, e.srpo_logp_ablated, roles, mask=mask)
    torch.testing.assert_close(e.advantages, want.advantages)



def test_corrupted_pass_draws_a_new_mask_each_rollout_step(monkeypatch):
    """The experience maker's k-th corrupted pass seeds with ``seed·100003 + k`` (review: a fixed seed gave the same
    prompt slot the same mask every step when ``Experience.index`` restarts)."""
    import types

    from srpo_core.adapters import openrlhf as orl
    from srpo_core.adapters._common import AdapterOptions, corrupt_multi_modal_inputs

    seen = []
    monkeypatch.setattr(orl, "_forward", lambda self, seqs, attn, act, mm_list: seen.append(mm_list) or [])
    g = torch.Generator().manual_seed(3)
    mm = [{"pixel_values": torch.randn(16, 1176, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}
          for _ in range(2)]
    sample = types.SimpleNamespace(mm_train_inputs=mm, sequences=torch.zeros(2, 3), attention_mask=None,
                                   action_mask=None, index=[0, 1])
    maker = types.SimpleNamespace(args=types.SimpleNamespace(rollout=types.SimpleNamespace(n_samples_per_prompt=2)))
    options = AdapterOptions(seed=7)
    for _ in range(2):
        orl._corrupt_pass(maker, [sample], options)
    for k, mm_list in enumerate(seen):
        want = corrupt_multi_modal_inputs(mm, torch.tensor([0, 0]), seed=7 * 100_003 + k)
        for got, ref in zip(mm_list[0], want, strict=True):
            assert torch.equal(got["pixel_values"], ref["pixel_values"])
    assert not torch.equal(seen[0][0][0]["pixel_values"], seen[1][0][0]["pixel_values"])
