"""The run directory: what a run writes, and the rules that keep a finished run from being overwritten.

    RUN_DIR/config.yaml      resolved config (no secrets: tokens live only in the environment)
    RUN_DIR/splits/*.json    per-task train/validation row indices
    RUN_DIR/checkpoints/     Trainer checkpoints (adapter, optimizer, scheduler, RNG), resumed automatically
    RUN_DIR/final/           the trained adapter (or full model) and tokenizer
    RUN_DIR/metrics.json     per-task validation metrics; report.md the same, readable, linking plots/*.png
    RUN_DIR/trainer_state.json  the Trainer's log history (losses, learning rate, per-task validation)
    RUN_DIR/cost.json        training seconds (all launches), trainable parameters, tokens seen
    RUN_DIR/DONE             written last: the run finished

With ``strategy: per_task`` each task's model has its own checkpoints/<task>/ and final/<task>/
(its adapter, tokenizer, trainer_state.json, launch.json and cost.json), beside the others.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from multitune.config import Config, config_from_dict, dump_config
from multitune.errors import UserError


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# Changes a relaunch may make to a run's config without changing what it trains: where and how often it
# evaluates, logs, saves and reports, and where it lives. Anything else changes the result and is refused.
HARMLESS = (
    "run_dir", "hub_mirror", "eval.", "hub.", "train.report_to", "train.wandb.", "train.logging_steps",
    "train.eval_steps", "train.eval_rows_during_training", "train.save_steps", "train.save_minutes",
    "train.save_total_limit", "train.save_on_each_node", "train.dataloader_workers", "train.hub_checkpoints",
)
# The batch layout may change on resume (a pod that comes back with fewer GPUs) as long as the global
# batch stays that of the checkpoint; train.py checks that against the checkpoint itself.
BATCH_LAYOUT = ("train.batch_size", "train.grad_accum")


def _harmless(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


@dataclass(frozen=True)
class Relaunch:
    """What a launch does with its run directory: "new" (start or start over), "resume", or "finished"
    (the same run already finished: nothing to do), and which allowed config keys changed."""

    mode: str
    changed: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunDir:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    splits = property(lambda self: self.root / "splits")
    checkpoints = property(lambda self: self.root / "checkpoints")
    final = property(lambda self: self.root / "final")
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.md")
    plots = property(lambda self: self.root / "plots")
    trainer_state = property(lambda self: self.root / "trainer_state.json")
    done = property(lambda self: self.root / "DONE")

    def is_finished(self) -> bool:
        return self.done.exists()

    def load_config(self) -> Config:
        if not self.config.exists():
            raise UserError(f"{self.root} is not a multitune run directory (no config.yaml); train one first")
        return config_from_dict(yaml.safe_load(self.config.read_text()))

    def log_history(self) -> list[dict]:
        """The Trainer's log rows of the finished run (none for a run laid out by hand)."""
        return json.loads(self.trainer_state.read_text()).get("log_history", []) if self.trainer_state.exists() else []

    def require_finished(self) -> None:
        cfg = self.load_config()
        missing = [p.final for p in parts(cfg, self) if not p.final.exists()]  # per_task: each task's adapter
        if missing:
            raise UserError(f"{self.root} has no trained weights yet ({missing[0]} is missing); finish training by "
                            "relaunching `multitune train`")

    def changes(self, cfg: Config) -> list[str]:
        """The dotted keys in which ``cfg`` differs from the recorded config."""
        return _diff(yaml.safe_load(self.config.read_text()) or {}, cfg.model_dump(mode="json"))

    def check(self, cfg: Config, *, resume: bool, overwrite: bool) -> Relaunch:
        """What a launch with ``cfg`` does here: start, resume, or nothing (the same run finished).

        Refuses, writing nothing, what would lose work or silently change a run.
        """
        if overwrite or not (self.config.exists() or self.is_finished()):
            return Relaunch("new")
        changed = tuple(self.changes(cfg)) if self.config.exists() else ("config.yaml (missing)",)
        if self.is_finished():
            differ = [k for k in changed if not _harmless(k, HARMLESS)]
            if resume and not differ:
                return Relaunch("finished", changed)
            detail = f" with a different config ({', '.join(differ[:5])})" if differ else ""
            raise UserError(
                f"{self.root} holds a finished run{detail}; evaluate it with `multitune eval {self.root}`, "
                "train into another directory (run_dir=...), or pass --overwrite to replace it"
            )
        if not resume:
            return Relaunch("new")
        # train.keep_best chooses on the rows scored during training: their number is fixed with it
        allowed = HARMLESS if cfg.train.keep_best == "none" else tuple(k for k in HARMLESS if k != "train.eval_rows_during_training")
        differ = [k for k in changed if not _harmless(k, allowed + BATCH_LAYOUT)]
        if differ:
            raise UserError(
                f"{self.root} holds an unfinished run with a different config ({', '.join(differ[:5])}); relaunch "
                "with the same config to resume (evaluation, logging, saving and reporting settings may change), "
                "use another run_dir, or pass --no-resume to start over"
            )
        return Relaunch("resume", changed)

    def prepare(self, cfg: Config, *, resuming: bool) -> None:
        """Make the directory ready: start over unless resuming, then record the config."""
        if not resuming and self.root.exists():
            # the wandb ids too: new training must not be appended to the old run's wandb runs
            # cost.json last marks a trained model (multitune.training.parts): a stale one must not pass for this run's
            for path in (self.checkpoints, self.splits, self.final, self.done, self.metrics, self.report, self.plots,
                         *(self.root / f for f in ("cost.json", "trainer_state.json", "launch.json")),
                         *self.root.glob("wandb_id*"), self.root / "wandb"):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            print(f"notice: starting {self.root} over (earlier checkpoints removed)")
        self.done.unlink(missing_ok=True)  # resuming a node that finished while another did not
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config, dump_config(cfg))

    def mark_done(self) -> None:
        atomic_write(self.done, "finished\n")

    @property
    def logs(self) -> Path:
        """Where this model's trainer_state.json, launch.json and cost.json go."""
        return self.root


@dataclass(frozen=True)
class TaskRun(RunDir):
    """The run directory as one task's model sees it (strategy: per_task): its own checkpoints and weights,
    the run's config, split, metrics and DONE, so the stages of a launch apply to it unchanged."""

    task: str = ""

    checkpoints = property(lambda self: self.root / "checkpoints" / self.task)
    final = property(lambda self: self.root / "final" / self.task)

    @property
    def logs(self) -> Path:
        return self.final


def parts(cfg: Config, run: RunDir) -> list[RunDir]:
    """Where each model the run trains lives: the run itself (joint), or one TaskRun per task (per_task)."""
    return [run] if cfg.strategy == "joint" else [TaskRun(run.root, t.name) for t in cfg.tasks]


def part_of(cfg: Config, run: RunDir, task: str) -> RunDir:
    """The part of ``run`` that holds ``task``'s model."""
    return run if cfg.strategy == "joint" else TaskRun(run.root, task)


def training_log(cfg: Config, run: RunDir) -> list[dict]:
    """The Trainer's log rows behind a run's training curves. per_task: every task's model's rows, with its
    training loss named ``loss/<task>`` so that one plot holds them all (its evaluations already log
    ``eval_<task>_*``)."""
    if cfg.strategy == "joint":
        return run.log_history()
    rows = []
    for part in parts(cfg, run):
        state = part.logs / "trainer_state.json"
        for entry in json.loads(state.read_text()).get("log_history", []) if state.exists() else []:
            rows.append({(f"loss/{part.task}" if k == "loss" else k): v for k, v in entry.items()})
    return rows
