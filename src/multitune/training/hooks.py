"""What both trainers (LM and classification heads) add to transformers' Trainer, written once.

- One evaluation-table hook: after Trainer's own evaluation, each task's validation rows are scored the
  trainer's way (``score_tasks``); the scalars it returns are logged beside Trainer's, and with
  ``report_to: wandb`` each task's predictions go to wandb as a table. Every rank takes the same path
  (report_to is shared), so the scoring's collectives stay paired.
- A resume at the last step: resumed from a checkpoint saved at the last step (a kill during the final
  save or evaluation), Trainer (5.24) would still run one more step before it checks max_steps: a step
  past the end, logged and saved. Nothing is left to train.
"""

from __future__ import annotations

from typing import Any

from multitune.training import wandb_log

Results = dict[str, dict[str, Any]]


class TaskEvaluation:
    """Mixin, before the Trainer class in the bases."""

    def score_tasks(self, tables: bool) -> tuple[Results, dict[str, float]] | None:
        """Each task's results and the scalars to log; None when this trainer scores nothing more."""
        return None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and metric_key_prefix == "eval":
            tables = "wandb" in (self.args.report_to or [])
            scored = self.score_tasks(tables)
            if scored is not None:
                results, extra = scored
                if extra:
                    self.log(extra)
                    metrics.update(extra)
                if tables:
                    wandb_log.log_evaluation(results, self.state.global_step)
        return metrics

    def _run_epoch(self, *args, **kwargs):
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)
