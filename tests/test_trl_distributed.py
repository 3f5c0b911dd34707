"""TRL with several processes: ``accelerate launch --multi_gpu --num_processes 2`` on CPU (torchrun, gloo) trains the
tiny Qwen2-VL with SRPO for 2 steps (``trl_dist_worker.py``), a prompt group split across the two processes; the
per-token log-probs, roles, weights and advantages each process computed equal those of one process scoring the
gathered batch with the same model weights and seeds (SPEC property 10 through the trainer; D220-D221), through the
pass runner (the default) and the former full passes; and both processes run the same number of forwards (D223-D224).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from srpo_core_test_gloo import free_port  # tests/gloo_group.py, registered by conftest.py

from srpo_core import role_aware_advantages  # noqa: E402
from srpo_core.adapters.trl import SRPOGRPOTrainer  # noqa: E402
from srpo_core.rollouts import load, to_batch  # noqa: E402

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("srpo_test_trl_dist_worker", HERE / "trl_dist_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
e2e = worker.load_e2e()



def launch(out: Path, *argv: str) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(HERE / "trl_dist_worker.py"), str(out), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)  # cwd off the repo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in (0, 1):
        assert f"rank {rank}: OK" in proc.stdout and f"rank {rank}: fused_loss refused" in proc.stdout, \
            proc.stdout[-3000:]


def pad_to(x: torch.Tensor, width: int, fill, left: bool = False) -> torch.Tensor:
    extra = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), fill)
    return torch.cat([extra, x] if left else [x, extra], dim=1)


def gather_rows(parts: list[dict], pad_id: int) -> dict:
    """The processes' TRL outputs as one batch: prompts left-padded, completions right-padded to the widest."""
    wp = max(p["prompt_ids"].shape[1] for p in parts)
    wc = max(p["completion_ids"].shape[1] for p in parts)
    out = {
        "prompt_ids": torch.cat([pad_to(p["prompt_ids"], wp, pad_id, left=True) for p in parts]),
        "prompt_mask": torch.cat([pad_to(p["prompt_mask"], wp, 0, left=True) for p in parts]),
        "completion_ids": torch.cat([pad_to(p["completion_ids"], wc, pad_id) for p in parts]),
        "completion_mask": torch.cat([pad_to(p["completion_mask"], wc, 0) for p in parts]),
        "advantages": torch.cat([p["advantages"] for p in parts]),
        "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts]),
        "num_images": [n for p in parts for n in p["num_images"]],
    }
    mm = []
    for p in parts:
        w = p["prompt_ids"].shape[1]
        mm.append(torch.cat([pad_to(p["mm_token_type_ids"][:, :w], wp, 0, left=True),
                             pad_to(p["mm_token_type_ids"][:, w:], wc, 0)], dim=1))
    out["mm_token_type_ids"] = torch.cat(mm)
    return out


def cat_padded(parts: list[dict], key: str, width: int) -> torch.Tensor:
    return torch.cat([pad_to(p[key], width, 0) for p in parts])


def lopsided_whole_batch(completion_ids, mask, tokenizer):
    """``lopsided_roles_fn`` of the worker, seen from one process holding both processes' rows."""
    return worker.roles_fn(completion_ids, mask, tokenizer, reasoning_only_from=worker.PER_PROCESS)


@pytest.mark.parametrize("source, lopsided, runner", [("group", False, True), ("other", True, True),
                                                      ("other", True, False)])
