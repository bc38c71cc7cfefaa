"""Training: thin wiring of the config, tasks, data and model onto TRL's SFTTrainer."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from multitune.checkpoints import CompleteMarker, GracefulStop, TimedCheckpoints, agree_on_resume, latest_complete
from multitune.config import Config
from multitune.data import TaskData, save_splits
from multitune.evaluate import evaluate_tasks, format_table, write_results
from multitune.formatting import Formatter
from multitune.hub import mirror_root
from multitune.loss import trainer_loss
from multitune.model import apply_peft, load_model, load_tokenizer
from multitune.prepared import prepare
from multitune.run import RunDir
from multitune.speed import sft_args
from multitune.tasks import resolve_tasks

log = logging.getLogger(__name__)


class MultitaskTrainer(SFTTrainer):
    """SFTTrainer whose evaluation also reports each task's label accuracy (not just validation loss).

    The override exists because Trainer's ``compute_metrics`` sees per-token logits of the eval set,
    while label-likelihood accuracy needs its own scoring passes over the candidate labels.
    """

    def __init__(self, *args, task_data: list[TaskData], formatter: Formatter, cfg: Config, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_data, self.formatter, self.mt_cfg = task_data, formatter, cfg

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        n = self.mt_cfg.train.eval_rows_during_training
        labelled = [td for td in self.task_data if td.task.kind != "chat"]
        if eval_dataset is None and metric_key_prefix == "eval" and n and labelled:
            results = evaluate_tasks(
                self.model, self.formatter, labelled, mode="likelihood", batch_size=self.args.per_device_eval_batch_size,
                max_rows=n, seed=self.mt_cfg.seed,
            )
            extra = {f"eval_{name}_accuracy": r["accuracy"] for name, r in results.items()}
            extra |= {f"eval_{name}_macro_f1": r["macro_f1"] for name, r in results.items()}
            self.log(extra)
            metrics.update(extra)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`train.loss_positions: supervised`: the LM head and loss on supervised positions only (multitune.loss)."""
        if self.mt_cfg.train.loss_positions == "all" or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return trainer_loss(self, model, inputs, num_items_in_batch)


def _bf16(cfg: Config) -> bool:
    if cfg.train.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(cfg.train.bf16)


def _fsdp_checkpointing() -> bool:
    return os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"


def checkpointing_for_peft(cfg: Config) -> Config:
    """Hand activation checkpointing from FSDP's wrappers to transformers' when training an adapter.

    PEFT (0.21) finds adapter weights by module name, and FSDP's checkpoint wrappers insert
    `_checkpoint_wrapped_module` into those names while state-dict keys leave it out. With
    `fsdp_activation_checkpointing: true`, every FSDP checkpoint and the final adapter came out empty
    (0 tensors, measured with accelerate 1.15), so a resume silently restarted from the base model.
    transformers' checkpointing (train.gradient_checkpointing) recomputes the same layers without
    renaming modules.
    """
    if not _fsdp_checkpointing() or cfg.peft.method == "full":
        return cfg
    os.environ["FSDP_ACTIVATION_CHECKPOINTING"] = "false"  # read by accelerate when the Trainer builds its plugin
    if int(os.environ.get("RANK", "0")) == 0:
        print("note: fsdp_activation_checkpointing is replaced by train.gradient_checkpointing for adapters "
              "(FSDP's wrappers make PEFT save empty adapters)")
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": True})})


def sft_config(cfg: Config, run: RunDir) -> SFTConfig:
    t = cfg.train
    # Under an accelerate FSDP config with fsdp_activation_checkpointing, FSDP wraps the layers itself.
    checkpointing = t.gradient_checkpointing and not _fsdp_checkpointing()
    return SFTConfig(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "epoch",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        save_on_each_node=t.save_on_each_node,
        bf16=_bf16(cfg),
        use_cpu=not torch.cuda.is_available(),
        **sft_args(t),  # train.compile: padded to a multiple of 64, dynamic shapes; train.liger checked (multitune.speed)
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        dataloader_num_workers=t.dataloader_workers,
        report_to=[] if t.report_to == "none" else [t.report_to],
        run_name=t.wandb.run_name or run.root.name,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=cfg.model.max_length,
        packing=t.packing,
        train_sampling_strategy="group_by_length" if t.group_by_length and not t.packing else "random",
        padding_free=t.padding_free,
        eval_packing=False,
    )


def _init_wandb(cfg: Config, run: RunDir) -> None:
    """Start (or continue) the wandb run; its id is kept in the run dir so a resumed job is one wandb run."""
    if cfg.train.report_to != "wandb" or int(os.environ.get("RANK", "0")) != 0:
        return
    import wandb

    id_file = run.root / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    w = cfg.train.wandb
    wandb.init(
        project=w.project, entity=w.entity, name=w.run_name or run.root.name, tags=w.tags, id=run_id, resume="allow",
        dir=str(run.root), config=cfg.model_dump(mode="json"),
    )


