"""Training: thin wiring of the config, tasks, data and model onto TRL's SFTTrainer.

Under torchrun/accelerate every rank runs :func:`train`, stage by stage: agree on what this launch
does with the run directory, prepare the data and the run directory, build the trainer, fit, then
save, evaluate and report. Each stage that leads to a collective is entered by every rank.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import PreTrainedTokenizerBase, set_seed
from trl import SFTConfig, SFTTrainer

from multitune.training import wandb_log
from multitune.training.adapter_state import PortableAdapterCheckpoints
from multitune.training.checkpoints import (
    CompleteMarker, GracefulStop, Layout, TimedCheckpoints, TrainingClock, grad_accum_for_resume, is_sharded, latest_complete,
    saved_layout, step_of,
)
from multitune.config import PROMPT_LEARNING, Config
from multitune.data.load import TaskData, save_splits, training_summary
from multitune.distributed import checked, gather_checked, main_print, node_print, rank
from multitune.errors import UserError
from multitune.scoring.evaluate import evaluate_tasks, format_table, write_results
from multitune.data.formatting import Formatter
from multitune.hub import mirror_root
from multitune.training.hub_checkpoints import fetch_newest_checkpoint, hub_callbacks
from multitune.modeling.loss import trainer_loss
from multitune.modeling.load import adapters_in_fp32, apply_peft, bf16_supported, check_requirements, load_model, load_tokenizer
from multitune.data.prepared import Prepared, prepare
from multitune.rundir import RunDir
from multitune.modeling.speed import sft_args, uncompiled
from multitune.tasks import resolve_tasks

log = logging.getLogger(__name__)


class MultitaskTrainer(PortableAdapterCheckpoints, SFTTrainer):
    """SFTTrainer whose evaluation also reports each task's label accuracy (not just validation loss).

    The override exists because Trainer's ``compute_metrics`` sees per-token logits of the eval set,
    while label-likelihood accuracy needs its own scoring passes over the candidate labels. Under FSDP,
    adapter checkpoints are gathered whole (PortableAdapterCheckpoints).
    """

    def __init__(self, *args, task_data: list[TaskData], formatter: Formatter, cfg: Config, **kwargs):
        super().__init__(*args, **kwargs)
        adapters_in_fp32(self.model)  # TRL made a 4-bit model's adapters bf16; every method trains fp32 adapters
        self.task_data, self.formatter, self.mt_cfg = task_data, formatter, cfg

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        n = self.mt_cfg.train.eval_rows_during_training
        labelled = [td for td in self.task_data if td.task.kind != "chat"]
        if eval_dataset is None and metric_key_prefix == "eval" and n and labelled:
            tables = self.mt_cfg.train.report_to == "wandb"  # every rank alike: with detail, scoring differs
            results = evaluate_tasks(
                uncompiled(self.model), self.formatter, labelled, mode="likelihood", batch_size=self.args.per_device_eval_batch_size,
                max_rows=n, seed=self.mt_cfg.seed, detail=tables,
            )
            extra = {f"eval_{name}_{key}": r[key] for name, r in results.items() for key in ("accuracy", "macro_f1", "ece") if key in r}
            self.log(extra)
            metrics.update(extra)
            if tables:
                wandb_log.log_evaluation(results, self.state.global_step)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`train.loss_positions: supervised`: the LM head and loss on supervised positions only (multitune.modeling.loss)."""
        if self.mt_cfg.train.loss_positions == "all" or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return trainer_loss(self, model, inputs, num_items_in_batch)

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint saved at the last step (a kill during the final save or evaluation),
        # Trainer (5.24) would still run one more step before it checks max_steps: a step past the end,
        # logged and saved. Nothing is left to train.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)


def _bf16(cfg: Config) -> bool:
    if cfg.train.bf16 == "auto":
        return bf16_supported()
    return bool(cfg.train.bf16)


def _fsdp_launch() -> bool:
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
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        include_num_input_tokens_seen="non_padding",  # cost.json: tokens trained on (kept in the checkpoints)
        logging_steps=t.logging_steps,
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
        **sft_args(t),  # train.compile: padded to a multiple of 64, dynamic shapes; train.liger checked (multitune.modeling.speed)
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



# ---------------------------------------------------------------- the stages of a launch


