"""The run directory: what a run writes, and the rules that keep a finished run from being overwritten.

    RUN_DIR/config.yaml      resolved config (no secrets: tokens live only in the environment)
    RUN_DIR/splits/*.json    per-task train/validation row indices
    RUN_DIR/checkpoints/     Trainer checkpoints (adapter, optimizer, scheduler, RNG), resumed automatically
    RUN_DIR/final/           the trained adapter (or full model) and tokenizer
    RUN_DIR/metrics.json     per-task validation metrics; report.md the same, readable
    RUN_DIR/DONE             written last: the run finished
"""

from __future__ import annotations

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
class RunDir:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    splits = property(lambda self: self.root / "splits")
    checkpoints = property(lambda self: self.root / "checkpoints")
    final = property(lambda self: self.root / "final")
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.md")
    done = property(lambda self: self.root / "DONE")

    def is_finished(self) -> bool:
        return self.done.exists()

    def load_config(self) -> Config:
        if not self.config.exists():
            raise UserError(f"{self.root} is not a multitune run directory (no config.yaml); train one first")
        return config_from_dict(yaml.safe_load(self.config.read_text()))

    def require_finished(self) -> None:
        self.load_config()
        if not self.final.exists():
            raise UserError(f"{self.root} has no trained weights yet (no final/); finish training by relaunching `multitune train`")

    def check(self, cfg: Config, *, resume: bool, overwrite: bool) -> bool:
        """Refuse what would lose work, writing nothing; returns True when an earlier run will be resumed."""
        if self.is_finished() and not overwrite:
            raise UserError(
                f"{self.root} holds a finished run; evaluate it with `multitune eval {self.root}`, "
                "train into another directory (run_dir=...), or pass --overwrite to replace it"
            )
        if overwrite or not self.config.exists():
            return False
        old = yaml.safe_load(self.config.read_text())
        changed = [k for k in _diff(old, cfg.model_dump(mode="json")) if not k.startswith(("train.report_to", "train.wandb", "hub."))]
        if resume and changed:
            raise UserError(
                f"{self.root} holds an unfinished run with a different config ({', '.join(changed[:5])}); "
                "relaunch with the same config to resume, use another run_dir, or pass --no-resume to start over"
            )
        return resume

    def prepare(self, cfg: Config, *, resuming: bool) -> None:
        """Make the directory ready: start over unless resuming, then record the config."""
        if not resuming and self.root.exists():
            for path in (self.checkpoints, self.splits, self.final, self.done, self.metrics, self.report):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            print(f"notice: starting {self.root} over (earlier checkpoints removed)")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config, dump_config(cfg))

    def mark_done(self) -> None:
        atomic_write(self.done, "finished\n")
