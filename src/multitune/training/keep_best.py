"""`train.keep_best`: keep the checkpoint with the best score during training out of rotation, and end with its weights.

Transformers' own best-model mode (load_best_model_at_end) requires the save and evaluation schedules to
line up, and its metric must be one key of Trainer's own evaluation, which never holds the per-task
accuracy (the evaluation-table hook logs it after Trainer's evaluation). So the choice is made here, from
that log row, and handed to Trainer's own protection:

- :class:`KeepBest` reads each evaluation's ``eval_<task>_accuracy`` (the mean over the choosing tasks, or the
  one task named); a new best (strictly higher, finite) asks for a checkpoint at this very step and records
  the step as ``state.best_global_step``. Trainer's ``_save_checkpoint`` then sets
  ``state.best_model_checkpoint`` to that folder, and ``rotate_checkpoints`` never deletes it. Both are in
  the trainer state each checkpoint saves, so a resume keeps the choice.
- :func:`restore_best` loads that checkpoint's weights into the trained model at the end, on every rank
  (the weights Trainer resumes from: FSDP adapter checkpoints are whole, multitune.training.adapter_state).

The score is the same on every rank (evaluate_tasks gathers the predictions before scoring); rank 0's is
used on all, so the save it may ask for is agreed.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback

from multitune.distributed import all_gather, checked, main_print
from multitune.errors import UserError
from multitune.training.checkpoints import is_complete


class KeepBest(TrainerCallback):
    """Record the best evaluation's step and save a checkpoint there (see the module doc)."""

    def __init__(self, tasks: list[str]):
        self.keys = [f"eval_{t}_accuracy" for t in tasks]

    def score(self, logs: dict) -> float | None:
        """The mean accuracy over the choosing tasks in this log row; None for a row without them all."""
        if not self.keys or not all(k in logs for k in self.keys):
            return None
        return sum(float(logs[k]) for k in self.keys) / len(self.keys)

    def on_log(self, args, state, control, logs=None, **kwargs):
        mine = self.score(logs or {})
        if mine is None:
            return control
        score = all_gather(mine)[0]  # every rank logs the row (the evaluation is a collective): one agreed value
        if math.isfinite(score) and (state.best_metric is None or score > state.best_metric):
            state.best_metric, state.best_global_step = score, state.global_step
            control.should_save = True  # this step's weights, kept out of rotation by Trainer (best_model_checkpoint)
        return control


def best_checkpoint(trainer) -> Path | None:
    """The kept checkpoint to end with, agreed by every rank; None when the weights in memory are it (or none was
    scored). A kept checkpoint that is gone (deleted by hand, or not on this pod) is an error, never the last step."""
    step = trainer.state.best_global_step
    if not step or step == trainer.state.global_step:
        return None
    folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"

    def present() -> Path:
        if not is_complete(folder):
            raise UserError(f"train.keep_best: the kept checkpoint {folder} (best score {trainer.state.best_metric:.4f}) "
                            "is missing or incomplete, so final/ cannot hold its weights; restore it, or train again "
                            "with --no-resume")
        return folder

    return checked(present)


def restore_best(trainer) -> int | None:
    """Load the kept checkpoint's weights into ``trainer.model`` on every rank; its step, or None if nothing changed."""
    folder = best_checkpoint(trainer)
    if folder is None:
        return None
    main_print(f"train.keep_best: final/ holds the weights of {folder.name} (score {trainer.state.best_metric:.4f}), "
               f"not of the last step {trainer.state.global_step}")
    trainer._load_from_checkpoint(str(folder), trainer.model_wrapped if trainer.is_fsdp_enabled else None)
    return trainer.state.best_global_step