def train(cfg: Config, *, resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train and evaluate; under torchrun/accelerate every rank calls this, and only rank 0 writes files."""
    cfg = resolve_tasks(cfg)
    run = RunDir(Path(cfg.run_dir))
    cfg = checkpointing_for_peft(cfg)
    args = sft_config(cfg, run)
    _ = args.world_size  # sets up torch.distributed when launched by torchrun / accelerate
    state = PartialState()
    # Everything that can reject the input runs before anything is written to the run directory.
    resuming = run.check(cfg, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(cfg.model, mirror_root(cfg.hub_mirror))
    formatter = Formatter(tokenizer, cfg.model.max_length)
    prepared = prepare(cfg, formatter, run.splits if resuming else None)
    data, train_ds, eval_ds = prepared.data, prepared.train, prepared.eval
    state.wait_for_everyone()  # every rank has read the run dir before rank 0 changes it
    # the process that writes this node's run dir: the main one, or each node's first with save_on_each_node
    writer = state.is_local_main_process if cfg.train.save_on_each_node else state.is_main_process
    if writer:
        run.prepare(cfg, resuming=resuming)
        save_splits(data, run.splits)
        print(f"training on {len(train_ds)} examples from {len(data)} tasks{' (tokenised data from the cache)' if prepared.cached else ''}: " + ", ".join(f"{td.task.name}={len(td.train)}" for td in data))
    state.wait_for_everyone()

    set_seed(cfg.seed)  # before the adapter exists: its initialisation draws random numbers
    model = apply_peft(load_model(cfg), cfg, cfg.train.gradient_checkpointing)
    _init_wandb(cfg, run)
    stop = GracefulStop()
    trainer = MultitaskTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, task_data=data, formatter=formatter, cfg=cfg,
        callbacks=[CompleteMarker(), TimedCheckpoints(cfg.train.save_minutes), stop],
    )
    last = latest_complete(run.checkpoints) if resuming else None
    agree_on_resume(resuming, last)
    if last and state.is_main_process:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    if stop.requested is not None:
        if state.is_main_process:
            print(f"stopped at step {trainer.state.global_step} with a checkpoint; run the same command again to resume")
        return {}
    save_final(trainer, run.final)
    if writer:
        tokenizer.save_pretrained(str(run.final))
        trainer.state.save_to_json(str(run.root / "trainer_state.json"))  # the whole loss/LR/eval history
        (run.root / "launch.json").write_text(json.dumps(launch_facts(trainer), indent=2))

    # every rank scores (a sharded model needs them all); rank 0 reports
    results = evaluate_tasks(trainer.model, formatter, data, mode=cfg.eval.mode, batch_size=cfg.eval.batch_size, seed=cfg.seed)
    if writer:
        write_results(run.root, results, f"multitune validation: {cfg.model.name_or_path} ({cfg.peft.method})")
        print(format_table(results))
        run.mark_done()
        if cfg.hub.push and state.is_main_process:
            from multitune.publish import push

            push(run, cfg, results)
    state.wait_for_everyone()
    return results


def save_final(trainer: SFTTrainer, path: Path) -> None:
    """Save the trained adapter (or model) for `from_pretrained`, whole, whatever the sharding.

    Trainer.save_model writes nothing at all under FSDP with a sharded state dict, the format the
    checkpoints use (transformers 5.24). So under FSDP every rank joins in gathering the full state
    dict (accelerate's get_state_dict: FSDP2 `get_model_state_dict`, offloaded to rank 0's CPU) and
    the writer saves it. The FSDP tests check that the result holds every rank's shard (the failure
    of accelerate PR 4206).
    """
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(path))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank calls it
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(path), state_dict=state_dict)
        _check_adapter_saved(model, path)
    trainer.accelerator.wait_for_everyone()


def _check_adapter_saved(model: torch.nn.Module, path: Path) -> None:
    """Refuse to report success for an adapter file that lost tensors (cheap: reads the header only)."""
    from peft import PeftModel
    from safetensors import safe_open

    file = path / "adapter_model.safetensors"
    if not isinstance(model, PeftModel) or model.active_peft_config.is_prompt_learning or not file.exists():
        return
    with safe_open(str(file), framework="pt") as f:
        saved = len(list(f.keys()))
    trainable = sum(p.requires_grad for p in model.parameters())
    if saved != trainable:
        raise RuntimeError(f"the saved adapter holds {saved} tensors but the model trains {trainable}: {file} is incomplete")


def launch_facts(trainer: SFTTrainer) -> dict[str, Any]:
    """What really ran: accelerate's distributed type, the world size and how the model was wrapped."""
    acc = trainer.accelerator
    return {
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "world_size": trainer.args.world_size,
        "num_processes": acc.num_processes,
        "device": str(acc.device),
        "wrapped_model": type(trainer.model_wrapped).__name__,
        "is_fsdp": trainer.is_fsdp_enabled,
    }
