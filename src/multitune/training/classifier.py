"""`head: classifier`: train, evaluate and predict with a classification head per task (multitune.modeling.heads).

The run is laid out like an LM run (config.yaml, splits/, checkpoints/, final/, metrics.json,
report.md, DONE), so `multitune eval` and `multitune predict` work on it and its metrics have the same
schema. With ``strategy: joint`` one adapter is trained on every task with one score layer holding
each task's head (final/); with ``strategy: per_task`` each task gets its own adapter and head,
trained one after the other (final/<task>/ with its own trainer_state.json and cost.json,
checkpoints/<task>/; the run's cost.json is their sum).

A launch goes through the LM path's stages (multitune.training.train): ``plan_launch`` for each model the run
trains (the same refusals, resume agreement across ranks and relaunch of a finished run),
``prepare_run`` (split, data cache, run directory), ``fit`` and ``save_outputs``. Only the trainer
and the scoring differ: transformers' Trainer (there is no completion for TRL's SFTTrainer to
supervise) on the LM path's prompts with the LM path's arguments, checkpoint callbacks and FSDP
adapter checkpoints.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from transformers import DataCollatorWithPadding, Trainer, set_seed

from multitune.training import wandb_log
from multitune.training.adapter_state import PortableAdapterCheckpoints
from multitune.training.checkpoints import CompleteMarker, GracefulStop, TimedCheckpoints, TrainingClock
from multitune.config import Config
from multitune.data.load import TaskData, _weighted, subsample
from multitune.distributed import any_rank, checked
from multitune.errors import UserError
from multitune.scoring.calibration import calibration_metrics
from multitune.scoring.evaluate import format_table, prediction_rows, write_results
from multitune.data.formatting import Formatter, TooLong
from multitune.modeling.heads import HEADS_FILE, Heads, SlicedLoss, build_model, load_trained, probabilities, prompt_ids
from multitune.hub import mirror_root
from multitune.modeling.load import adapters_in_fp32, load_tokenizer
from multitune.rundir import RunDir, TaskRun, part_of, parts, strict_json, training_log
from multitune.training.guards import DivergenceGuard, lock_run
from multitune.tasks import Example, Task, resolve_tasks
from multitune.training.train import (
    COST_FILE, Setup, already_finished, checkpointing_for_peft, fit, plan_launch, prepare_run, save_outputs,
    sft_config, total_cost,
)

MODE = "classifier"  # the `mode` recorded in metrics.json, beside the LM path's likelihood / generate


def check(cfg: Config) -> None:
    """Refuse what a classification head cannot do, before anything is written."""
    chat = [t.name for t in cfg.tasks if t.type == "chat"]
    if chat:
        raise UserError(f"head: classifier needs a label to predict, but task(s) {chat} are chat tasks; "
                        "remove them from this run or train them with head: lm")
    if cfg.hub.push:
        raise UserError("hub.push is not supported with head: classifier yet; upload run_dir/final with `hf upload`")
    if cfg.train.hub_checkpoints:
        raise UserError("train.hub_checkpoints is not supported with head: classifier yet; keep run_dir on a volume")


def tasks_of(part: RunDir, data: list[TaskData]) -> list[TaskData]:
    return [td for td in data if not isinstance(part, TaskRun) or td.task.name == part.task]


def heads_of(data: list[TaskData]) -> Heads:
    return Heads({td.task.name: list(td.task.label_names) for td in data})


# ---------------------------------------------------------------- data and metrics


def task_prompts(td: TaskData, formatter: Formatter, rows: list[Example]) -> list[list[int]]:
    """The rows' prompt tokens (input text cut in the middle to fit model.max_length), errors naming the task."""
    try:
        return prompt_ids(formatter, rows)
    except TooLong as e:
        raise UserError(f"task {td.task.name}: {e}") from None


def training_dataset(data: list[TaskData], heads: Heads, formatter: Formatter, seed: int) -> datasets.Dataset:
    """Prompt tokens and global head rows of every task's training examples, each task scaled by its weight."""
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for td in data:
        labels = [heads.global_label(td.task.name, ex.label) for ex in td.train]
        rows = list(zip(task_prompts(td, formatter, td.train), labels, strict=True))
        rows = _weighted(rows, td.task.cfg.weight, seed)  # the LM path's mixing, so both heads see the same stream
        columns["input_ids"] += [r[0] for r in rows]
        columns["labels"] += [r[1] for r in rows]
    return datasets.Dataset.from_dict(columns)


