"""`multitune train`: the one launch of every run, whatever it trains (multitune.training.parts).

Under torchrun/accelerate every rank runs :func:`train`, stage by stage; each stage that leads to a
collective is entered by every rank, and everything that can refuse the input runs before anything is
written to the run directory:

    check      what one node can lack (a package, a GPU, a token): agreed, once the process group is up
    agree      fetch the Hub's newest checkpoint on a fresh pod; agree on what this launch does with
               each part's directory (start, resume, or nothing: the same run already finished)
    prepare    the split, the tokenised data (cached) and the run directory
    train      each part not finished by an earlier launch: build its trainer, fit, save its weights
               and its marker; a part finished earlier is reloaded from its weights
    evaluate   each part's tasks on the validation rows, shared out over the ranks
    report     metrics.json, report.md and plots, the run's cost, DONE; wandb; push to the Hub

From the end of the checks to the end of the launch a SIGTERM/SIGINT handler is installed: during training
every rank stops at the same step with a checkpoint; later, the stage under way finishes and every rank
stops at the next stage boundary (one agreed all-reduce each), and a relaunch continues from what was saved.

strategy: per_task trains one model per task, one after the other in one launch: one base in memory at
a time, every rank walks the same parts in the same order (the same collectives), and a relaunch skips
the parts whose marker exists and resumes the first unfinished one from its checkpoints. Each task's
adapter is trained exactly as a single-task run of that task would be: the same recorded split, the same
tokenised rows in the same order, ``set_seed`` before its adapter is created and the same Trainer seed
(tests/integration/test_per_task.py).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from multitune.config import Config
from multitune.distributed import any_rank, main_print, rank
from multitune.errors import UserError
from multitune.launch import autofit
from multitune.modeling.load import Kernels
from multitune.publishing.publish import push
from multitune.results.report import format_table, write_results
from multitune.results.selection import annotate, check_choosable, choice, note
from multitune.results.trained import trained_run
from multitune.files import atomic_write, strict_json
from multitune.rundir import RunDir, one_model, parts, training_log
from multitune.tasks import resolve_tasks
from multitune.training import wandb_log
from multitune.training.args import checkpointing_for_peft, sft_config
from multitune.training.checkpoints import STOP
from multitune.training.guards import lock_run, releases_run_locks
from multitune.training.hub_checkpoints import fetch_newest_checkpoint
from multitune.training.keep_best import restore_best
from multitune.training.parts import HeadParts, LmParts, part_kind, trained_step
from multitune.training.stages import (
    COST_FILE, Launch, Setup, agreed_kernels, already_finished, fit, plan_launch, prepare_run, save_outputs, total_cost,
)


@releases_run_locks
def train(cfg: Config, *, resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train and evaluate; under torchrun/accelerate every rank calls this, and only the writers write files."""
    autofit.expandable_segments()  # before anything touches CUDA
    kind = part_kind(cfg)
    cfg = checkpointing_for_peft(resolve_tasks(cfg))
    kind.check(cfg)  # the config alone: every rank refuses alike
    check_choosable(cfg)
    run = RunDir(Path(cfg.run_dir))
    args = sft_config(cfg, run)
    _ = args.world_size  # sets up torch.distributed when launched by torchrun / accelerate
    autofit.check_global_batch(cfg, args.world_size)  # the config and the processes alone: before the data is prepared
    # what one node can lack: one refusal on every rank, none left waiting; and the kernels every node has (auto)
    kernels = agreed_kernels(cfg, args)
    lock_run(run, args.should_save)  # one launch per run directory, before anything is written there
    with STOP.held():  # a signal from here on stops the launch at its next stage boundary, on every rank
        return run_stages(kind, cfg, run, args, resume=resume, overwrite=overwrite, kernels=kernels)


