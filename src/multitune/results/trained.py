"""A trained run, opened from its directory: what `eval`, `predict`, `chat`, `compare` and `push` ask of it.

A run's directory records its config, and so its head (write the label, or a classification head)
and its layout (one model, or one per task: multitune.rundir.parts). :func:`open_run` reads them once
and returns the object that knows them; its callers never branch on head or strategy:

    LmRun    head: lm, joint or per_task: scored by label likelihood (or constrained decoding, or
             generation), each task with its own adapter under per_task
    HeadRun  head: classifier: each task scored through its slice of the score layer
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from multitune.config import Config
from multitune.data.formatting import Formatter
from multitune.data.load import TaskData, load_tasks
from multitune.errors import UserError
from multitune.modeling.heads import HEADS_FILE, load_trained, probabilities, prompt_ids
from multitune.modeling.load import load_for_tasks, load_tokenizer, use_adapter
from multitune.results.report import format_table, write_results
from multitune.results.selection import annotate, choice, held_out, note
from multitune.results.variants import Variant, check_variant, eval_data
from multitune.rundir import RunDir, one_model, part_of, parts, training_log
from multitune.scoring.evaluate import evaluate_tasks
from multitune.scoring.heads import MODE as HEAD_MODE
from multitune.scoring.heads import evaluate_heads, tasks_of
from multitune.scoring.scorer import Scorer
from multitune.tasks import Example, Task


def open_run(root: Path | RunDir, *, require: str | None = "done") -> TrainedRun:
    """The run in ``root``, its config read. ``require``: "done" (trained and DONE: eval, push, export),
    "weights" (every part's weights: predict, chat), or None (the launch scoring what it just trained)."""
    run = root if isinstance(root, RunDir) else RunDir(Path(root))
    cfg = run.load_config()
    if require == "done":
        run.require_done()
    elif require == "weights":
        run.require_finished()
    return trained_run(run, cfg)


def trained_run(run: RunDir, cfg: Config) -> TrainedRun:
    """The kind of trained run ``cfg`` makes in ``run`` (which need not exist yet: what it will accept)."""
    return (HeadRun if cfg.head == "classifier" else LmRun)(run, cfg)


class TrainedRun:
    """What every kind of trained run answers; the subclasses say how."""

    def __init__(self, run: RunDir, cfg: Config):
        self.run, self.cfg = run, cfg

    @property
    def method(self) -> str:
        """How it was trained, for tables: e.g. "lora", "lora, head classifier", "lora, per_task"."""
        cfg = self.cfg
        return ", ".join([cfg.peft.method] + ([f"head {cfg.head}"] if cfg.head != "lm" else [])
                         + ([cfg.strategy] if cfg.strategy != "joint" else []))

    @property
    def header(self) -> str:
        """The title of the run's own report (report.md)."""
        cfg = self.cfg
        return f"multitune validation{self.layout_note}: {cfg.model.name_or_path} ({cfg.peft.method})"

    layout_note = ""

    def tokenizer(self, task: str | None = None):
        """The trained tokenizer (every model of a run saves the same one beside its weights)."""
        return load_tokenizer(self.cfg.model, None, source=str(part_of(self.cfg, self.run, task or self.cfg.tasks[0].name).final))

    def formatter(self, task: str | None = None) -> Formatter:
        return Formatter(self.tokenizer(task), self.cfg.model.max_length)

    def publishable(self, command: str) -> None:
        """Refuse, before anything is written, to publish what `push` / `export` cannot lay out as one model."""
        cfg = self.cfg
        if not one_model(cfg, self.run) or cfg.head != "lm":
            raise UserError(f"`multitune {command}` handles a run with one language-model adapter (head: lm, strategy: joint); "
                            f"this run is head: {cfg.head}, strategy: {cfg.strategy}: upload or copy run_dir/final with `hf upload`")

    def data(self, variant: Variant, seed: int | None = None) -> list[TaskData]:
        """The recorded split's rows as ``variant`` scores them (its shots, drawn with ``seed``, and template)."""
        return eval_data(self.cfg, self.run.splits, variant, self.cfg.seed if seed is None else seed)

    def evaluate_and_write(self, variant: Variant) -> Path:
        """`multitune eval RUN_DIR`: score, write metrics[-<variant>].json and report[-<variant>].md, print the table."""
        self.check_variant(variant)
        data = self.data(variant)
        results = self.evaluate(held_out(self.cfg, data), mode=variant.mode, max_rows=variant.max_rows, seed=self.cfg.seed)
        name, header = self.variant_name(variant), self.describe(variant)
        chosen = choice(self.cfg, self.run)  # train.keep_best: never scored on the rows that chose the weights
        write_results(self.run.root, annotate(results, chosen, data), header, name, training_log(self.cfg, self.run), note(chosen))
        print(format_table(results))
        return self.run.root / (f"metrics-{name}.json" if name else "metrics.json")

    def model(self, tasks: list[str]):
        """The trained language model for ``tasks`` (chat, generation)."""
        raise UserError(f"{self.run.root} predicts with a classification head (head: {self.cfg.head}); it has no language "
                        "model to chat or generate with")

    # what the kinds supply
    def check_variant(self, variant: Variant) -> None: ...
    def variant_name(self, variant: Variant) -> str: ...
    def describe(self, variant: Variant) -> str: ...
    def evaluate(self, data: list[TaskData], *, mode: str | None = None, max_rows: int | None = None,
                 seed: int = 0) -> dict[str, dict[str, Any]]: ...
    def check_predict_mode(self, mode: str) -> None: ...
    def label_probabilities(self, task: Task, examples: list[Example]) -> torch.Tensor: ...


class LmRun(TrainedRun):
    """head: lm: one model on the mixed tasks, or the base with each task's own adapter (strategy: per_task)."""

    @property
    def layout_note(self) -> str:
        return "" if one_model(self.cfg, self.run) else " (one adapter per task)"

    def check_variant(self, variant: Variant) -> None:
        check_variant(self.cfg, variant)

    def variant_name(self, variant: Variant) -> str:
        return variant.name(self.cfg)

    def describe(self, variant: Variant) -> str:
        return variant.describe(self.cfg)

    def model(self, tasks: list[str]):
        """The trained model for ``tasks``, in eval mode (per_task: the base once, each task's adapter on it)."""
        return load_for_tasks(self.cfg, self.run, tasks)

    def evaluate(self, data: list[TaskData], *, mode: str | None = None, max_rows: int | None = None,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
        """evaluate_tasks with the saved weights, each task with its own adapter when it has one.

        Every rank makes the same calls (the same tasks in the same order), so the sharded scoring agrees."""
        cfg, names = self.cfg, [td.task.name for td in data]
        model, formatter = self.model(names), self.formatter()
        groups: dict[Path, list[TaskData]] = {}  # the tasks each saved model holds (per_task: one each)
        for td in data:
            groups.setdefault(part_of(cfg, self.run, td.task.name).final, []).append(td)
        results: dict[str, dict[str, Any]] = {}
        for group in groups.values():
            if len(groups) > 1:
                use_adapter(model, group[0].task.name)
            results |= evaluate_tasks(model, formatter, group, mode=mode or cfg.eval.mode, batch_size=cfg.eval.rows,
                                      max_rows=max_rows, seed=seed, detail=True)
        return results

    def _scorer(self, task: Task) -> Scorer:
        return Scorer(self.model([task.name]), self.formatter(task.name), self.cfg.eval.rows)

    def check_predict_mode(self, mode: str) -> None:
        return None

    def label_probabilities(self, task: Task, examples: list[Example]) -> torch.Tensor:
        """[N, K] each label's probability among the labels (the softmax over their summed log-probs)."""
        return self._scorer(task).likelihood(examples, task.label_names).softmax(-1)

    def constrained(self, task: Task, examples: list[Example]) -> list[tuple[int, float]]:
        """The label greedy decoding inside the label trie spells, and its probability under the whole vocabulary."""
        idx, logp = self._scorer(task).constrained(examples, task.label_names)
        return [(i, math.exp(v)) for i, v in zip(idx, logp, strict=True)]

    def generate(self, task: Task, examples: list[Example], max_new_tokens: int) -> list[str]:
        return self._scorer(task).generate(examples, max_new_tokens)


class HeadRun(TrainedRun):
    """head: classifier: the saved adapter and score layer of each model (one, or one per task)."""

    def check_variant(self, variant: Variant) -> None:
        if variant.shots or variant.template:
            raise UserError("shots, template and mode apply to head: lm runs, not a classifier run (it predicts with its "
                            "classification head): leave out --shots and --template")
        if variant.mode not in (None, HEAD_MODE):
            raise UserError(f"--mode {variant.mode} applies to head: lm runs; this run predicts with its classifier head "
                            "(leave --mode out)")

    def variant_name(self, variant: Variant) -> str:
        return f"{HEAD_MODE}-{variant.max_rows}rows" if variant.max_rows else ""

    @property
    def layout_note(self) -> str:
        return f" (classifier head, {self.cfg.strategy})"

    def describe(self, variant: Variant) -> str:
        if not variant.max_rows:
            return self.header
        cfg = self.cfg
        return (f"multitune validation (classifier head, {cfg.strategy}, at most {variant.max_rows} rows per task): "
                f"{cfg.model.name_or_path} ({cfg.peft.method})")

    def data(self, variant: Variant, seed: int | None = None) -> list[TaskData]:
        return load_tasks(self.cfg, self.run.splits, create=False)

    def evaluate(self, data: list[TaskData], *, mode: str | None = None, max_rows: int | None = None,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
        """Each model's tasks scored with its saved heads (every rank scores every row)."""
        results: dict[str, dict[str, Any]] = {}
        for part in parts(self.cfg, self.run):
            tokenizer = load_tokenizer(self.cfg.model, None, source=str(part.final))
            model, heads = load_trained(self.cfg, part.final, tokenizer)
            formatter = Formatter(tokenizer, self.cfg.model.max_length)
            results |= evaluate_heads(model, formatter, tasks_of(part, data), heads, batch_size=self.cfg.eval.rows,
                                      max_rows=max_rows, seed=seed)
            del model
        return results

    def check_predict_mode(self, mode: str) -> None:
        if mode != "likelihood":
            raise UserError(f"--mode {mode}: a head: classifier run predicts with its classification head; drop --mode")

    def label_probabilities(self, task: Task, examples: list[Example]) -> torch.Tensor:
        """[N, K] the head's label probabilities for each example."""
        cfg, out = self.cfg, part_of(self.cfg, self.run, task.name).final
        tokenizer = load_tokenizer(cfg.model, None, source=str(out))
        model, heads = load_trained(cfg, out, tokenizer)
        if heads.labels.get(task.name) != task.label_names:
            raise UserError(f"{out / HEADS_FILE} does not hold task {task.name}'s labels; the run directory is inconsistent")
        ids = prompt_ids(Formatter(tokenizer, cfg.model.max_length), examples)
        return probabilities(model, tokenizer, ids, heads.rows(task.name), cfg.eval.rows)