def test_two_processes_give_the_weights_of_one(tmp_path, source, lopsided, runner):
    """``lopsided``: process 1 has no perception span, so only process 0 needs the corrupted and ablated passes;
    both run them (the donor exchange is a collective: a process that skipped it would leave the other waiting),
    and, in the pass runner, each row chunk of them (a forward that gathers sharded parameters would hang too).
    ``runner``: the pass runner (the default), else the full passes through TRL's log-prob function."""
    launch(tmp_path, "counterfactual", source, "lopsided" if lopsided else "even", "runner" if runner else "full")
    processor = e2e.build_processor()
    pad_id = processor.tokenizer.pad_token_id
    whole = worker.PER_PROCESS * 2
    args = e2e.grpo_args(processor.tokenizer, per_device_train_batch_size=whole,
                         num_generations=worker.GENERATIONS, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = SRPOGRPOTrainer(model=e2e.build_model(processor.tokenizer), reward_funcs=e2e.rule_reward, args=args,
                              train_dataset=e2e.build_dataset(), processing_class=processor,
                              srpo_options=worker.options("counterfactual", source, roles=lopsided_whole_batch
                                                          if lopsided else worker.roles_fn))
    assert one.accelerator.num_processes == 1
    one._srpo_pass_runner = runner
    lent = 0
    for step in range(worker.STEPS):
        parts = [torch.load(tmp_path / f"step{step}-rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert [p["generation"] for p in parts] == [step, step]
        assert [p["pass_runner"] for p in parts] == [runner, runner]
        # every process ran the same forwards: the corrupted and ablated passes at least (lopsided: on process 1 too)
        assert parts[0]["forwards"] == parts[1]["forwards"] >= 2, [p["forwards"] for p in parts]
        one.model.load_state_dict(parts[0]["state_dict"])  # the weights the processes generated and scored with
        one._srpo_generation = step
        batch = gather_rows([p["out"] for p in parts], pad_id)
        wc = batch["completion_ids"].shape[1]
        one._srpo_score(batch, "train")
        last = one._srpo_last
        mask = cat_padded(parts, "mask", wc)
        assert torch.equal(last.mask, mask)
        torch.testing.assert_close(last.scored_roles.masked_fill(~mask, 0),
                                   cat_padded(parts, "scored_roles", wc).masked_fill(~mask, 0), rtol=0, atol=0)
        # The passes: same corrupted images, same donors. Bit-identical on the CPU this was written on; a BLAS that
        # blocks [6, L] and [12, L'] products differently may round them apart by an ulp, hence the tolerances.
        for key in ("logp", "logp_corrupt", "logp_ablated"):
            got = torch.where(mask, cat_padded(parts, key, wc), 0.0)
            torch.testing.assert_close(got, torch.where(mask, getattr(last, key), 0.0), rtol=0, atol=1e-6,
                                       msg=lambda m, k=key, s=step: f"step {s} {k}: {m}")
        for key, mine in (("weights", last.result.weights), ("advantages", batch["advantages"])):
            torch.testing.assert_close(cat_padded(parts, key, wc), mine, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=key, s=step: f"step {s} {k}: {m}")
        # The all-reduce alone, free of the passes' rounding: the processes' own inputs scored as one batch.
        seq = torch.cat([p["out"]["advantages"] for p in parts]).double()
        inputs = [torch.where(mask, cat_padded(parts, k, wc), 0.0).double() for k in ("logp", "logp_corrupt",
                                                                                        "logp_ablated")]
        roles = cat_padded(parts, "scored_roles", wc)
        ref = role_aware_advantages(seq, *inputs, roles, mask=mask, config=one.srpo_config)
        torch.testing.assert_close(cat_padded(parts, "weights", wc).double(), ref.weights, rtol=1e-5, atol=1e-6)
        for key in ("perception/mu", "perception/sigma", "reasoning/mu", "reasoning/sigma"):
            assert parts[0]["stats"][key] == pytest.approx(ref.stats[key], rel=1e-5, abs=1e-9), key
        # ... which one process's shard alone would not give (the test would see a missing all-reduce)
        rows = parts[0]["mask"].shape[0]
        alone = role_aware_advantages(seq[:rows], *(x[:rows] for x in inputs), roles[:rows], mask=mask[:rows],
                                      config=one.srpo_config)
        assert not torch.allclose(alone.weights, ref.weights[:rows], rtol=1e-3, atol=1e-4)
        # explain_every: each process writes its rows; the files of a step read together give the trainer's weights
        files = sorted((tmp_path / "rollouts").glob(f"step-{step:06d}-rank*.jsonl"))
        assert [f.name.rsplit("-", 1)[1] for f in files] == ["rank0.jsonl", "rank1.jsonl"], files
        rollouts = to_batch([rec for f in files for rec in load(f)])
        again = role_aware_advantages(rollouts.advantages.double(), rollouts.logp, rollouts.logp_corrupt,
                                      rollouts.logp_ablated, rollouts.roles, cu_seqlens=rollouts.cu_seqlens,
                                      config=one.srpo_config)
        torch.testing.assert_close(again.weights, ref.weights[mask], rtol=1e-5, atol=1e-6)
        # a donor on the other process was lent: the one-process donors cross the rank boundary
        lent += int(_crossing_donors(batch, last, one, rows))
    assert lent > 0, "no counterfactual donor crossed processes: the split is not exercised"


def _crossing_donors(batch: dict, last, trainer, rows: int) -> bool:
    from srpo_core import Role
    from srpo_core.ablation import counterfactual_donors

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    span = torch.cat([torch.zeros_like(batch["prompt_ids"], dtype=torch.bool),
                      last.mask & (last.roles.roles == Role.PERCEPTION)], dim=1)
    groups = torch.arange(ids.shape[0]) // trainer.num_generations
    donor = counterfactual_donors(groups, trainer.srpo_options.counterfactual_source, input_ids=ids, span_mask=span)
    owner = torch.arange(ids.shape[0]) >= rows
    return bool(((donor >= 0) & (owner != (donor.clamp(min=0) >= rows))).any())
