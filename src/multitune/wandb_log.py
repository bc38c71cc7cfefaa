"""What multitune adds to the Trainer's own wandb logging: prediction tables, final metrics and plots.

The Trainer's WandbCallback already logs every `Trainer.log` row (so each evaluation's per-task
accuracy, macro-F1 and ECE appear as ``eval/<task>_accuracy`` ...). It cannot log tables or images of
our own evaluation, so these go through `wandb.log` here, on the step axis the callback declares
(``train/global_step``). Every function is a no-op without an active wandb run (report_to is not
wandb, or this is not rank 0), and none imports wandb unless training already did.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

COLUMNS = ["text", "gold", "predicted", "score"]


def _run():
    wandb = sys.modules.get("wandb")
    return wandb if wandb is not None and wandb.run is not None else None


def active() -> bool:
    return _run() is not None


def prediction_tables(results: dict[str, dict[str, Any]], prefix: str) -> dict[str, Any]:
    wandb = _run()
    return {
        f"{prefix}/{task}_predictions": wandb.Table(columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in r["predictions"]])
        for task, r in results.items() if r.get("predictions")
    }


def log_evaluation(results: dict[str, dict[str, Any]], step: int) -> None:
    """An evaluation during training: a table of its validation predictions per task."""
    if active():
        _run().log({**prediction_tables(results, "eval"), "train/global_step": step})


def log_final(results: dict[str, dict[str, Any]], plots: dict[str, list[Path]], step: int) -> None:
    """The end of training: the final per-task metrics (also in the run summary), their prediction tables and
    every plot; then the run is closed, which writes everything out (an offline run's files included)."""
    wandb = _run()
    if wandb is None:
        return
    scalars = {f"final/{task}_{key}": r[key] for task, r in results.items()
               for key in ("accuracy", "macro_f1", "ece", "loss", "perplexity") if key in r}
    images = {f"plots/{png.stem}": wandb.Image(str(png)) for files in plots.values() for png in files}
    wandb.log({**scalars, **prediction_tables(results, "final"), **images, "train/global_step": step})
    wandb.run.summary.update(scalars)
    wandb.finish()
