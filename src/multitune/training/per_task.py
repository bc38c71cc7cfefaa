"""`strategy: per_task` with `head: lm`: one adapter per task on the same base, side by side in one run.

    RUN_DIR/final/<task>/        the task's adapter, tokenizer, trainer_state.json, launch.json, cost.json
    RUN_DIR/checkpoints/<task>/  its checkpoints, resumed as a joint run's are
    RUN_DIR/cost.json            the tasks' costs summed; config.yaml, splits/, metrics.json, DONE as usual

Each task's adapter is trained exactly as a single-task run of that task would be: the same recorded
split, the same tokenised rows in the same order (the run's mixed stream holds each task's rows
contiguously; the task's are selected), ``set_seed`` before its adapter is created and the same
Trainer seed. So a per_task run's adapter for a task predicts what that task's own run predicts
(tests/integration/test_per_task.py). The tasks are trained one after the other in one launch: one
base in memory at a time, every rank walks the same tasks in the same order (the same collectives),
and a relaunch skips the tasks whose final/<task>/cost.json (written last) exists and resumes the
first unfinished one from its checkpoints.

At inference (the end of training, `eval`, `predict`) the base is loaded once and each task's adapter
is added under the task's name (PEFT multi-adapter, multitune.modeling.load.load_task_adapters); each task is
scored with its own adapter made active, without reloading the base.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from multitune.training import wandb_log
from multitune.config import Config
from multitune.data.load import TaskData
from multitune.distributed import any_rank, main_print
from multitune.scoring.evaluate import evaluate_tasks, format_table, write_results
from multitune.data.formatting import Formatter
from multitune.modeling.load import load_for_tasks, use_adapter
from multitune.data.prepared import Prepared
from multitune.rundir import RunDir, part_of, parts, strict_json, training_log
from multitune.training.guards import lock_run
from multitune.tasks import resolve_tasks
from multitune.training.train import (
    COST_FILE, Setup, already_finished, build_trainer, checkpointing_for_peft, fit, plan_launch, prepare_run, save_outputs,
    sft_config, total_cost,
)


def task_setup(setup: Setup, task: str) -> Setup:
    """The run's prepared data narrowed to one task: what a single-task run of it would train on, in order."""
    p = setup.prepared
    rows = [i for i, name in enumerate(list(p.train["task"])) if name == task]
    data = [td for td in p.data if td.task.name == task]
    evals = {name: ds for name, ds in p.eval.items() if name == task}
    return Setup(setup.tokenizer, setup.formatter, Prepared(data, p.train.select(rows), evals, p.cached))


def train(cfg: Config, *, resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train each task's adapter in turn, then score every task with its own; every rank calls this."""
    cfg = checkpointing_for_peft(resolve_tasks(cfg))
    run = RunDir(Path(cfg.run_dir))
    args = sft_config(cfg, run)
    _ = args.world_size  # sets up torch.distributed when launched by torchrun / accelerate
    lock_run(run, args.should_save)  # one launch per run directory, before anything is written there
    # Everything that can reject the input runs before anything is written to the run directory.
    launches = [plan_launch(cfg, part, args, resume=resume, overwrite=overwrite) for part in parts(cfg, run)]
    if launches[0].mode == "finished":  # every part reads the same config and DONE: they agree
        return already_finished(run)
    setup = prepare_run(cfg, run, resuming=launches[0].mode == "resume", writer=args.should_save)
    for part, launch in zip(parts(cfg, run), launches, strict=True):
        if not any_rank(not (part.logs / COST_FILE).exists()):  # finished in an earlier launch (never after "new")
            main_print(f"task {part.task}: its adapter was trained by an earlier launch ({part.final})")
            continue
        part_args = sft_config(cfg, part)
        part_args.gradient_accumulation_steps = launch.grad_accum
        trainer = build_trainer(cfg, part, part_args, task_setup(setup, part.task), launch.checkpoint)
        if not fit(trainer, launch.checkpoint):
            return {}
        save_outputs(trainer, part, setup.tokenizer)  # cost.json last: marks this task's adapter complete
        trainer.accelerator.wait_for_everyone()
        del trainer
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    # scored from the saved adapters, as `eval` and `predict` load them: every rank loads the whole base
    results = evaluate_trained(cfg, run, setup.formatter, setup.data, mode=cfg.eval.mode, seed=cfg.seed, detail=True)
    plots = {}
    if args.should_save:
        costs = [json.loads((p.logs / COST_FILE).read_text()) for p in parts(cfg, run)]
        (run.root / COST_FILE).write_text(strict_json(total_cost(costs)))
        plots = write_results(run.root, results, f"multitune validation (one adapter per task): {cfg.model.name_or_path} "
                              f"({cfg.peft.method})", log_history=training_log(cfg, run))
        print(format_table(results))
        run.mark_done()
    wandb_log.finish(cfg, run, results, plots, step=0)  # the run's own wandb run (each task trained in its own)
    PartialState().wait_for_everyone()
    return results


def tokenizer_dir(cfg: Config, run: RunDir) -> Path:
    """Where the run's trained tokenizer is (every task's folder holds the same one)."""
    return part_of(cfg, run, cfg.tasks[0].name).final


def evaluate_trained(cfg: Config, run: RunDir, formatter: Formatter, data: list[TaskData], *, mode: str,
                     max_rows: int | None = None, seed: int = 0, detail: bool = False) -> dict[str, dict[str, Any]]:
    """evaluate_tasks with the run's saved weights, each task scored with its own adapter under per_task.

    Every rank makes the same calls (the same tasks in the same order), so the sharded scoring agrees."""
    model = load_for_tasks(cfg, run, [td.task.name for td in data])
    if cfg.strategy == "joint":
        return evaluate_tasks(model, formatter, data, mode=mode, batch_size=cfg.eval.batch_size, max_rows=max_rows, seed=seed,
                              detail=detail)
    results: dict[str, dict[str, Any]] = {}
    for td in data:
        use_adapter(model, td.task.name)
        results |= evaluate_tasks(model, formatter, [td], mode=mode, batch_size=cfg.eval.batch_size, max_rows=max_rows, seed=seed,
                                  detail=detail)
    return results
