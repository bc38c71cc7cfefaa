"""Evaluate anything on a recorded split: a trained run or the base model alone, zero-shot or with k
examples in the prompt (in-context learning), under the run's prompt template or another named one.

A non-default evaluation writes ``metrics-<variant>.json`` (and ``report-<variant>.md``) beside the
run's results; only a trained run's own evaluation (its mode, every row, no shots, its template)
writes ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from multitune.config import Config
from multitune.data.load import TaskData, load_tasks
from multitune.errors import UserError
from multitune.data.fewshot import add_shots
from multitune.hub import mirror_root
from multitune.scoring.scorer import MODES
from multitune.tasks import build_task, templates



@dataclass(frozen=True)
class Variant:
    """How to evaluate: the base model or the run's weights, shots, template, scoring mode, rows."""

    base: bool = False
    shots: int = 0
    template: str | None = None
    mode: str | None = None  # None: the config's eval.mode
    max_rows: int | None = None

    def name(self, cfg: Config) -> str:
        """The file suffix: "" for a trained run's own evaluation, else e.g. base-2shot-tpl-terse."""
        parts = (["base"] if self.base else []) + ([f"{self.shots}shot"] if self.shots else [])
        parts += [f"tpl-{self.template}"] if self.template else []
        mode = self.mode or cfg.eval.mode
        if mode != cfg.eval.mode or self.max_rows:
            parts += [mode] + ([f"{self.max_rows}rows"] if self.max_rows else [])
        return "-".join(parts)

    def describe(self, cfg: Config) -> str:
        what = "base model" if self.base else cfg.peft.method
        bits = [self.mode or cfg.eval.mode, f"{self.shots}-shot"]
        bits += [f"template {self.template}"] if self.template else []
        bits += [f"at most {self.max_rows} rows per task"] if self.max_rows else []
        return f"multitune validation ({', '.join(bits)}): {cfg.model.name_or_path} ({what})"


def check_variant(cfg: Config, variant: Variant) -> None:
    """Refuse, before loading anything, a mode, shot count or template that cannot apply."""
    mode = variant.mode or cfg.eval.mode
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose {', '.join(MODES)}")
    if variant.shots < 0:
        raise UserError(f"--shots {variant.shots}: give 0 (zero-shot) or more examples per prompt")
    if variant.template is not None:
        kinds = {build_task(t).kind for t in cfg.tasks} - {"chat"}
        lacking = [k for k in sorted(kinds) if variant.template not in templates.names(k)]
        if lacking or not kinds:
            avail = sorted(set.intersection(*(set(templates.names(k)) for k in kinds))) if kinds else []
            raise UserError(f"--template {variant.template!r} is not a template of every label task's kind "
                            f"({', '.join(lacking) or 'no label task'}); choose one of {avail}")


def with_template(cfg: Config, data: list[TaskData], name: str) -> list[TaskData]:
    """The same rows of the same split, rendered with template ``name`` (chat tasks keep theirs)."""
    mirror = mirror_root(cfg.hub_mirror)
    out = []
    for td in data:
        if td.task.kind == "chat":
            out.append(td)
            continue
        task = build_task(td.task.cfg.model_copy(update={"template": name}))
        ds = task.load(mirror, cfg.data.drop_unlabelled)
        rows = lambda idx: [task.example(r) for r in ds.select(idx)]  # noqa: E731
        out.append(replace(td, task=task, train=rows(td.split["train"]), val=rows(td.split["val"])))
    return out


def eval_data(cfg: Config, split_dir: Path | None, variant: Variant, seed: int) -> list[TaskData]:
    """The tasks' recorded split (``split_dir``) or, with none recorded there, the deterministic split a
    training run with ``cfg`` makes; re-rendered with the variant's template and shots."""
    recorded = split_dir is not None and split_dir.is_dir() and any(split_dir.glob("*.json"))
    data = load_tasks(cfg, split_dir if recorded else None, create=not recorded)
    if variant.template:
        data = with_template(cfg, data, variant.template)
    if variant.shots:
        data = [td if td.task.kind == "chat" else replace(td, val=add_shots(td.train, td.val, variant.shots, seed, td.task.name))
                for td in data]
    return data


def as_base(cfg: Config) -> Config:
    """The config's base model as a language model (a classifier run's base writes its labels too)."""
    return cfg.model_copy(update={"head": "lm"})


def load_base_model(cfg: Config):
    """The base model, untrained, and its tokenizer, to score with."""
    from multitune.modeling.load import device, load_model, load_tokenizer

    model = load_model(cfg)
    if cfg.peft.method != "qlora":
        model.to(device())
    return model.eval(), load_tokenizer(cfg.model, mirror_root(cfg.hub_mirror))


def evaluate(cfg: Config, data: list[TaskData], variant: Variant, seed: int) -> dict[str, dict[str, Any]]:
    """Per-task metrics of the base model on ``data`` (a trained run: multitune.results.trained)."""
    from multitune.data.formatting import Formatter
    from multitune.scoring.evaluate import evaluate_tasks

    model, tokenizer = load_base_model(cfg)
    return evaluate_tasks(model, Formatter(tokenizer, cfg.model.max_length), data, mode=variant.mode or cfg.eval.mode,
                          batch_size=cfg.eval.rows, max_rows=variant.max_rows, seed=seed, detail=True)


def evaluate_and_write(cfg: Config, root: Path, split_dir: Path | None, variant: Variant) -> Path:
    """Evaluate the base model, write metrics-<variant>.json and report-<variant>.md in ``root``, print the table."""
    from multitune.results.report import format_table, write_results

    check_variant(cfg, variant)
    results = evaluate(cfg, eval_data(cfg, split_dir, variant, cfg.seed), variant, cfg.seed)
    name = variant.name(cfg)
    root.mkdir(parents=True, exist_ok=True)
    write_results(root, results, variant.describe(cfg), name)
    print(format_table(results))
    return root / f"metrics-{name}.json"
