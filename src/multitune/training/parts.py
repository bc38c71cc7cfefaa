"""The kinds of part a run trains, and what each supplies to the one launch (multitune.launch.runner).

A run is a list of parts (multitune.rundir.parts): the run itself (strategy: joint), or one part per task
(strategy: per_task, each with its own checkpoints/<task>/ and final/<task>/). Every part is trained by
the run's kind:

    LmParts    head: lm, TRL's SFTTrainer writing the label; a part's weights are complete when its
               cost.json is written (last, by save_outputs)
    HeadParts  head: classifier, a Trainer on a classification head per task; complete when its
               heads.json is written (last)

The launch asks the kind only what differs: refusals before anything is written, the trainer, the
marker of a finished part, how to reload one and how to score it. Every rank makes the same calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multitune.config import Config
from multitune.data.prepared import Prepared
from multitune.distributed import checked
from multitune.modeling.heads import HEADS_FILE, load_trained
from multitune.modeling.load import load_for_inference
from multitune.modeling.speed import uncompiled
from multitune.results.selection import held_out
from multitune.rundir import RunDir
from multitune.scoring.evaluate import evaluate_tasks
from multitune.scoring.heads import evaluate_heads, tasks_of
from multitune.training import classifier, lm, wandb_log
from multitune.training.stages import COST_FILE, Setup


def part_setup(setup: Setup, part: RunDir) -> Setup:
    """The run's prepared data narrowed to the part's tasks: what a single-task run of them would train on, in
    order (the run's mixed stream holds each task's rows contiguously; the part's are selected)."""
    names = {td.task.name for td in tasks_of(part, setup.data)}
    p = setup.prepared
    if names == {td.task.name for td in p.data}:
        return setup
    rows = [i for i, name in enumerate(list(p.train["task"])) if name in names]
    data = [td for td in p.data if td.task.name in names]
    evals = {name: ds for name, ds in p.eval.items() if name in names}
    return Setup(setup.tokenizer, setup.formatter, Prepared(data, p.train.select(rows), evals, p.cached), setup.kernels)


def trained_step(part: RunDir) -> int:
    """The last optimizer step of a part's finished training (its trainer_state.json)."""
    state = part.logs / "trainer_state.json"
    return int(json.loads(state.read_text()).get("global_step", 0)) if state.exists() else 0


class LmParts:
    """head: lm: the model writes the label."""

    def check(self, cfg: Config) -> None:
        return None

    def before_prepare(self, cfg: Config) -> None:
        return None

    def prepared(self, setup: Setup) -> Setup:
        return setup

    def is_done(self, part: RunDir) -> bool:
        return (part.logs / COST_FILE).exists() and part.final.exists()

    def trainer(self, cfg: Config, part: RunDir, args, setup: Setup, checkpoint: Path | None, started_over: str):
        return lm.build_trainer(cfg, part, args, part_setup(setup, part), checkpoint, started_over)

    def mark_done(self, trainer, part: RunDir, setup: Setup) -> None:
        return None  # save_outputs wrote cost.json last

    def load(self, cfg: Config, part: RunDir, setup: Setup):
        return load_for_inference(cfg, part.final)

    def evaluate(self, model, cfg: Config, part: RunDir, setup: Setup) -> dict[str, dict[str, Any]]:
        data = held_out(cfg, tasks_of(part, setup.data))  # train.keep_best: not the rows that chose the weights
        # the module under a torch.compile wrapper: scoring's shapes would recompile it batch after batch
        return evaluate_tasks(uncompiled(model), setup.formatter, data, mode=cfg.eval.mode,
                              batch_size=cfg.eval.rows, seed=cfg.seed, detail=True)


class HeadParts:
    """head: classifier: a classification head per task reads the prompt's last token."""

    def check(self, cfg: Config) -> None:
        classifier.check(cfg)

    def before_prepare(self, cfg: Config) -> None:
        checked(lambda: classifier.readable_prompt(cfg))

    def prepared(self, setup: Setup) -> Setup:
        setup.tokenizer.padding_side = "right"  # the training collator pads like `heads.probabilities`
        return setup

    def is_done(self, part: RunDir) -> bool:
        return (part.final / HEADS_FILE).exists()

    def trainer(self, cfg: Config, part: RunDir, args, setup: Setup, checkpoint: Path | None, started_over: str):
        data = tasks_of(part, setup.data)  # no Hub checkpoints for heads (config validation): started_over is moot
        wandb_log.start(cfg, part)  # per_task: this task's model's own wandb run
        return classifier.build_trainer(cfg, args, setup, data, classifier.heads_of(data), checkpoint)

    def mark_done(self, trainer, part: RunDir, setup: Setup) -> None:
        if trainer.args.should_save:
            classifier.heads_of(tasks_of(part, setup.data)).save(part.final)  # last: marks these weights complete

    def load(self, cfg: Config, part: RunDir, setup: Setup):
        return load_trained(cfg, part.final, setup.tokenizer)[0]

    def evaluate(self, model, cfg: Config, part: RunDir, setup: Setup) -> dict[str, dict[str, Any]]:
        data = tasks_of(part, setup.data)  # every rank scores every row (a sharded model needs them all)
        return evaluate_heads(model, setup.formatter, data, classifier.heads_of(data), batch_size=cfg.eval.rows,
                              seed=cfg.seed)


def part_kind(cfg: Config) -> LmParts | HeadParts:
    return HeadParts() if cfg.head == "classifier" else LmParts()
