"""The run directory: what a run writes, and the rules that keep a finished run from being overwritten.

    RUN_DIR/config.yaml      resolved config (no secrets: tokens live only in the environment)
    RUN_DIR/splits/*.json    per-task train/validation row indices
    RUN_DIR/checkpoints/     Trainer checkpoints (adapter, optimizer, scheduler, RNG), resumed automatically
    RUN_DIR/final/           the trained adapter (or full model) and tokenizer
    RUN_DIR/metrics.json     per-task validation metrics; report.md the same, readable, linking plots/*.png
    RUN_DIR/trainer_state.json  the Trainer's log history (losses, learning rate, per-task validation)
    RUN_DIR/cost.json        training seconds (all launches), trainable parameters, tokens seen
    RUN_DIR/DONE             written last: the run finished
    RUN_DIR/.multitune.lock  held (flock) by the launch training in it; refuses a second one

A folder is a run directory when its config.yaml was written by multitune (its first line says so; a
config.yaml beside splits/ from before that line existed counts too). Only such a folder is ever
resumed or started over; a non-empty folder that is not one is refused, and nothing in it is touched.

With ``strategy: per_task`` each task's model has its own checkpoints/<task>/ and final/<task>/
(its adapter, tokenizer, trainer_state.json, launch.json and cost.json), beside the others.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from multitune.config import Config, config_from_dict, dump_config
from multitune.errors import UserError
from multitune.files import atomic_write, is_temp

# The first line of every config.yaml multitune writes: what makes a folder a run directory.
RECORD_HEADER = "# multitune run: the resolved config of this run, written by `multitune train`\n"


# Changes a relaunch may make to a run's config without changing what it trains: where and how often it
# evaluates, logs, saves and reports, and where it lives; and the attention kernel, which computes the same
# attention rounded differently (its default changed from sdpa to auto: a run an earlier version recorded must
# still resume with the same command). Anything else changes the result and is refused.
HARMLESS = (
    "run_dir", "hub_mirror", "eval.", "hub.", "train.report_to", "train.wandb.", "train.logging_steps",
    "train.eval_steps", "train.eval_rows_during_training", "train.save_steps", "train.save_minutes",
    "train.save_total_limit", "train.save_on_each_node", "train.dataloader_workers", "train.hub_checkpoints",
    "model.attn_implementation",
)
# The batch layout may change on resume (a pod that comes back with fewer GPUs) as long as the global
# batch stays that of the checkpoint; train.py checks that against the checkpoint itself.
BATCH_LAYOUT = ("train.batch_size", "train.grad_accum", "train.global_batch_size")


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


def as_read_now(recorded: dict | None) -> dict:
    """A recorded config as this version reads it: a key added since it was recorded counts at its default, so
    that the same command still matches a run an earlier version recorded. A UserError when it is no config."""
    return config_from_dict(recorded if isinstance(recorded, dict) else {}).model_dump(mode="json")


def training_differences(recorded: dict, cfg: Config) -> list[str]:
    """The dotted keys in which ``cfg`` trains differently from a recorded config (read as :func:`as_read_now`;
    the keys a relaunch may change left out): two configs with none train the same run."""
    return [k for k in _diff(as_read_now(recorded), cfg.model_dump(mode="json")) if not _harmless(k, HARMLESS + BATCH_LAYOUT)]


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

    def holds_run(self) -> bool:
        """Its config.yaml was written by multitune (or, from before the header, beside the run's splits/)."""
        try:
            text = self.config.read_text()
        except OSError:
            return False
        if text.startswith(RECORD_HEADER):
            return True
        try:
            config_from_dict(yaml.safe_load(text))
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, UserError):  # not YAML, or not a multitune config
            return False
        return self.splits.is_dir()

    def _launch_debris(self, path: Path) -> bool:
        """What a launch leaves on a rank that records no config: its lock, a config.yaml cut off while written, and
        checkpoint folders holding only that rank's RNG state (a node that does not save, beside node-local run
        directories, still writes ``checkpoints/checkpoint-N/rng_state_<rank>.pth``). Anything else makes the folder someone else's."""
        if path.name == RunLock.FILE or is_temp(path.name, self.config.name):  # a kill -9 during its first write
            return True
        return path == self.checkpoints and path.is_dir() and all(
            c.name.startswith("checkpoint-") and c.is_dir() and all(f.name.startswith("rng_state") for f in c.iterdir())
            for c in path.iterdir())

    def refuse_foreign(self) -> None:
        """A non-empty folder that holds no multitune run is never written to, resumed or started over."""
        if self.root.is_dir() and not self.holds_run() and not all(self._launch_debris(p) for p in self.root.iterdir()):
            raise UserError(f"{self.root} is not empty and holds no multitune run (no config.yaml written by multitune); "
                            "nothing was changed in it: train into a new or empty directory (run_dir=...)")

    def write_config(self, cfg: Config) -> None:
        atomic_write(self.config, RECORD_HEADER + dump_config(cfg))

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

    def require_done(self) -> None:
        """Trained weights *and* DONE: a run killed while saving final/ has the folder but maybe not all of it."""
        self.require_finished()
        if not self.is_finished():
            raise UserError(f"{self.root} has not finished (no DONE: training stopped before its end, perhaps while saving "
                            f"final/); finish it by relaunching `multitune train` with its config ({self.config})")

    def changes(self, cfg: Config) -> list[str]:
        """The dotted keys in which ``cfg`` differs from the recorded config (a key added since it was recorded
        counts at its default, so that the same command still resumes a run an earlier version started)."""
        try:
            recorded = as_read_now(yaml.safe_load(self.config.read_text()))
        except UserError as e:
            raise UserError(f"{self.config} (the run's recorded config): {e}; train into another run_dir or pass --overwrite") from None
        return _diff(recorded, cfg.model_dump(mode="json"))

    def check(self, cfg: Config, *, resume: bool, overwrite: bool) -> Relaunch:
        """What a launch with ``cfg`` does here: start, resume, or nothing (the same run finished).

        Refuses, writing nothing, what would lose work or silently change a run.
        """
        self.refuse_foreign()
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
        self.refuse_foreign()
        if not resuming and self.holds_run():
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
        self.write_config(cfg)

    def mark_done(self) -> None:
        atomic_write(self.done, "finished\n")

    @property
    def logs(self) -> Path:
        """Where this model's trainer_state.json, launch.json and cost.json go."""
        return self.root

    def holds(self, task: str) -> bool:
        """Whether this part's model was trained on ``task`` (the run's one model holds every task)."""
        return True


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

    def holds(self, task: str) -> bool:
        return task == self.task


