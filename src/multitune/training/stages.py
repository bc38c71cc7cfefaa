"""The stages of a launch that every kind of part goes through: agree on what this launch does with the run
directory (plan_launch), prepare the data and the run directory (prepare_run), fit, save the outputs.

Under torchrun/accelerate every rank runs the launch (multitune.launch.runner) stage by stage; each stage
that leads to a collective is entered by every rank.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from multitune.training.adapter_state import PortableAdapterCheckpoints
from multitune.training.guards import latest_finite
from multitune.training.checkpoints import (
    GracefulStop, Layout, TrainingClock, common_step, grad_accum_for_resume, is_sharded, saved_layout,
    step_of,
)
from multitune.config import PROMPT_LEARNING, Config
from multitune.data.load import TaskData, save_splits, training_summary
from multitune.distributed import checked, gather_checked, main_print, node_print, rank
from multitune.errors import UserError
from multitune.data.formatting import Formatter
from multitune.hub import mirror_root
from multitune.modeling.load import Kernels, check_requirements, check_training_attention, load_tokenizer
from multitune.modeling.speed import use_liger
from multitune.data.prepared import Prepared, prepare
from multitune.results.selection import check_rows_left
from multitune.files import atomic_write, strict_json
from multitune.rundir import RunDir
from multitune.training.args import fsdp_launch

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the stages of a launch


@dataclass(frozen=True)
class Launch:
    """What every rank agreed this launch does: "new", "resume" (from ``checkpoint``, if any) or "finished"."""

    mode: str
    checkpoint: Path | None
    grad_accum: int | None  # None: it follows from train.global_batch_size (multitune.launch.autofit)


@dataclass
class Setup:
    tokenizer: PreTrainedTokenizerBase
    formatter: Formatter
    prepared: Prepared
    kernels: Kernels | None = None  # what every process can run (agreed_kernels); None: each decides alone

    @property
    def data(self) -> list[TaskData]:
        return self.prepared.data


def refuse_unresumable(cfg: Config) -> None:
    """Combinations whose checkpoints nobody could resume from: refused before anything runs."""
    if not fsdp_launch():
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


def agreed_kernels(cfg: Config, args: SFTConfig) -> Kernels:
    """Every rank's node checks (one refusal is every rank's error), then the kernels every rank has: ``auto``
    (model.attn_implementation, train.liger) takes flash-attn or Liger only when no rank lacks it. Two all_gathers,
    every rank (multitune.launch.runner, once the process group is up)."""
    return Kernels.common(gather_checked(lambda: check_node(cfg, args)))


def check_node(cfg: Config, args: SFTConfig) -> Kernels:
    """What one node can lack while the others have it (a package, a GPU, a token, Liger): call it on every rank
    through ``checked``, once the process group is up (multitune.launch.runner), so that one node's refusal is
    one clear error on every rank, never ranks left waiting for it in their next collective. Returns this node's
    kernels (:func:`agreed_kernels` combines them)."""
    check_requirements(cfg)
    check_training_attention(cfg)
    use_liger(cfg.train.liger)
    refuse_unresumable(cfg)
    if args.n_gpu > 1:  # Trainer would wrap the model in DataParallel: slow, and its replicas share one loss hook
        raise UserError(f"{args.n_gpu} GPUs are visible to one process; launch one process per GPU with `accelerate launch "
                        f"--num_processes {args.n_gpu} -m multitune.cli train ...` (see Multi-GPU), or set CUDA_VISIBLE_DEVICES=0")
    require_push_token(cfg)
    return Kernels.here(cfg)


def plan_launch(cfg: Config, run: RunDir, args: SFTConfig, *, resume: bool, overwrite: bool) -> Launch:
    """Decide, on every rank alike and before anything is written, what this launch does.

    Each rank reads its own view of the run directory (with save_on_each_node, its node's copy); the
    views are gathered, and any refusal on one rank is raised on all (none is left waiting).
    """
    def inspect() -> tuple[str, int, tuple[str, ...]]:
        relaunch = run.check(cfg, resume=resume, overwrite=overwrite)
        last = latest_finite(run.checkpoints) if relaunch.mode != "new" else None
        return relaunch.mode, step_of(last), relaunch.changed

    seen = gather_checked(inspect)
    grad_accum = None if cfg.train.global_batch_size else args.gradient_accumulation_steps
    if all(mode == "finished" for mode, _, _ in seen):
        return Launch("finished", None, grad_accum)
    # a finished node beside unfinished ones (node-local run dirs: a node died before finishing) resumes too
    seen = [("new" if mode == "new" else "resume", step, changed) for mode, step, changed in seen]
    if {mode for mode, _, _ in seen} == {"resume"} and (common := common_step(run.checkpoints, [s for _, s, _ in seen])) >= 0:
        seen = [(mode, common, changed) for mode, _, changed in seen]  # a node's newest copy is damaged: all take the previous
    if len({(mode, step) for mode, step, _ in seen}) > 1:
        detail = ", ".join(f"rank {r}: {'step ' + str(s) if s >= 0 else 'none'}" for r, (_, s, _) in enumerate(seen))
        raise UserError(
            f"ranks disagree on the checkpoint to resume from ({detail}); put run_dir on storage shared by all "
            "nodes, or set train.save_on_each_node=true so that every node keeps a full copy"
        )
    mode, step, changed = seen[rank()]
    if mode == "resume" and "model.attn_implementation" in changed:  # allowed (rundir.HARMLESS), not bitwise
        main_print(f"notice: model.attn_implementation={cfg.model.attn_implementation} differs from the value {run.root} "
                   "recorded: the resumed steps compute the same attention, perhaps with another kernel (other rounding, "
                   "so not bitwise those of an uninterrupted run)")
    checkpoint = run.checkpoints / f"checkpoint-{step}" if step >= 0 else None
    if checkpoint is None:
        return Launch(mode, None, grad_accum)
    grad_accum = checked(lambda: _resume_grad_accum(cfg, args, checkpoint, "train.grad_accum" in changed))
    return Launch(mode, checkpoint, grad_accum)


def _resume_grad_accum(cfg: Config, args: SFTConfig, checkpoint: Path, grad_accum_from_user: bool) -> int | None:
    """The grad_accum that resumes ``checkpoint`` on this launch's processes (None: it follows from
    train.global_batch_size, which must be the checkpoint's), or a clear refusal."""
    if is_sharded(checkpoint) and not fsdp_launch():
        raise UserError(f"{checkpoint} holds FSDP shards of the whole model; resume it under FSDP "
                        "(accelerate launch --config_file configs/accelerate/fsdp2-1x4.yaml ...)")
    if cfg.peft.method == "full" and fsdp_launch() and not is_sharded(checkpoint):
        raise UserError(f"{checkpoint} was written without FSDP; resume full fine-tuning without FSDP, as it started, "
                        "or start over with --no-resume")
    saved, g = saved_layout(checkpoint), cfg.train.global_batch_size
    grouped = cfg.train.group_by_length and not cfg.train.packing
    if saved and saved.world_size != args.world_size and grouped and g is None:  # with it: grouped by the global batch
        raise UserError(f"train.group_by_length without train.global_batch_size groups examples by each process's batch, "
                        f"so resuming {checkpoint} ({saved}) on {args.world_size} process(es) would reorder the data; "
                        f"resume on {saved.world_size} process(es)")
    if g is not None:  # the micro-batch may differ (another card, batch_size: auto): the global batch may not
        if saved and saved.global_batch != g:
            raise UserError(f"the checkpoint was trained with a global batch of {saved.global_batch} examples per step "
                            f"({saved}); train.global_batch_size={g} would change the training: set "
                            f"train.global_batch_size={saved.global_batch}")
        return None
    now = Layout(args.world_size, cfg.train.batch_size, cfg.train.grad_accum)
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


def prepare_run(cfg: Config, run: RunDir, *, resuming: bool, writer: bool, kernels: Kernels | None = None) -> Setup:
    """Tokenizer, tasks and tokenised data (the cache when it has them); then the run directory is written.
    ``kernels``: what every process can run (:func:`agreed_kernels`), for the trainers' models."""
    import torch.distributed as dist

    tokenizer = load_tokenizer(cfg.model, mirror_root(cfg.hub_mirror))
    formatter = Formatter(tokenizer, cfg.model.max_length)
    prepared = checked(lambda: prepare(cfg, formatter, run.splits if resuming else None))  # a refusal stops every rank
    checked(lambda: check_rows_left(cfg, prepared.data))  # train.keep_best must leave rows to report on
    barrier = dist.barrier if dist.is_available() and dist.is_initialized() else (lambda: None)
    barrier()  # every rank has read the run dir before the writers change it
    if writer:  # the main process, or each node's first with save_on_each_node
        run.prepare(cfg, resuming=resuming)
        save_splits(prepared.data, run.splits)
        print(training_summary(prepared.data, len(prepared.train), formatter, prepared.cached))
    barrier()
    return Setup(tokenizer, formatter, prepared, kernels)


def fit(trainer: SFTTrainer, checkpoint: Path | None) -> bool:
    """Train (from ``checkpoint`` if given); False when a signal stopped it with a checkpoint."""
    if checkpoint:
        main_print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    stop = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GracefulStop))
    # agreed at a step's end, so the same on every rank; a signal after the last step is acted on by the launch
    # at its next stage boundary, after the final save every rank enters (multitune.launch.runner)
    if stop.stopped:
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
        atomic_write(run.logs / "launch.json", strict_json(launch_facts(trainer)))
        atomic_write(run.logs / COST_FILE, strict_json(cost_facts(trainer)))  # whole or none: it marks the part trained


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


def _per(micro: int, pieces: int) -> int | float:
    return micro // pieces if micro % pieces == 0 else micro / pieces


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
        # as trained: after an out-of-memory back-off (multitune.training.autofit) each micro-batch ran as halves
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps * getattr(trainer, "oom_split", 1),
        "per_device_train_batch_size": _per(trainer.args.per_device_train_batch_size, getattr(trainer, "oom_split", 1)),
        "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
        **kernels_of(trainer.accelerator.unwrap_model(trainer.model)),
        # this process's peak of allocated GPU memory over the launch (the probe included), beside `plan`'s prediction
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def kernels_of(model) -> dict[str, Any]:
    """The attention kernel the model was loaded with (model.attn_implementation as resolved for the launch), and
    whether Liger's kernels were applied (multitune.modeling.speed.apply_liger marks the base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"attn_implementation": getattr(base.config, "_attn_implementation", None),
            "liger": bool(getattr(base, "_multitune_liger", False))}