def validation_datasets(
    data: list[TaskData], heads: Heads, formatter: Formatter, max_rows: int | None, seed: int
) -> dict[str, datasets.Dataset]:
    out = {}
    for td in data:
        rows = subsample(td.val, max_rows or td.task.cfg.max_eval_rows, seed)  # the rows `evaluate` scores
        labels = [heads.global_label(td.task.name, ex.label) for ex in rows]
        out[td.task.name] = datasets.Dataset.from_dict({"input_ids": task_prompts(td, formatter, rows), "labels": labels})
    return out


def metrics_during_training(data: list[TaskData], heads: Heads):
    """Trainer's compute_metrics: each per-task validation set's accuracy and macro-F1 (reported as eval_<task>_*)."""
    tasks = {td.task.name: td.task for td in data}

    def compute(pred) -> dict[str, float]:
        labels = torch.as_tensor(pred.label_ids)
        if labels.numel() == 0:
            return {}
        name = heads.task_of(int(labels[0]))  # each validation set holds one task
        rows = heads.rows(name)
        logits = torch.as_tensor(pred.predictions)[:, rows]
        scored = tasks[name].score((labels - rows.start).tolist(), logits.argmax(-1).tolist())
        return {"accuracy": scored["accuracy"], "macro_f1": scored["macro_f1"]}

    return compute


