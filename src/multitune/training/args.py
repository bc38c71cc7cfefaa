"""The Trainer's arguments from the config: the one SFTConfig both trainers (LM and classifier heads) run with."""

from __future__ import annotations

import os

import torch
from trl import SFTConfig

from multitune.config import Config
from multitune.modeling.load import bf16_supported
from multitune.modeling.speed import sft_args
from multitune.rundir import RunDir


def _bf16(cfg: Config) -> bool:
    if cfg.train.bf16 == "auto":
        return bf16_supported()
    return bool(cfg.train.bf16)


def fsdp_launch() -> bool:
    """Launched by accelerate with an FSDP config (how accelerate itself decides, before any Trainer exists)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


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
        # batch_size: auto is chosen by the launch (multitune.launch.autofit) before any trainer exists: 1 until then
        per_device_train_batch_size=1 if t.batch_size == "auto" else t.batch_size,
        per_device_eval_batch_size=cfg.eval.rows,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        include_num_input_tokens_seen="non_padding",  # cost.json: tokens trained on (kept in the checkpoints)
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss is logged as nan, not hidden (DivergenceGuard stops there)
        eval_strategy="steps" if t.eval_steps else "epoch",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        save_on_each_node=t.save_on_each_node,
        # Every parameter our PEFT methods (and full fine-tuning) train takes part in every forward, so DDP
        # need not search the graph for unused ones each step; Trainer would turn the search on for any
        # model that is not a PreTrainedModel (a PeftModel). Were one unused, DDP stops with an error.
        ddp_find_unused_parameters=False,
        bf16=_bf16(cfg),
        use_cpu=not torch.cuda.is_available(),
        **sft_args(t),  # train.compile: padded to a multiple of 64, dynamic shapes (multitune.modeling.speed)
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