def train(cfg: Config, *, resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train and evaluate; under torchrun/accelerate every rank calls this, and only the writers write files."""
    if cfg.head == "classifier":  # a classification head per task instead of writing the label
        from multitune.training import classifier

        return classifier.train(cfg, resume=resume, overwrite=overwrite)
    if cfg.strategy == "per_task":  # one adapter per task, trained in turn
        from multitune.training import per_task

        return per_task.train(cfg, resume=resume, overwrite=overwrite)
    cfg = checkpointing_for_peft(resolve_tasks(cfg))
    run = RunDir(Path(cfg.run_dir))
    args = sft_config(cfg, run)
    _ = args.world_size  # sets up torch.distributed when launched by torchrun / accelerate
    fetch_newest_checkpoint(cfg, run, PartialState(), resume=resume and not overwrite)  # a fresh pod: its newest Hub checkpoint
    launch = plan_launch(cfg, run, args, resume=resume, overwrite=overwrite)
    if launch.mode == "finished":
        return already_finished(run)
    args.gradient_accumulation_steps = launch.grad_accum
    setup = prepare_run(cfg, run, resuming=launch.mode == "resume", writer=args.should_save)
    trainer = build_trainer(cfg, run, args, setup, launch.checkpoint)
    if not fit(trainer, launch.checkpoint):
        return {}
    save_outputs(trainer, run, setup.tokenizer)
    return evaluate_and_report(trainer, cfg, run, setup)


@dataclass(frozen=True)
class Launch:
    """What every rank agreed this launch does: "new", "resume" (from ``checkpoint``, if any) or "finished"."""

    mode: str
    checkpoint: Path | None
    grad_accum: int


@dataclass
class Setup:
    tokenizer: PreTrainedTokenizerBase
    formatter: Formatter
    prepared: Prepared

    @property
    def data(self) -> list[TaskData]:
        return self.prepared.data


def refuse_unresumable(cfg: Config) -> None:
    """Combinations whose checkpoints nobody could resume from: refused before anything runs."""
    if not _fsdp_launch():
        return
    if cfg.peft.method in PROMPT_LEARNING:
        raise UserError(
            f"peft.method={cfg.peft.method} cannot run under FSDP (PEFT builds the prompt from a sharded embedding and "
            "cannot save it); its few thousand parameters train on one GPU or with DDP (configs/accelerate/ddp-1x4.yaml)"
        )
    if cfg.peft.method == "full" and cfg.train.save_on_each_node:
        raise UserError(
            "train.save_on_each_node with FSDP full fine-tuning cannot resume: each node would keep only its own ranks' "
            "shards of the model; put run_dir on storage shared by all nodes (save_on_each_node=false), or train an adapter"
        )


def plan_launch(cfg: Config, run: RunDir, args: SFTConfig, *, resume: bool, overwrite: bool) -> Launch:
    """Decide, on every rank alike and before anything is written, what this launch does.

    Each rank reads its own view of the run directory (with save_on_each_node, its node's copy); the
    views are gathered, and any refusal on one rank is raised on all (none is left waiting).
    """
    check_requirements(cfg)
    refuse_unresumable(cfg)
    if args.n_gpu > 1:  # Trainer would wrap the model in DataParallel: slow, and its replicas share one loss hook
        raise UserError(f"{args.n_gpu} GPUs are visible to one process; launch one process per GPU with `accelerate launch "
                        f"--num_processes {args.n_gpu} -m multitune.cli train ...` (see Multi-GPU), or set CUDA_VISIBLE_DEVICES=0")

    def inspect() -> tuple[str, int, tuple[str, ...]]:
        require_push_token(cfg)
        relaunch = run.check(cfg, resume=resume, overwrite=overwrite)
        last = latest_complete(run.checkpoints) if relaunch.mode != "new" else None
        return relaunch.mode, step_of(last), relaunch.changed

    seen = gather_checked(inspect)
    if all(mode == "finished" for mode, _, _ in seen):
        return Launch("finished", None, args.gradient_accumulation_steps)
    # a finished node beside unfinished ones (node-local run dirs: a node died before finishing) resumes too
    seen = [("new" if mode == "new" else "resume", step, changed) for mode, step, changed in seen]
    if len({(mode, step) for mode, step, _ in seen}) > 1:
        detail = ", ".join(f"rank {r}: {'step ' + str(s) if s >= 0 else 'none'}" for r, (_, s, _) in enumerate(seen))
        raise UserError(
            f"ranks disagree on the checkpoint to resume from ({detail}); put run_dir on storage shared by all "
            "nodes, or set train.save_on_each_node=true so that every node keeps a full copy"
        )
    mode, step, changed = seen[rank()]
    checkpoint = run.checkpoints / f"checkpoint-{step}" if step >= 0 else None
    if checkpoint is None:
        return Launch(mode, None, args.gradient_accumulation_steps)
    grad_accum = checked(lambda: _resume_grad_accum(cfg, args, checkpoint, "train.grad_accum" in changed))
    return Launch(mode, checkpoint, grad_accum)


def _resume_grad_accum(cfg: Config, args: SFTConfig, checkpoint: Path, grad_accum_from_user: bool) -> int:
    """The grad_accum that resumes ``checkpoint`` on this launch's processes, or a clear refusal."""
    if is_sharded(checkpoint) and not _fsdp_launch():
        raise UserError(f"{checkpoint} holds FSDP shards of the whole model; resume it under FSDP "
                        "(accelerate launch --config_file configs/accelerate/fsdp2-1x4.yaml ...)")
    if cfg.peft.method == "full" and _fsdp_launch() and not is_sharded(checkpoint):
        raise UserError(f"{checkpoint} was written without FSDP; resume full fine-tuning without FSDP, as it started, "
                        "or start over with --no-resume")
    saved, now = saved_layout(checkpoint), Layout(args.world_size, cfg.train.batch_size, cfg.train.grad_accum)
    if saved and saved.world_size != now.world_size and cfg.train.group_by_length and not cfg.train.packing:
        raise UserError(f"train.group_by_length groups examples by each process's batch, so resuming {checkpoint} "
                        f"({saved}) on {now.world_size} process(es) would reorder the data; resume on "
                        f"{saved.world_size} process(es)")
    return grad_accum_for_resume(saved, now, grad_accum_from_user=grad_accum_from_user)


def require_push_token(cfg: Config) -> None:
    """hub.push uploads after training: a missing token must stop the launch now, not after hours of paid training."""
    if cfg.hub.push:
        from huggingface_hub import get_token

        if not get_token():
            raise UserError("hub.push needs a Hugging Face token with write access: export HF_TOKEN=hf_... or run "
                            "`hf auth login`, or set hub.push=false and run `multitune push RUN_DIR` later (nothing was trained)")


def already_finished(run: RunDir) -> dict[str, Any]:
    """A relaunch of a finished run (a pod start script reruns the same command): nothing to do, status 0."""
    node_print(f"{run.root} holds a finished run with this config: nothing to do. Evaluate it with "
               f"`multitune eval {run.root}`, or pass --overwrite to train it again.")
    return json.loads(run.metrics.read_text()) if run.metrics.exists() else {}


def prepare_run(cfg: Config, run: RunDir, *, resuming: bool, writer: bool) -> Setup:
    """Tokenizer, tasks and tokenised data (the cache when it has them); then the run directory is written."""
    import torch.distributed as dist

    tokenizer = load_tokenizer(cfg.model, mirror_root(cfg.hub_mirror))
    formatter = Formatter(tokenizer, cfg.model.max_length)
    prepared = checked(lambda: prepare(cfg, formatter, run.splits if resuming else None))  # a refusal stops every rank
    barrier = dist.barrier if dist.is_available() and dist.is_initialized() else (lambda: None)
    barrier()  # every rank has read the run dir before the writers change it
    if writer:  # the main process, or each node's first with save_on_each_node
        run.prepare(cfg, resuming=resuming)
        save_splits(prepared.data, run.splits)
        print(training_summary(prepared.data, len(prepared.train), formatter, prepared.cached))
    barrier()
    return Setup(tokenizer, formatter, prepared)


def build_trainer(cfg: Config, run: RunDir, args: SFTConfig, setup: Setup, resume_from: Path | None = None) -> MultitaskTrainer:
    set_seed(cfg.seed)  # before the adapter exists: its initialisation draws random numbers
    model = apply_peft(load_model(cfg, for_training=True), cfg, cfg.train.gradient_checkpointing)
    wandb_log.start(cfg, run)
    return MultitaskTrainer(
        model=model, args=args, train_dataset=setup.prepared.train, eval_dataset=setup.prepared.eval,
        processing_class=setup.tokenizer, task_data=setup.data, formatter=setup.formatter, cfg=cfg,
        callbacks=[TrainingClock(resume_from), CompleteMarker(), TimedCheckpoints(cfg.train.save_minutes), GracefulStop(),
                   *hub_callbacks(cfg, run)],
    )


def fit(trainer: SFTTrainer, checkpoint: Path | None) -> bool:
    """Train (from ``checkpoint`` if given); False when a signal stopped it with a checkpoint."""
    if checkpoint:
        main_print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    stop = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GracefulStop))
    if stop.requested is not None:
        main_print(f"stopped at step {trainer.state.global_step} with a checkpoint; run the same command again to resume")
        return False
    return True