def run_stages(kind: LmParts | HeadParts, cfg: Config, run: RunDir, args, *, resume: bool, overwrite: bool,
               kernels: Kernels | None = None) -> dict[str, Any]:
    """Agree, prepare, train each unfinished part, evaluate, report; {} when a signal stopped it (relaunch to continue).
    ``kernels``: what every rank can run; the trainers load, and auto-fit models, ``auto`` resolved for them."""
    starting_over = overwrite or not resume  # the flags alone: every rank alike
    if not starting_over:  # a fresh pod: its newest Hub checkpoint, before the resume is planned
        fetch_newest_checkpoint(cfg, run, PartialState(), resume=resume, overwrite=overwrite)
    launches = [plan_launch(cfg, part, args, resume=resume, overwrite=overwrite) for part in parts(cfg, run)]
    if launches[0].mode == "finished":  # every part reads the same config and DONE: they agree
        return already_finished(run)
    if starting_over:  # once the run directory's own refusals passed: the Hub folder's earlier checkpoints go
        fetch_newest_checkpoint(cfg, run, PartialState(), resume=resume, overwrite=overwrite)
    kind.before_prepare(cfg)
    setup = kind.prepared(prepare_run(cfg, run, resuming=launches[0].mode == "resume", writer=args.should_save,
                                      kernels=kernels))
    # batch_size/eval batch_size auto, grad_accum from global_batch_size: the trainers' config (the run records the user's)
    cfg, chosen = autofit.at_launch(cfg, setup.prepared, args.world_size, args.bf16, kernels)
    results: dict[str, dict[str, Any]] = {}
    step = 0
    for part, launch in zip(parts(cfg, run), launches, strict=True):
        if stopped_by_signal(f"training {part.final}"):
            return {}
        started_over = "--overwrite" if overwrite else "" if resume else "--no-resume"
        model = train_part(kind, cfg, part, launch, setup, chosen, started_over=started_over)
        if model is None:  # a signal stopped it with a checkpoint
            return {}
        if stopped_by_signal(f"evaluating {part.final} (saved)"):
            return {}
        results |= kind.evaluate(model, cfg, part, setup)
        step = trained_step(part)
        del model
        release()
    if stopped_by_signal("the report"):
        return {}
    return report(cfg, run, results, step, setup.data, writer=args.should_save)


def stopped_by_signal(before: str) -> bool:
    """At a stage boundary that every rank reaches: True on every rank when any rank received SIGTERM/SIGINT.

    The stage that was running when the signal came (the final save, an evaluation) has finished; what it
    saved is kept, so the relaunch continues from there (a saved part is reloaded, not trained again).
    """
    if not STOP.agreed():
        return False
    main_print(f"stopped on a signal before {before}; run the same command again to continue")
    return True


def train_part(kind: LmParts | HeadParts, cfg: Config, part: RunDir, launch: Launch, setup: Setup, chosen: autofit.AutoFit | None,
               *, started_over: str):
    """The part's trained model: trained now (from its checkpoint, if any), or reloaded when an earlier launch
    finished it; None when a signal stopped training with a checkpoint. ``started_over``: "--no-resume" or
    "--overwrite", the flag that started the run over ("" when resuming): the Hub's checkpoints of the earlier
    run are replaced. ``chosen``: train.batch_size auto's choice, confirmed on the card before step 1."""
    if launch.mode == "resume" and not any_rank(not kind.is_done(part)):  # agreed: every rank finds the marker
        main_print(f"{part.final}: trained by an earlier launch")
        return kind.load(cfg, part, setup)
    args = sft_config(cfg, part)
    if launch.grad_accum is not None:
        args.gradient_accumulation_steps = launch.grad_accum
    trainer = kind.trainer(cfg, part, args, setup, launch.checkpoint, started_over)
    autofit.confirm_on(trainer, chosen, cfg, launch.checkpoint)
    if not fit(trainer, launch.checkpoint):
        return None
    restore_best(trainer)  # train.keep_best: the kept checkpoint's weights, on every rank
    save_outputs(trainer, part, setup.tokenizer)  # cost.json last
    kind.mark_done(trainer, part, setup)
    trainer.accelerator.wait_for_everyone()
    return trainer.model


def release() -> None:
    """One base in memory at a time: the next part loads its own."""
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def report(cfg: Config, run: RunDir, results: dict[str, dict[str, Any]], step: int, data: list, *,
           writer: bool) -> dict[str, Any]:
    """The run's files (the writers), then wandb and the Hub (rank 0), then every rank waits for them."""
    several = not one_model(cfg, run)
    plots = {}
    if writer:
        if several:  # each part wrote its own cost.json; the run's is their sum
            costs = [json.loads((p.logs / COST_FILE).read_text()) for p in parts(cfg, run)]
            atomic_write(run.root / COST_FILE, strict_json(total_cost(costs)))
        chosen = choice(cfg, run)  # train.keep_best: the kept checkpoint's step (joint runs only)
        plots = write_results(run.root, annotate(results, chosen, data), trained_run(run, cfg).header,
                              log_history=training_log(cfg, run), note=note(chosen))
        print(format_table(results))
        run.mark_done()
    wandb_log.finish(cfg, run, results, plots, 0 if several else step)  # per_task: each part trained in its own wandb run
    if cfg.hub.push and rank() == 0:
        try:
            push(run, cfg, results)
        except UserError as e:  # the run is trained and saved: a failed upload must not lose it or hang the other ranks
            print(f"warning: {e}; the run is complete in {run.root}: push it with `multitune push {run.root}`", flush=True)
    PartialState().wait_for_everyone()
    return results