def parts(cfg: Config, run: RunDir) -> list[RunDir]:
    """Where each model the run trains lives: the run itself (joint), or one TaskRun per task (per_task)."""
    return [run] if cfg.strategy == "joint" else [TaskRun(run.root, t.name) for t in cfg.tasks]


def one_model(cfg: Config, run: RunDir) -> bool:
    """Whether the run trains one model for all its tasks (its only part is the run itself)."""
    return parts(cfg, run) == [run]


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


class RunLock:
    """One launch per run directory: an exclusive flock on RUN_DIR/.multitune.lock, held while the process lives.

    The OS drops the lock when the process ends, however it ends (kill -9 included), so a lock is never
    stale. The file records the holder's host and pid for the refusal. ``job`` lets the other writers of
    one multi-node job share the directory (save_on_each_node on shared storage): the lock file names
    the job of the process that holds it, and a process of the same job is let in.
    """

    FILE = ".multitune.lock"

    def __init__(self, root: Path, fd: int, created: bool):
        self.root, self.fd, self.created = root, fd, created

    @classmethod
    def acquire(cls, root: Path, job: str = "", same_job_ok: bool = False) -> RunLock | None:
        """Lock ``root`` (made if missing), or raise a UserError naming the holder; None: held by ``job`` itself."""
        RunDir(root).refuse_foreign()  # before anything is written
        created = not root.exists()
        path = root / cls.FILE
        while True:
            try:
                root.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot create {path} ({e.strerror}); run_dir must be a writable directory") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a filesystem without locks
                    print(f"warning: cannot lock {path} ({e.strerror}); make sure no other launch uses {root}", flush=True)
                    return None
                return cls._refuse(root, holder, job, same_job_ok)
            try:  # the previous holder may have removed the file between our open and lock: lock the new one
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "job": job}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        return cls(root, fd, created)

    @staticmethod
    def _refuse(root: Path, holder: str, job: str, same_job_ok: bool) -> None:
        try:
            info = json.loads(holder)
        except ValueError:  # it has locked the file but not yet written to it
            info = {}
        if same_job_ok and job and info.get("job") == job:
            return
        who = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {info.get('since', '?')}" if info else "its host and pid not yet recorded"
        raise UserError(f"{root} is in use by another launch ({who}); wait for it to finish or stop it, "
                        "or train into another run_dir")

    def release(self) -> None:
        """Unlock; the lock file goes (and the directory, when this launch made it and left it empty)."""
        path = self.root / self.FILE
        try:
            path.unlink(missing_ok=True)  # while still locked: a waiting launch then locks a new file
            if self.created and not any(self.root.iterdir()):
                self.root.rmdir()
        finally:
            os.close(self.fd)
