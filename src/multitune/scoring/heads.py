"""Scoring with classification heads (`head: classifier`): each task's validation rows through its slice of the
score layer, in the schema of multitune.scoring.evaluate.evaluate_tasks with ``detail``."""

from __future__ import annotations

from typing import Any

from multitune.data.formatting import Formatter, TooLong
from multitune.data.load import TaskData, subsample
from multitune.errors import UserError
from multitune.modeling.heads import Heads, probabilities, prompt_ids
from multitune.rundir import RunDir
from multitune.scoring.calibration import calibration_metrics
from multitune.scoring.evaluate import prediction_rows
from multitune.tasks import Example

MODE = "classifier"  # the `mode` recorded in metrics.json, beside the LM path's likelihood / generate


def tasks_of(part: RunDir, data: list[TaskData]) -> list[TaskData]:
    return [td for td in data if part.holds(td.task.name)]


def task_prompts(td: TaskData, formatter: Formatter, rows: list[Example]) -> list[list[int]]:
    """The rows' prompt tokens (input text cut in the middle to fit model.max_length), errors naming the task."""
    try:
        return prompt_ids(formatter, rows)
    except TooLong as e:
        raise UserError(f"task {td.task.name}: {e}") from None


def evaluate_heads(model, formatter: Formatter, data: list[TaskData], heads: Heads, *, batch_size: int,
             max_rows: int | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each task's validation metrics from its head, in the schema of evaluate.evaluate_tasks with ``detail``:
    the metrics, the calibration of the head's probability, and every row's prediction (text, gold, predicted,
    score). Every rank scores every row (the same forward passes on each: FSDP's collectives stay paired)."""
    results = {}
    for td in data:
        rows = subsample(td.val, max_rows or td.task.cfg.max_eval_rows, seed)
        probs = probabilities(model, formatter.tokenizer, task_prompts(td, formatter, rows), heads.rows(td.task.name), batch_size)
        score, pred = probs.max(-1)
        pred, score, gold = pred.tolist(), score.tolist(), [ex.label for ex in rows]
        results[td.task.name] = {
            "kind": td.task.kind, "mode": MODE, **td.task.score(gold, pred),
            **calibration_metrics(score, [p == g for p, g in zip(pred, gold, strict=True)]),
            "predictions": prediction_rows(rows, td.task.label_names, gold, pred, score),
        }
    return results