def save_outputs(trainer: SFTTrainer, run: RunDir, tokenizer: PreTrainedTokenizerBase) -> None:
    """The weights and tokenizer in run.final; the history, launch facts and cost in run.logs (the run
    directory, or final/<task>/ for one task's model of a per_task run). cost.json is written last."""
    save_final(trainer, run.final)
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(run.final))
        trainer.state.save_to_json(str(run.logs / "trainer_state.json"))  # the whole loss/LR/eval history
        (run.logs / "launch.json").write_text(json.dumps(launch_facts(trainer), indent=2))
        (run.logs / COST_FILE).write_text(json.dumps(cost_facts(trainer), indent=2))


def evaluate_and_report(trainer: SFTTrainer, cfg: Config, run: RunDir, setup: Setup) -> dict[str, Any]:
    """Score the validation rows (shared out over the ranks), write the reports, mark the run done, push."""
    results = evaluate_tasks(uncompiled(trainer.model), setup.formatter, setup.data, mode=cfg.eval.mode, batch_size=cfg.eval.batch_size,
                             seed=cfg.seed, detail=True)
    plots = {}
    if trainer.args.should_save:
        plots = write_results(run.root, results, f"multitune validation: {cfg.model.name_or_path} ({cfg.peft.method})",
                              log_history=trainer.state.log_history)
        print(format_table(results))
        run.mark_done()
    wandb_log.log_final(results, plots, trainer.state.global_step)  # rank 0 only: the others have no wandb run
    if cfg.hub.push and rank() == 0:
        from multitune.publishing.publish import push

        try:
            push(run, cfg, results)
        except UserError as e:  # the run is trained and saved: a failed upload must not lose it or hang the other ranks
            print(f"warning: {e}; the run is complete in {run.root}: push it with `multitune push {run.root}`", flush=True)
    trainer.accelerator.wait_for_everyone()
    return results


