"""Predictions from a trained run: a label with its probability among the labels, or a chat reply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multitune.errors import UserError
from multitune.formatting import Formatter
from multitune.model import load_for_inference, load_tokenizer
from multitune.run import RunDir
from multitune.scoring import Scorer
from multitune.tasks import Task, build_task


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


def predict(run_dir: Path, task_name: str | None, inputs: list[dict[str, Any] | str], max_new_tokens: int = 128) -> list[dict[str, Any]]:
    run = RunDir(Path(run_dir))
    run.require_finished()
    cfg = run.load_config()
    task = restore_task(run, task_name)
    examples = []
    for n, value in enumerate(inputs, 1):
        if not isinstance(value, (dict, str)):
            raise UserError(f"input {n} is a {type(value).__name__}; give a JSON object in the task's schema or a string")
        try:
            examples.append(task.example_from_input(value))
        except UserError as e:
            raise UserError(f"input {n}: {e}") from None
    if cfg.head == "classifier":  # the run's classification head gives the label and its probability
        from multitune import classifier

        return classifier.predict(run, cfg, task, examples)
    tokenizer = load_tokenizer(cfg.model, None, source=str(run.final))
    scorer = Scorer(load_for_inference(cfg, run.final), Formatter(tokenizer, cfg.model.max_length), cfg.eval.batch_size)
    if task.kind == "chat":
        return [{"response": r} for r in scorer.generate(examples, max_new_tokens)]
    probs = scorer.likelihood(examples, task.label_names).softmax(-1)
    out = []
    for p in probs:
        best = int(p.argmax())
        out.append({"label": task.label_names[best], "score": round(float(p[best]), 4)})
    return out
