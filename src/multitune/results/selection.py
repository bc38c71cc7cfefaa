"""`train.keep_best`: which tasks choose the kept checkpoint, the validation rows that chose it, the rows left to
report on, and the choice as metrics.json and report.md record it.

The choice reads the rows scored during training: per labelled task, the ``train.eval_rows_during_training``
rows that ``subsample`` draws from its validation rows (``evaluate_tasks(max_rows=N)`` during training). Scores
on the rows that chose a checkpoint are optimistic for it, so the run's reported metrics of those tasks are
on the other validation rows only (``held_out``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from multitune.config import Config
from multitune.data.load import TaskData, subsample
from multitune.errors import UserError
from multitune.rundir import RunDir

LABELLED = ("classification", "multiple_choice")


def choosing_tasks(cfg: Config, kinds: dict[str, str]) -> list[str]:
    """The tasks whose accuracy the choice reads (``kinds``: each task's kind), in config order; [] for keep_best: none."""
    if cfg.train.keep_best == "none":
        return []
    named = cfg.train.keep_best_task
    return [t for t, kind in kinds.items() if kind in LABELLED and (named is None or t == named)]


def check_choosable(cfg: Config) -> None:
    """Refuse keep_best when no task it reads is scored during training (``cfg``: tasks resolved, with their type)."""
    if cfg.train.keep_best == "none":
        return
    kinds = {t.name: t.type for t in cfg.tasks}
    if not choosing_tasks(cfg, kinds):
        what = (f"task {cfg.train.keep_best_task} is a {kinds[cfg.train.keep_best_task]} task" if cfg.train.keep_best_task
                else "no task is a classification or multiple-choice task")
        raise UserError(f"train.keep_best={cfg.train.keep_best}: {what}, so nothing is scored by accuracy during training "
                        "to choose a checkpoint; name a classification or multiple-choice task, or set train.keep_best=none")


def _kinds(data: list[TaskData]) -> dict[str, str]:
    return {td.task.name: td.task.kind for td in data}


def check_rows_left(cfg: Config, data: list[TaskData]) -> None:
    """Every choosing task must keep validation rows that did not choose, to report on."""
    n = cfg.train.eval_rows_during_training
    for td in data:
        if td.task.name in choosing_tasks(cfg, _kinds(data)) and len(td.val) <= n:
            raise UserError(f"train.keep_best={cfg.train.keep_best}: task {td.task.name} has {len(td.val)} validation rows "
                            f"and train.eval_rows_during_training={n} chooses on all of them, leaving none to report on; "
                            f"lower train.eval_rows_during_training below {len(td.val)} (or raise data.val_fraction)")


def held_out(cfg: Config, data: list[TaskData]) -> list[TaskData]:
    """``data`` with each choosing task's validation rows less the ones that chose the checkpoint (keep_best: none:
    ``data`` unchanged). The rows that chose are those training scored: ``subsample(val, N, seed)``."""
    choosing = choosing_tasks(cfg, _kinds(data))
    out = []
    for td in data:
        if td.task.name in choosing:
            chose = {id(ex) for ex in subsample(td.val, cfg.train.eval_rows_during_training, cfg.seed)}
            td = dataclasses.replace(td, val=[ex for ex in td.val if id(ex) not in chose])
        out.append(td)
    return out


def choice(cfg: Config, run: RunDir) -> dict[str, Any] | None:
    """The kept checkpoint as the run's trainer state records it (None for keep_best: none)."""
    if cfg.train.keep_best == "none":
        return None
    state_file = run.logs / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    kinds = {t.name: t.type for t in cfg.tasks}
    best = state.get("best_global_step")
    return {"keep_best": cfg.train.keep_best, "step": best if best else state.get("global_step"),
            "score": state.get("best_metric") if best else None, "last_step": state.get("global_step"),
            "chosen_on_rows": cfg.train.eval_rows_during_training, "tasks": choosing_tasks(cfg, kinds)}


def annotate(results: dict[str, dict[str, Any]], chosen: dict[str, Any] | None, data: list[TaskData]) -> dict[str, dict[str, Any]]:
    """Each task's metrics with the checkpoint they are of and, for a choosing task, the rows left out (metrics.json)."""
    if chosen is None:
        return results
    val = {td.task.name: len(td.val) for td in data}
    out = {}
    for name, r in results.items():
        left_out = min(chosen["chosen_on_rows"], val.get(name, 0)) if name in chosen["tasks"] else 0
        out[name] = {**r, "checkpoint_step": chosen["step"], "keep_best": chosen["keep_best"], "rows_left_out": left_out}
    return out


def note(chosen: dict[str, Any] | None) -> str:
    """The line report.md says the choice in."""
    if chosen is None:
        return ""
    if chosen["score"] is None:
        return (f"train.keep_best={chosen['keep_best']}: no evaluation scored during training, so final/ holds the last "
                f"step ({chosen['last_step']}).")
    tasks = ", ".join(chosen["tasks"])
    return (f"Weights of step {chosen['step']} of {chosen['last_step']} (train.keep_best={chosen['keep_best']}: the best "
            f"{'mean ' if len(chosen['tasks']) > 1 else ''}accuracy, {chosen['score']:.3f}, on the "
            f"{chosen['chosen_on_rows']} validation rows per task scored during training). The metrics of {tasks} are on "
            "their other validation rows only, never the rows that chose the step.")
