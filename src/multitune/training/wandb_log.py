"""What multitune adds to the Trainer's own wandb logging: prediction tables, final metrics and plots.

The Trainer's WandbCallback already logs every `Trainer.log` row (so each evaluation's per-task
accuracy, macro-F1 and ECE appear as ``eval/<task>_accuracy`` ...). It cannot log tables or images of
our own evaluation, so these go through `wandb.log` here, on the step axis the callback declares
(``train/global_step``). Every function is a no-op without an active wandb run (report_to is not
wandb, or this is not rank 0), and none imports wandb unless training already did.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

from multitune.distributed import checked, rank
from multitune.errors import UserError
from multitune.files import atomic_write
from multitune.rundir import RunDir, one_model

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


def _warn(what: str, e: Exception) -> None:
    print(f"warning: {what} failed ({type(e).__name__}: {e}); the results are in the run directory", flush=True)


def log_evaluation(results: dict[str, dict[str, Any]], step: int) -> None:
    """An evaluation during training: a table of its validation predictions per task. Rank 0 alone logs, in the
    middle of training: a wandb failure is a warning, never an exception that would leave the other ranks waiting."""
    if active():
        try:
            _run().log({**prediction_tables(results, "eval"), "train/global_step": step})
        except Exception as e:  # noqa: BLE001 - network, service, disk: whatever wandb raises
            _warn("logging an evaluation's predictions to wandb", e)


def start(cfg, run) -> None:
    """Start (or continue) rank 0's wandb run when report_to is wandb; every rank calls this before training.

    Its id is kept in the run directory, so a resumed job is one wandb run. per_task: each task's model trains
    in its own wandb run (``<name>-<task>``, its steps restart at 0), and the final results go to the run's own;
    all of them in one wandb group named after the run. A wandb that cannot start (no API key, no network) is
    one error on every rank (the ranks agree), not rank 0 dying while the others wait in their first collective."""
    if cfg.train.report_to != "wandb":
        return
    checked(lambda: _start(cfg, run) if rank() == 0 else None)


def _start(cfg, run) -> None:
    import wandb

    task = getattr(run, "task", "")
    id_file = run.root / (f"wandb_id-{task}" if task else "wandb_id")
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    w = cfg.train.wandb
    name = w.run_name or run.root.name
    if wandb.run is not None:
        if wandb.run.id == run_id:  # already running (joint: training started it)
            return
        wandb.finish()  # the previous task's run
    try:
        wandb.init(
            project=w.project, entity=w.entity, name=f"{name}-{task}" if task else name, tags=w.tags, id=run_id, resume="allow",
            dir=str(run.root), config=cfg.model_dump(mode="json"), group=None if one_model(cfg, RunDir(run.root)) else name,
        )
    except Exception as e:  # noqa: BLE001 - whatever wandb raises, as one clear line
        raise UserError(f"wandb could not start ({type(e).__name__}: {e}); log in (wandb login / WANDB_API_KEY), set "
                        "WANDB_MODE=offline, or train with train.report_to=none") from None
    atomic_write(id_file, run_id)  # a relaunch resumes the wandb run it names


def finish(cfg, run, results: dict[str, dict[str, Any]], plots: dict[str, list[Path]], step: int) -> None:
    """The end of a run whose models trained in their own wandb runs (per_task) or whose training may have
    finished in an earlier launch: rank 0 logs the final results to the run's own wandb run. Nothing here
    is a collective, and a failure is a warning: the run is complete on disk."""
    if cfg.train.report_to != "wandb" or rank() != 0:
        return
    try:
        _start(cfg, run)
    except UserError as e:
        _warn("starting wandb for the final results", e)
        return
    log_final(results, plots, step)


def log_final(results: dict[str, dict[str, Any]], plots: dict[str, list[Path]], step: int) -> None:
    """The end of training: the final per-task metrics (also in the run summary), their prediction tables and
    every plot; then the run is closed, which writes everything out (an offline run's files included).

    Rank 0 alone runs this, between the run's last files and the ranks' final barrier: a wandb failure is a
    warning (the run is complete on disk), never an exception that would leave the other ranks waiting."""
    wandb = _run()
    if wandb is None:
        return
    try:
        _log_final(wandb, results, plots, step)
    except Exception as e:  # noqa: BLE001 - network, auth, disk: whatever wandb raises
        _warn("logging the final results to wandb", e)
    finally:
        try:
            wandb.finish()  # closed even after a failure: a later run in this process must not log into it
        except Exception as e:  # noqa: BLE001
            _warn("closing the wandb run", e)


def _log_final(wandb, results: dict[str, dict[str, Any]], plots: dict[str, list[Path]], step: int) -> None:
    scalars = {f"final/{task}_{key}": r[key] for task, r in results.items()
               for key in ("accuracy", "macro_f1", "ece", "loss", "perplexity") if key in r}
    images = {f"plots/{png.stem}": wandb.Image(str(png)) for files in plots.values() for png in files}
    wandb.log({**scalars, **prediction_tables(results, "final"), **images, "train/global_step": step})
    wandb.run.summary.update(scalars)
