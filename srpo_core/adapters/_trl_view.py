"""The token-weight view in the trainer's own loggers (``docs/decisions.md`` D222): with ``explain_every`` on, each
rollout step SRPO explains is also shown, at the next log, to the TensorBoard and W&B callbacks the trainer already
has (``report_to``): a markdown table (``SummaryWriter.add_text``; TensorBoard renders no colour, so each role token
is annotated with its role and weight) and the coloured HTML page of ``srpo-core explain`` (``wandb.Html``).

The view is of this process's rows with the weights the trainer computed (role statistics over every process),
not recomputed; only the main process logs, as the loggers themselves do. Nothing here imports tensorboard or
wandb: the callbacks transformers created hold the writer (``TensorBoardCallback.tb_writer``) and the module
(``WandbCallback._wandb``).
"""

from __future__ import annotations

from transformers import TrainerCallback

from srpo_core.ops.role_aware_advantages import RoleAwareAdvantages

TAG = "srpo/token_weights"
RESPONSES = 8  # responses shown per view (the first of this process's batch): enough for two groups of 4


class TokenViewCallback(TrainerCallback):
    """Logs the last explained step's view at the next ``on_log`` (once per explained step)."""

    def __init__(self, trainer):
        self.trainer = trainer  # for its callback list (the loggers) and its SRPO config
        self.pending = None  # (records, RoleAwareAdvantages packed [N], sequence advantages [B]) not yet logged

    def record(self, records: list[dict], result: RoleAwareAdvantages, mask, sequence_advantages) -> None:
        """Keep a step's rollouts (``rollouts.to_records``) and the trainer's result (``[B, T]``) for the next log."""
        m = mask.bool()
        packed = RoleAwareAdvantages(result.advantages[m].detach().float().cpu(),
                                     result.weights[m].detach().float().cpu(),
                                     result.signals[m].detach().float().cpu(),
                                     result.baseline.detach().float().cpu(), dict(result.stats))
        self.pending = (records, packed, sequence_advantages.detach().float().cpu())

    def loggers(self) -> tuple[list, list]:
        """The TensorBoard writers and W&B modules of the trainer's callbacks (by class name: neither is imported)."""
        writers, wandbs = [], []
        for cb in self.trainer.callback_handler.callbacks:
            name = type(cb).__name__
            if name == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                writers.append(cb.tb_writer)
            elif name == "WandbCallback" and getattr(cb, "_wandb", None) is not None:
                wandbs.append(cb._wandb)
        return writers, wandbs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending is None or not state.is_world_process_zero:
            return
        writers, wandbs = self.loggers()
        if not writers and not wandbs:
            return
        from srpo_core.render import Analysis, to_html, to_markdown
        from srpo_core.rollouts import to_batch

        records, packed, seq = self.pending
        self.pending = None
        a = Analysis(to_batch(records), self.trainer.srpo_config, seq, packed)
        title = f"SRPO token weights, step {state.global_step}"
        if writers:
            text = to_markdown(a, limit=RESPONSES, title=title)
            for writer in writers:
                writer.add_text(TAG, text, state.global_step)
        if wandbs:
            page = to_html(a, limit=RESPONSES)
            for wandb in wandbs:
                wandb.log({TAG: wandb.Html(page), "train/global_step": state.global_step})
