"""The language-model trainer (`head: lm`): TRL's SFTTrainer, with each task's label accuracy in its evaluations,
the loss on supervised positions only, and FSDP adapter checkpoints any node can resume from alone."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTConfig, SFTTrainer

from multitune.config import Config
from multitune.data.formatting import Formatter
from multitune.data.load import TaskData
from multitune.modeling.load import adapters_in_fp32, apply_peft, for_kernels, load_model
from multitune.modeling.loss import TAGS, TaskLosses, trainer_loss
from multitune.modeling.speed import uncompiled
from multitune.results.selection import choosing_tasks
from multitune.rundir import RunDir
from multitune.scoring.evaluate import evaluate_tasks
from multitune.training import wandb_log
from multitune.training.adapter_state import PortableAdapterCheckpoints
from multitune.training.autofit import OomBackoff
from multitune.training.checkpoints import CompleteMarker, GracefulStop, TimedCheckpoints, TrainingClock
from multitune.training.guards import DivergenceGuard
from multitune.training.hooks import TaskEvaluation
from multitune.training.hub_checkpoints import hub_callbacks
from multitune.training.keep_best import KeepBest
from multitune.training.stages import Setup


class GlobalLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping (shuffled, then sorted by length within mega-batches of whole batches) over the
    global batch, from a generator seeded by the data seed and the epoch: the examples of each optimizer step, and the
    order of the steps, are the same on any number of processes (accelerate deals each step's consecutive indices out
    to the processes). transformers groups by each process's batch (micro-batch x accumulation) and draws from the
    global generator, so its order changes with the number of processes."""

    def __init__(self, global_batch: int, lengths: list[int], seed: int):
        super().__init__(global_batch, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by Trainer at each epoch (and by a resume, at its epoch)
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class MultitaskTrainer(OomBackoff, TaskEvaluation, DivergenceGuard, PortableAdapterCheckpoints, SFTTrainer):
    """SFTTrainer whose evaluation also reports each task's label accuracy (not just validation loss), and which backs
    off once from out-of-memory in its first steps when the launch chose its micro-batch (OomBackoff).

    The override exists because Trainer's ``compute_metrics`` sees per-token logits of the eval set,
    while label-likelihood accuracy needs its own scoring passes over the candidate labels. Under FSDP,
    adapter checkpoints are gathered whole (PortableAdapterCheckpoints).
    """

    def __init__(self, *args, task_data: list[TaskData], formatter: Formatter, cfg: Config, **kwargs):
        # each task's training loss (loss/<task>) in a joint run's log: the supervised path, one row per example
        self.task_losses = TaskLosses([td.task.name for td in task_data], cfg.train.padding_free) if (
            len(task_data) > 1 and cfg.train.loss_positions == "supervised" and not cfg.train.packing) else None
        super().__init__(*args, **kwargs)
        adapters_in_fp32(self.model)  # TRL made a 4-bit model's adapters bf16; every method trains fp32 adapters
        self.task_data, self.formatter, self.mt_cfg = task_data, formatter, cfg
        if self.task_losses is not None:
            self.data_collator = self.task_losses.collator(self.data_collator)

    def _get_train_sampler(self, train_dataset=None):
        """train.group_by_length with train.global_batch_size: grouped by the global batch (GlobalLengthGroupedSampler),
        so a resume on another number of processes trains the same examples each step."""
        sampler = super()._get_train_sampler(train_dataset)
        g = self.mt_cfg.train.global_batch_size
        if not isinstance(sampler, LengthGroupedSampler) or g is None:
            return sampler
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return GlobalLengthGroupedSampler(g, sampler.lengths, seed)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.task_losses is not None and "task" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "task"]  # kept for the collator, which tags the rows

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.task_losses is not None and "loss" in logs:  # a training row: every rank logs it at the same step
            logs.update(self.task_losses.window(self.accelerator))
        super().log(logs, start_time)

    def score_tasks(self, tables: bool):
        """Label accuracy by likelihood on at most train.eval_rows_during_training rows per labelled task (with
        ``tables``, every label scored: the predictions' probabilities and calibration)."""
        n = self.mt_cfg.train.eval_rows_during_training
        labelled = [td for td in self.task_data if td.task.kind != "chat"]
        if not (n and labelled):
            return None
        results = evaluate_tasks(uncompiled(self.model), self.formatter, labelled, mode="likelihood",
                                 batch_size=self.args.per_device_eval_batch_size, max_rows=n, seed=self.mt_cfg.seed, detail=tables)
        return results, {f"eval_{name}_{key}": r[key] for name, r in results.items() for key in ("accuracy", "macro_f1", "ece") if key in r}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`train.loss_positions: supervised`: the LM head and loss on supervised positions only (multitune.modeling.loss)."""
        tags = inputs.pop(TAGS, None)
        if self.mt_cfg.train.loss_positions == "all" or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return trainer_loss(self, model, inputs, num_items_in_batch,
                            record=self.task_losses.recorder(inputs["labels"], tags) if tags is not None else None)


def build_trainer(cfg: Config, run: RunDir, args: SFTConfig, setup: Setup, resume_from: Path | None = None,
                  started_over: str = "") -> MultitaskTrainer:
    set_seed(cfg.seed)  # before the adapter exists: its initialisation draws random numbers
    # auto's kernels as agreed by every process (the trainer keeps the user's config: checkpoints compare it)
    loaded = load_model(for_kernels(cfg, setup.kernels), for_training=True)
    model = apply_peft(loaded, cfg, cfg.train.gradient_checkpointing)
    wandb_log.start(cfg, run)
    keep = choosing_tasks(cfg, {td.task.name: td.task.kind for td in setup.data})
    return MultitaskTrainer(
        model=model, args=args, train_dataset=setup.prepared.train, eval_dataset=setup.prepared.eval,
        processing_class=setup.tokenizer, task_data=setup.data, formatter=setup.formatter, cfg=cfg,
        callbacks=[TrainingClock(resume_from), CompleteMarker(), TimedCheckpoints(cfg.train.save_minutes), GracefulStop(),
                   *hub_callbacks(cfg, run, started_over=started_over), *([KeepBest(keep)] if keep else [])],
    )
