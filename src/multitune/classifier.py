"""`head: classifier`: train, evaluate and predict with a classification head per task (multitune.heads).

The run is laid out like an LM run (config.yaml, splits/, checkpoints/, final/, metrics.json,
report.md, DONE), so `multitune eval` and `multitune predict` work on it and its metrics have the same
schema. With ``strategy: joint`` one adapter is trained on every task with one score layer holding
each task's head (final/); with ``strategy: per_task`` each task gets its own adapter and head,
trained one after the other (final/<task>/, checkpoints/<task>/). Training is transformers' Trainer
(there is no completion to supervise, so TRL's SFTTrainer has nothing to add) with the LM path's
arguments and checkpoint callbacks.
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

from multitune.checkpoints import CompleteMarker, GracefulStop, TimedCheckpoints, agree_on_resume, latest_complete
from multitune.config import Config
from multitune.data import TaskData, _weighted, load_tasks, save_splits, subsample
from multitune.errors import UserError
from multitune.evaluate import format_table, write_results
from multitune.formatting import Formatter
from multitune.heads import HEADS_FILE, Heads, SlicedLoss, build_model, load_trained, probabilities, prompt_ids
from multitune.hub import mirror_root
from multitune.model import load_tokenizer
from multitune.run import RunDir
from multitune.tasks import Task, resolve_tasks
from multitune.train import _init_wandb, checkpointing_for_peft, launch_facts, save_final, sft_config

MODE = "classifier"  # the `mode` recorded in metrics.json, beside the LM path's likelihood / generate
COST_FILE = "cost.json"


def check(cfg: Config) -> None:
    """Refuse what a classification head cannot do, before anything is written."""
    chat = [t.name for t in cfg.tasks if t.type == "chat"]
    if chat:
        raise UserError(f"head: classifier needs a label to predict, but task(s) {chat} are chat tasks; "
                        "remove them from this run or train them with head: lm")
    if cfg.hub.push:
        raise UserError("hub.push is not supported with head: classifier yet; upload run_dir/final with `hf upload`")


def groups(cfg: Config, run: RunDir, data: list[TaskData]) -> list[tuple[list[TaskData], Path, Path]]:
    """(tasks, weights folder, checkpoints folder) of each model the run trains: one, or one per task."""
    if cfg.strategy == "joint":
        return [(data, run.final, run.checkpoints)]
    return [([td], run.final / td.task.name, run.checkpoints / td.task.name) for td in data]


def weights_dir(cfg: Config, run: RunDir, task: str) -> Path:
    return run.final if cfg.strategy == "joint" else run.final / task


def heads_of(data: list[TaskData]) -> Heads:
    return Heads({td.task.name: list(td.task.label_names) for td in data})


# ---------------------------------------------------------------- data and metrics


def training_dataset(data: list[TaskData], heads: Heads, formatter: Formatter, seed: int) -> datasets.Dataset:
    """Prompt tokens and global head rows of every task's training examples, each task scaled by its weight."""
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for td in data:
        labels = [heads.global_label(td.task.name, ex.label) for ex in td.train]
        rows = list(zip(prompt_ids(formatter, td.train), labels, strict=True))
        rows = _weighted(rows, td.task.cfg.weight, seed)  # the LM path's mixing, so both heads see the same stream
        columns["input_ids"] += [r[0] for r in rows]
        columns["labels"] += [r[1] for r in rows]
    return datasets.Dataset.from_dict(columns)


def validation_datasets(
    data: list[TaskData], heads: Heads, formatter: Formatter, max_rows: int | None, seed: int
) -> dict[str, datasets.Dataset]:
    out = {}
    for td in data:
        rows = subsample(td.val, max_rows, seed)
        labels = [heads.global_label(td.task.name, ex.label) for ex in rows]
        out[td.task.name] = datasets.Dataset.from_dict({"input_ids": prompt_ids(formatter, rows), "labels": labels})
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
    """Each task's validation metrics from its head, in the schema of evaluate.evaluate_tasks."""
    results = {}
    for td in data:
        rows = subsample(td.val, max_rows or td.task.cfg.max_eval_rows, seed)
        ids = prompt_ids(formatter, rows)
        pred = probabilities(model, formatter.tokenizer, ids, heads.rows(td.task.name), batch_size).argmax(-1).tolist()
        results[td.task.name] = {"kind": td.task.kind, "mode": MODE, **td.task.score([ex.label for ex in rows], pred)}
    return results


# ---------------------------------------------------------------- training