def save_final(trainer: SFTTrainer, path: Path) -> None:
    """Save the trained adapter (or model) for `from_pretrained`, whole, whatever the sharding.

    Trainer.save_model writes nothing at all under FSDP with a sharded state dict (transformers 5.24).
    For an adapter, MultitaskTrainer.save_model gathers only the trainable parameters (every rank
    joins in), never the frozen base. Full fine-tuning under FSDP gathers the full state dict
    (accelerate's get_state_dict: FSDP2 `get_model_state_dict`, offloaded to rank 0's CPU). The FSDP
    tests check that the result holds every rank's shard (the failure of accelerate PR 4206).
    """
    portable = isinstance(trainer, PortableAdapterCheckpoints) and trainer._portable()
    if trainer.is_fsdp_enabled and not portable:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank calls it
        if trainer.args.should_save:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(path), state_dict=state_dict)
        trainer.accelerator.wait_for_everyone()
        return
    trainer.save_model(str(path))
    if trainer.args.should_save:
        _check_adapter_saved(trainer.accelerator.unwrap_model(trainer.model), path)


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


COST_FILE = "cost.json"
COST_KEYS = ("train_seconds", "trainable_params", "tokens_seen")


def total_cost(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """A per_task run's cost: its models' seconds, trainable parameters and tokens, summed."""
    return {k: round(sum(c[k] for c in costs), 1) if k == "train_seconds" else sum(c[k] for c in costs) for k in COST_KEYS}


def cost_facts(trainer: SFTTrainer) -> dict[str, Any]:
    """What the run cost, for `compare`: training seconds over all launches, trainable parameters, tokens seen."""
    clock = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainingClock))
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "train_seconds": round(clock.seconds(), 1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),  # whole sizes, even sharded
        "tokens_seen": int(trainer.state.num_input_tokens_seen),  # non-padding tokens, every rank, every launch
    }


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
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
    }
