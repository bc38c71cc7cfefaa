"""Predictions from a trained run: a label with its probability among the labels, or a chat reply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multitune.errors import UserError
from multitune.results.trained import open_run
from multitune.rundir import RunDir
from multitune.tasks import Task, build_task

UNSURE = "unsure"  # the answer below --min-confidence


def restore_task(run: RunDir, name: str | None) -> Task:
    """The trained task, bound as in training (its columns and labels); ``None`` for a one-task run."""
    cfg = run.load_config()
    names = [t.name for t in cfg.tasks]
    if name is None:
        if len(names) > 1:
            raise UserError(f"this run was trained on {len(names)} tasks; choose one with --task ({', '.join(names)})")
        name = names[0]
    if name not in names:
        raise UserError(f"unknown task {name!r} for this run; it was trained on {names}")
    task = build_task(next(t for t in cfg.tasks if t.name == name))
    task.restore(json.loads((run.splits / f"{name}.json").read_text())["task_state"])
    return task


def read_inputs(path: Path) -> list[dict[str, Any] | str]:
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not a JSON line") from None
    return rows


def check_options(kind: str, mode: str, min_confidence: float | None) -> None:
    """Refuse option combinations that mean nothing, before any model is loaded."""
    if mode not in ("likelihood", "constrained"):
        raise UserError(f"--mode {mode!r}: predict chooses labels by likelihood or constrained")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise UserError(f"--min-confidence {min_confidence}: give a probability between 0 and 1")
    if kind == "chat" and (mode != "likelihood" or min_confidence is not None):
        raise UserError("--mode and --min-confidence apply to classification and multiple-choice tasks, not chat")
    if min_confidence is not None and mode != "likelihood":
        raise UserError("--min-confidence needs --mode likelihood: its score is the label's probability among all "
                        "labels (the one whose calibration `eval` reports), which constrained decoding does not compute")


def predict(run_dir: Path, task_name: str | None, inputs: list[dict[str, Any] | str], max_new_tokens: int = 128,
            mode: str = "likelihood", min_confidence: float | None = None) -> list[dict[str, Any]]:
    """Each input's prediction: {"label", "score"} (with ``min_confidence``, label "unsure" and the "guess"
    below it), or {"response"} for a chat task."""
    trained = open_run(Path(run_dir), require="weights")
    task = restore_task(trained.run, task_name)
    check_options(task.kind, mode, min_confidence)
    examples = []
    for n, value in enumerate(inputs, 1):
        if not isinstance(value, (dict, str)):
            raise UserError(f"input {n} is a {type(value).__name__}; give a JSON object in the task's schema or a string")
        try:
            examples.append(task.example_from_input(value))
        except UserError as e:
            raise UserError(f"input {n}: {e}") from None
    trained.check_predict_mode(mode)
    if task.kind == "chat":
        return [{"response": r} for r in trained.generate(task, examples, max_new_tokens)]
    if mode == "constrained":  # the probability of the label the decoding spelled, under the whole vocabulary
        return [{"label": task.label_names[i], "score": round(p, 4)} for i, p in trained.constrained(task, examples)]
    return label_answers(trained.label_probabilities(task, examples), task.label_names, min_confidence)


def label_answers(probs, labels: list[str], min_confidence: float | None = None) -> list[dict[str, Any]]:
    """The most probable label of each row [N, K] with its probability; "unsure" (and the guess) below ``min_confidence``."""
    out = []
    for p in probs:
        best = int(p.argmax())
        score = round(float(p[best]), 4)
        if min_confidence is not None and float(p[best]) < min_confidence:
            out.append({"label": UNSURE, "score": score, "guess": labels[best]})
        else:
            out.append({"label": labels[best], "score": score})
    return out