def _all_ranks_agree(flag: bool) -> bool:
    """True only when every rank sees ``flag`` (e.g. a task's finished weights): one collective, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _fit(cfg: Config, run: RunDir, data: list[TaskData], heads: Heads, formatter: Formatter, ckpt: Path, resuming: bool):
    """Train one model (adapter + heads) on ``data``: the Trainer, its GracefulStop callback and the cost."""
    args = sft_config(cfg, run)  # the LM path's arguments: epochs, schedule, batch, checkpoints, bf16, reporting
    args.output_dir = str(ckpt)
    args.include_num_input_tokens_seen = "non_padding"  # kept in the trainer state, so it survives a resume
    tokenizer = formatter.tokenizer
    set_seed(cfg.seed)  # before the head and adapter exist: their initialisation draws random numbers
    model = build_model(cfg, heads, tokenizer)
    stop = GracefulStop()
    trainer = Trainer(
        model=model, args=args,
        train_dataset=training_dataset(data, heads, formatter, cfg.seed),
        eval_dataset=validation_datasets(data, heads, formatter, cfg.train.eval_rows_during_training or None, cfg.seed),
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer, padding=True),
        compute_loss_func=SlicedLoss(heads), compute_metrics=metrics_during_training(data, heads),
        callbacks=[CompleteMarker(), TimedCheckpoints(cfg.train.save_minutes), stop],
    )
    last = latest_complete(ckpt) if resuming else None
    agree_on_resume(resuming, last)
    if last and PartialState().is_main_process:
        print(f"resuming from {last}")
    output = trainer.train(resume_from_checkpoint=str(last) if last else None)
    cost = {
        "train_seconds": round(output.metrics.get("train_runtime", 0.0), 2),  # this launch's share of a resumed run
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
    }
    return trainer, stop, cost


def train(cfg: Config, *, resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train, save and evaluate the classification heads; every rank calls this, the writer writes files."""
    cfg = resolve_tasks(cfg)
    check(cfg)
    run = RunDir(Path(cfg.run_dir))
    cfg = checkpointing_for_peft(cfg)
    _ = sft_config(cfg, run).world_size  # sets up torch.distributed when launched by torchrun / accelerate
    state = PartialState()
    # Everything that can reject the input runs before anything is written to the run directory.
    resuming = run.check(cfg, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(cfg.model, mirror_root(cfg.hub_mirror))
    tokenizer.padding_side = "right"  # the training collator pads like `heads.probabilities`
    formatter = Formatter(tokenizer, cfg.model.max_length)
    data = load_tasks(cfg, run.splits if resuming else None, create=True)
    for td in data:
        prompt_ids(formatter, td.train[:1] + td.val[:1])  # a prompt the head cannot read is refused now
    state.wait_for_everyone()
    writer = state.is_local_main_process if cfg.train.save_on_each_node else state.is_main_process
    if writer:
        run.prepare(cfg, resuming=resuming)
        save_splits(data, run.splits)
        print(f"training a classifier head ({cfg.strategy}) on " + ", ".join(f"{td.task.name}={len(td.train)}" for td in data))
    state.wait_for_everyone()
    _init_wandb(cfg, run)

    results: dict[str, dict[str, Any]] = {}
    costs = []
    for group, out, ckpt in groups(cfg, run, data):
        heads = heads_of(group)
        if _all_ranks_agree(resuming and (out / HEADS_FILE).exists()):  # finished in an earlier launch
            model, _ = load_trained(cfg, out, tokenizer)
            costs.append(json.loads((out / COST_FILE).read_text()))
        else:
            trainer, stop, cost = _fit(cfg, run, group, heads, formatter, ckpt, resuming)
            if stop.requested is not None:
                if state.is_main_process:
                    print(f"stopped at step {trainer.state.global_step} with a checkpoint; run the same command again to resume")
                return {}
            save_final(trainer, out)
            if writer:
                tokenizer.save_pretrained(str(out))
                state_file = run.root / "trainer_state.json" if cfg.strategy == "joint" else out / "trainer_state.json"
                trainer.state.save_to_json(str(state_file))
                (run.root / "launch.json").write_text(json.dumps(launch_facts(trainer), indent=2))
                (out / COST_FILE).write_text(json.dumps(cost))
                heads.save(out)  # last: marks these weights complete
            state.wait_for_everyone()
            model, costs = trainer.model, costs + [cost]
        # every rank scores (a sharded model needs them all); the writer reports
        results |= evaluate(model, formatter, group, heads, batch_size=cfg.eval.batch_size, seed=cfg.seed)
        del model
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    if writer:
        total = {k: sum(c[k] for c in costs) for k in ("train_seconds", "trainable_params", "tokens_seen")}
        (run.root / COST_FILE).write_text(json.dumps(total, indent=2))
        write_results(run.root, results, _header(cfg))
        print(format_table(results))
        run.mark_done()
    state.wait_for_everyone()
    return results


def _header(cfg: Config) -> str:
    return f"multitune validation (classifier head, {cfg.strategy}): {cfg.model.name_or_path} ({cfg.peft.method})"


# ---------------------------------------------------------------- eval and predict on a finished run


def evaluate_run(run: RunDir, cfg: Config, *, mode: str | None = None, max_rows: int | None = None) -> dict[str, dict[str, Any]]:
    """`multitune eval` for a classifier run: re-score the recorded validation split with the saved heads."""
    if mode not in (None, MODE):
        raise UserError(f"--mode {mode} applies to head: lm runs; this run predicts with its classifier head (leave --mode out)")
    data = load_tasks(cfg, run.splits, create=False)
    results: dict[str, dict[str, Any]] = {}
    for group, out, _ in groups(cfg, run, data):
        tokenizer = load_tokenizer(cfg.model, None, source=str(out))
        model, heads = load_trained(cfg, out, tokenizer)
        formatter = Formatter(tokenizer, cfg.model.max_length)
        results |= evaluate(model, formatter, group, heads, batch_size=cfg.eval.batch_size, max_rows=max_rows, seed=cfg.seed)
        del model
    write_results(run.root, results, _header(cfg))
    print(format_table(results))
    return results


def predict(run: RunDir, cfg: Config, task: Task, inputs: list[dict[str, Any] | str]) -> list[dict[str, Any]]:
    """`multitune predict` for a classifier run: the label with the highest head probability, and that probability."""
    examples = [task.example_from_input(x) for x in inputs]
    out = weights_dir(cfg, run, task.name)
    tokenizer = load_tokenizer(cfg.model, None, source=str(out))
    model, heads = load_trained(cfg, out, tokenizer)
    if heads.labels.get(task.name) != task.label_names:
        raise UserError(f"{out / HEADS_FILE} does not hold task {task.name}'s labels; the run directory is inconsistent")
    ids = prompt_ids(Formatter(tokenizer, cfg.model.max_length), examples)
    probs = probabilities(model, tokenizer, ids, heads.rows(task.name), cfg.eval.batch_size)
    return [{"label": task.label_names[int(p.argmax())], "score": round(float(p.max()), 4)} for p in probs]