def evaluate(model, formatter: Formatter, data: list[TaskData], heads: Heads, *, batch_size: int,
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


# ---------------------------------------------------------------- training


class HeadTrainer(DivergenceGuard, PortableAdapterCheckpoints, Trainer):
    """Trainer with the LM path's FSDP adapter checkpoints and fp32 adapters (see train.MultitaskTrainer);
    with report_to: wandb, each evaluation also logs a table of validation predictions per task."""

    def __init__(self, *args, tables: tuple | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        adapters_in_fp32(self.model)
        self.tables = tables  # (cfg, formatter, data, heads) when wandb gets prediction tables

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.tables and eval_dataset is None and metric_key_prefix == "eval":  # every rank alike (report_to is shared)
            cfg, formatter, data, heads = self.tables
            results = evaluate(self.model, formatter, data, heads, batch_size=self.args.per_device_eval_batch_size,
                               max_rows=cfg.train.eval_rows_during_training or None, seed=cfg.seed)
            wandb_log.log_evaluation(results, self.state.global_step)
        return metrics

    def _run_epoch(self, *args, **kwargs):
        # as MultitaskTrainer: resumed from a checkpoint of the last step, Trainer would run a step past the end
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)


def build_trainer(cfg: Config, args, setup: Setup, data: list[TaskData], heads: Heads, resume_from: Path | None = None) -> HeadTrainer:
    """The Trainer of one model (adapter + heads) on ``data``, with the LM path's callbacks."""
    args.include_num_input_tokens_seen = "non_padding"  # kept in the trainer state, so it survives a resume
    set_seed(cfg.seed)  # before the head and adapter exist: their initialisation draws random numbers
    model = build_model(cfg, heads, setup.tokenizer)
    return HeadTrainer(
        model=model, args=args,
        train_dataset=training_dataset(data, heads, setup.formatter, cfg.seed),
        eval_dataset=validation_datasets(data, heads, setup.formatter, cfg.train.eval_rows_during_training or None, cfg.seed),
        processing_class=setup.tokenizer, data_collator=DataCollatorWithPadding(setup.tokenizer, padding=True),
        compute_loss_func=SlicedLoss(heads), compute_metrics=metrics_during_training(data, heads),
        callbacks=[TrainingClock(resume_from), CompleteMarker(), TimedCheckpoints(cfg.train.save_minutes), GracefulStop()],
        tables=(cfg, setup.formatter, data, heads) if cfg.train.report_to == "wandb" else None,
    )


def _readable_prompt(cfg: Config) -> None:
    """Refuse, before anything is written, a tokenizer whose prompts end in its pad token (see heads.prompt_ids)."""
    formatter = Formatter(load_tokenizer(cfg.model, mirror_root(cfg.hub_mirror)), cfg.model.max_length)
    prompt_ids(formatter, [Example([{"role": "user", "content": "x"}], "", -1)])


def train(cfg: Config, *, resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train, save and evaluate the classification heads; every rank calls this, the writers write files."""
    cfg = checkpointing_for_peft(resolve_tasks(cfg))
    check(cfg)
    run = RunDir(Path(cfg.run_dir))
    args = sft_config(cfg, run)
    _ = args.world_size  # sets up torch.distributed when launched by torchrun / accelerate
    lock_run(run, args.should_save)  # one launch per run directory, before anything is written there
    # Everything that can reject the input runs before anything is written to the run directory.
    launches = [plan_launch(cfg, part, args, resume=resume, overwrite=overwrite) for part in parts(cfg, run)]
    if launches[0].mode == "finished":  # every part reads the same config and DONE: they agree
        return already_finished(run)
    checked(lambda: _readable_prompt(cfg))
    setup = prepare_run(cfg, run, resuming=launches[0].mode == "resume", writer=args.should_save)
    setup.tokenizer.padding_side = "right"  # the training collator pads like `heads.probabilities`
    results: dict[str, dict[str, Any]] = {}
    costs, last_step = [], 0
    for part, launch in zip(parts(cfg, run), launches, strict=True):
        data, writer = tasks_of(part, setup.data), args.should_save
        heads = heads_of(data)
        if not any_rank(not (part.final / HEADS_FILE).exists()):  # finished in an earlier launch (never after "new")
            model, _ = load_trained(cfg, part.final, setup.tokenizer)
            costs.append(json.loads((part.logs / COST_FILE).read_text()) if writer else {})
        else:
            part_args = sft_config(cfg, part)
            part_args.gradient_accumulation_steps = launch.grad_accum
            wandb_log.start(cfg, part)  # per_task: this task's model's own wandb run
            trainer = build_trainer(cfg, part_args, setup, data, heads, launch.checkpoint)
            if not fit(trainer, launch.checkpoint):
                return {}
            save_outputs(trainer, part, setup.tokenizer)  # cost.json in part.logs
            cost = json.loads((part.logs / COST_FILE).read_text()) if writer else {}
            if writer:
                heads.save(part.final)  # last: marks these weights complete
            trainer.accelerator.wait_for_everyone()
            model, costs, last_step = trainer.model, costs + [cost], trainer.state.global_step
        # every rank scores (a sharded model needs them all); the writers report
        results |= evaluate(model, setup.formatter, data, heads, batch_size=cfg.eval.batch_size, seed=cfg.seed)
        del model
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    plots = {}
    if args.should_save:
        if cfg.strategy == "per_task":  # each task's model wrote its own; the run's is their sum
            (run.root / COST_FILE).write_text(strict_json(total_cost(costs)))
        plots = write_results(run.root, results, _header(cfg), log_history=training_log(cfg, run))  # curves of every model
        print(format_table(results))
        run.mark_done()
    wandb_log.finish(cfg, run, results, plots, last_step if cfg.strategy == "joint" else 0)  # the run's own wandb run
    PartialState().wait_for_everyone()
    return results


def _header(cfg: Config, note: str = "") -> str:
    return f"multitune validation (classifier head, {cfg.strategy}{note}): {cfg.model.name_or_path} ({cfg.peft.method})"


# ---------------------------------------------------------------- eval and predict on a finished run


def evaluate_run(run: RunDir, cfg: Config, *, mode: str | None = None, max_rows: int | None = None) -> dict[str, dict[str, Any]]:
    """`multitune eval` for a classifier run: re-score the recorded validation split with the saved heads.

    All rows rewrite metrics.json; --max-rows writes metrics-classifier-<N>rows.json beside it (as the LM path)."""
    from multitune.data.load import load_tasks

    if mode not in (None, MODE):
        raise UserError(f"--mode {mode} applies to head: lm runs; this run predicts with its classifier head (leave --mode out)")
    data = load_tasks(cfg, run.splits, create=False)
    results: dict[str, dict[str, Any]] = {}
    for part in parts(cfg, run):
        tokenizer = load_tokenizer(cfg.model, None, source=str(part.final))
        model, heads = load_trained(cfg, part.final, tokenizer)
        group = tasks_of(part, data)
        formatter = Formatter(tokenizer, cfg.model.max_length)
        results |= evaluate(model, formatter, group, heads, batch_size=cfg.eval.batch_size, max_rows=max_rows, seed=cfg.seed)
        del model
    name = f"{MODE}-{max_rows}rows" if max_rows else ""
    write_results(run.root, results, _header(cfg, f", at most {max_rows} rows per task" if max_rows else ""), name,
                  log_history=training_log(cfg, run))
    print(format_table(results))
    print(f"wrote {run.root / (f'metrics-{name}.json' if name else 'metrics.json')}")
    return results


def probabilities_of(run: RunDir, cfg: Config, task: Task, examples: list[Example]) -> torch.Tensor:
    """`multitune predict` for a classifier run: [N, K] the head's label probabilities for each example."""
    out = part_of(cfg, run, task.name).final
    tokenizer = load_tokenizer(cfg.model, None, source=str(out))
    model, heads = load_trained(cfg, out, tokenizer)
    if heads.labels.get(task.name) != task.label_names:
        raise UserError(f"{out / HEADS_FILE} does not hold task {task.name}'s labels; the run directory is inconsistent")
    ids = prompt_ids(Formatter(tokenizer, cfg.model.max_length), examples)
    return probabilities(model, tokenizer, ids, heads.rows(task.name), cfg.eval.batch_size)
