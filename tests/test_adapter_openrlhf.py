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
    assert json.loads(got["env"]) == {"method": "srpo", "beta_perception": 0.7}
    (init,) = calls
    env = init["runtime_env"]
    assert env["worker_process_setup_hook"] == "srpo_core.adapters.openrlhf.install"
    assert json.loads(env["env_vars"][openrlhf.ENV_OPTIONS]) == {"method": "srpo", "beta_perception": 0.7}
    assert env["env_vars"]["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] == "1"  # OpenRLHF's own defaults kept


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--algo.advantage.estimator", "gae", "--algo.kl.use_loss"], "group_norm", id="estimator"),
        pytest.param(["--algo.advantage.estimator", "group_norm"], "--algo.kl.use_loss", id="kl-in-reward"),
        pytest.param(["--srpo", '{"beta_perceptoin": 1}', *GOOD], "unknown key", id="typo"),
        pytest.param(["--srpo", "[1]", *GOOD], "not a JSON object", id="not-object"),
        pytest.param(["--srpo", '{"method": "ppo"}', *GOOD], "`method` must be", id="method"),
        pytest.param(["--srpo"], "--srpo takes a JSON object", id="missing"),
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
