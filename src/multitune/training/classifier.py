"""`head: classifier`: train, evaluate and predict with a classification head per task (multitune.modeling.heads).

The run is laid out like an LM run (config.yaml, splits/, checkpoints/, final/, metrics.json,
report.md, DONE), so `multitune eval` and `multitune predict` work on it and its metrics have the same
schema. With ``strategy: joint`` one adapter is trained on every task with one score layer holding
each task's head (final/); with ``strategy: per_task`` each task gets its own adapter and head,
trained one after the other (final/<task>/ with its own trainer_state.json and cost.json,
checkpoints/<task>/; the run's cost.json is their sum).

A launch goes through the LM path's stages (multitune.training.stages, through the one launch in multitune.launch.runner): ``plan_launch`` for each model the run
trains (the same refusals, resume agreement across ranks and relaunch of a finished run),
``prepare_run`` (split, data cache, run directory), ``fit`` and ``save_outputs``. Only the trainer
and the scoring differ: transformers' Trainer (there is no completion for TRL's SFTTrainer to
supervise) on the LM path's prompts with the LM path's arguments, checkpoint callbacks and FSDP
adapter checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from transformers import DataCollatorWithPadding, Trainer, set_seed

from multitune.training.adapter_state import PortableAdapterCheckpoints
from multitune.training.checkpoints import CompleteMarker, GracefulStop, TimedCheckpoints, TrainingClock
from multitune.config import Config
from multitune.data.load import TaskData, _weighted, subsample
from multitune.errors import UserError
from multitune.data.formatting import Formatter
from multitune.scoring.heads import evaluate_heads, task_prompts
from multitune.modeling.heads import Heads, SlicedLoss, build_model, prompt_ids
from multitune.hub import mirror_root
from multitune.modeling.load import adapters_in_fp32, for_kernels, load_tokenizer
from multitune.tasks import Example
from multitune.training.hooks import TaskEvaluation
from multitune.training.stages import Setup
from multitune.training.guards import DivergenceGuard

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


def heads_of(data: list[TaskData]) -> Heads:
    return Heads({td.task.name: list(td.task.label_names) for td in data})


# ---------------------------------------------------------------- data and metrics


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


# ---------------------------------------------------------------- training


class HeadTrainer(TaskEvaluation, DivergenceGuard, PortableAdapterCheckpoints, Trainer):
    """Trainer with the LM path's FSDP adapter checkpoints and fp32 adapters (see lm.MultitaskTrainer);
    with report_to: wandb, each evaluation also logs a table of validation predictions per task (hooks)."""

    def __init__(self, *args, tables: tuple | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        adapters_in_fp32(self.model)
        self.tables = tables  # (cfg, formatter, data, heads) when wandb gets prediction tables

    def score_tasks(self, tables: bool):
        """With wandb only: each task's predictions through its head (Trainer's compute_metrics gives the scalars)."""
        if not self.tables:
            return None
        cfg, formatter, data, heads = self.tables
        results = evaluate_heads(self.model, formatter, data, heads, batch_size=self.args.per_device_eval_batch_size,
                                 max_rows=cfg.train.eval_rows_during_training or None, seed=cfg.seed)
        return results, {}


def build_trainer(cfg: Config, args, setup: Setup, data: list[TaskData], heads: Heads, resume_from: Path | None = None) -> HeadTrainer:
    """The Trainer of one model (adapter + heads) on ``data``, with the LM path's callbacks."""
    args.include_num_input_tokens_seen = "non_padding"  # kept in the trainer state, so it survives a resume
    set_seed(cfg.seed)  # before the head and adapter exist: their initialisation draws random numbers
    # auto's kernels as agreed by every process (the trainer keeps the user's config: checkpoints compare it)
    model = build_model(for_kernels(cfg, setup.kernels), heads, setup.tokenizer)
    return HeadTrainer(
        model=model, args=args,
        train_dataset=training_dataset(data, heads, setup.formatter, cfg.seed),
        eval_dataset=validation_datasets(data, heads, setup.formatter, cfg.train.eval_rows_during_training or None, cfg.seed),
        processing_class=setup.tokenizer, data_collator=DataCollatorWithPadding(setup.tokenizer, padding=True),
        compute_loss_func=SlicedLoss(heads), compute_metrics=metrics_during_training(data, heads),
        callbacks=[TrainingClock(resume_from), CompleteMarker(), TimedCheckpoints(cfg.train.save_minutes), GracefulStop()],
        tables=(cfg, setup.formatter, data, heads) if cfg.train.report_to == "wandb" else None,
    )


def readable_prompt(cfg: Config) -> None:
    """Refuse, before anything is written, a tokenizer whose prompts end in its pad token (see heads.prompt_ids)."""
    formatter = Formatter(load_tokenizer(cfg.model, mirror_root(cfg.hub_mirror)), cfg.model.max_length)
    prompt_ids(formatter, [Example([{"role": "user", "content": "x"}], "", -1)])
