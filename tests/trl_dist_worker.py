"""One process of ``accelerate launch --multi_gpu --num_processes 2 tests/trl_dist_worker.py OUT [ABLATION SOURCE
LOPSIDED PASSES]`` on CPU (the trainer's ``use_cpu=True``; torchrun on gloo).

Trains ``SRPOGRPOTrainer`` on the tiny Qwen2-VL of ``test_trl_e2e.py`` for 2 steps, 2 processes on gloo, with a
prompt group split across the processes (4 completions per prompt, 6 rows per process); ``ABLATION SOURCE
LOPSIDED PASSES`` default to ``counterfactual group even runner``; ``lopsided``: process 1's rows have no perception
span (only process 0 needs the extra passes); ``full``: the former full passes (``_srpo_pass_runner = False``)
instead of the pass runner. At each generation step every process saves TRL's output as SRPO received it, SRPO's
per-token results, how many decoder forwards SRPO's passes ran and (rank 0) the model's weights to
``OUT/step<k>-rank<r>.pt``;
``tests/test_trl_distributed.py`` then scores the gathered batch in one process. Run as a script; the test module
loads it by path for its settings (``options``).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import pathlib
import sys
import warnings

import torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)

from srpo_core import Role  # noqa: E402
from srpo_core.adapters.trl import SRPOGRPOTrainer, SRPOTrainerOptions  # noqa: E402

PER_PROCESS, GENERATIONS, STEPS = 6, 4, 2


def load_e2e():
    """``test_trl_e2e.py`` (its tiny model, processor, dataset), loaded by path: tests/ is not on sys.path under
    pytest's importlib mode."""
    spec = importlib.util.spec_from_file_location("srpo_test_trl_e2e", pathlib.Path(__file__).with_name(
        "test_trl_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def roles_fn(completion_ids, mask, tokenizer, reasoning_only_from: int | None = None):
    """Perception: the first 2-4 tokens (length from the first token, so spans differ); reasoning: the rest. Rows
    from ``reasoning_only_from`` on have no perception span."""
    length = 2 + completion_ids[:, :1] % 3
    if reasoning_only_from is not None:
        length[reasoning_only_from:] = 0
    pos = torch.arange(completion_ids.shape[1])[None, :]
    roles = torch.where(pos < length, int(Role.PERCEPTION), int(Role.REASONING))
    return roles.masked_fill(~mask, 0), torch.zeros(len(completion_ids), dtype=torch.bool), 0


def lopsided_roles_fn(completion_ids, mask, tokenizer):
    """In the 2-process run: process 1 has no perception span at all, so only process 0 needs the extra passes."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return roles_fn(completion_ids, mask, tokenizer, reasoning_only_from=0 if rank == 1 else None)


class Dumping(SRPOGRPOTrainer):
    def _srpo_score(self, out, mode):
        before = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        generation = self._srpo_generation
        forwards = [0]  # decoder forwards of SRPO's passes (runner: the backbone; full passes: through the model)
        backbone = self.accelerator.unwrap_model(self.model).base_model
        handle = backbone.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        try:
            out = super()._srpo_score(out, mode)
        finally:
            handle.remove()
        last, rank = self._srpo_last, self.accelerator.process_index
        dump = {"out": before, "generation": generation, "advantages": out["advantages"].detach().clone(),
                "forwards": forwards[0], "pass_runner": self._srpo_pass_runner,
                "weights": last.result.weights, "logp": last.logp, "logp_corrupt": last.logp_corrupt,
                "logp_ablated": last.logp_ablated, "scored_roles": last.scored_roles, "mask": last.mask,
                "stats": last.result.stats}
        if rank == 0:
            dump["state_dict"] = {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(
                self.model).state_dict().items()}
        torch.save(dump, os.path.join(sys.argv[1], f"step{generation}-rank{rank}.pt"))
        return out


def options(ablation: str, source: str, explain_dir: str | None = None, roles=roles_fn) -> SRPOTrainerOptions:
    """SRPO's settings; the one-process rescoring uses the same (without writing rollouts)."""
    return SRPOTrainerOptions(ablation_mode=ablation, counterfactual_source=source, corruption_patch="raw",
                              corruption_p=0.5, roles_fn=roles, explain_every=1 if explain_dir else 0,
                              explain_dir=explain_dir)


def main() -> None:
    out_dir, ablation, source, lopsided, runner = sys.argv[1], *(sys.argv[2:6] or ["counterfactual", "group", "even",
                                                                                   "runner"])
    Dumping._srpo_pass_runner = runner == "runner"
    e2e = load_e2e()
    processor = e2e.build_processor()
    args = e2e.grpo_args(processor.tokenizer, per_device_train_batch_size=PER_PROCESS, num_generations=GENERATIONS,
                         max_steps=STEPS, output_dir=out_dir)
    trainer = Dumping(model=e2e.build_model(processor.tokenizer), reward_funcs=e2e.rule_reward, args=args,
                      train_dataset=e2e.build_dataset(), processing_class=processor,
                      srpo_options=options(ablation, source, os.path.join(out_dir, "rollouts"),
                                           lopsided_roles_fn if lopsided == "lopsided" else roles_fn))
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    try:  # the fused loss runs the backbone outside DDP's forward: refused with several processes
        SRPOGRPOTrainer(model=e2e.build_model(processor.tokenizer), reward_funcs=e2e.rule_reward, args=args,
                        train_dataset=e2e.build_dataset(), processing_class=processor,
                        srpo_options=SRPOTrainerOptions(fused_loss=True))
    except ValueError as err:
        assert "multi-process" in str(err), err
        print(f"rank {trainer.accelerator.process_index}: fused_loss refused", flush=True)
    trainer.train()
    rank = trainer.accelerator.process_index
    # Leave the gloo group while Python is alive (tests/gloo_group.py: one that outlives interpreter finalisation
    # can abort the process at exit, "terminate called without an active exception").
    del trainer
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    print(f"rank {rank}: OK {STEPS} steps", flush=True)


if __name__ == "__main__":
    main()
