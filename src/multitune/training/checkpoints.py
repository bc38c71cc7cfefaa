"""Checkpoints that survive a crash, a reclaimed pod or a smaller pod.

Trainer writes ``checkpoint-N/`` piece by piece (weights, optimizer, RNG, state), so a kill in the
middle leaves a folder that looks like a checkpoint but is not one. These callbacks add what Trainer
lacks: a COMPLETE marker written only after every rank finished saving (it also records the batch
layout, so that a resume on another number of processes keeps the global batch), a checkpoint every M
minutes as well as every N steps, and a checkpoint plus clean stop on SIGTERM/SIGINT. Every decision
that starts a save is agreed by all ranks. Resume picks the newest checkpoint whose every file is
there and intact, and says which incomplete ones it skipped.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from multitune.distributed import any_rank, gather_checked, main_print, max_over_ranks, node_print
from multitune.errors import UserError
from multitune.training.manifest import (
    DCP_DIRS, MARKER, legacy_problem, manifest_names, manifest_problem, missing_parts, read_marker, write_marker,
)
from multitune.files import folder_size, write_error
from multitune.rundir import RunDir


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's examples per optimizer step were made: processes x batch_size x grad_accum."""

    world_size: int
    batch_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum

    def __str__(self) -> str:
        return f"{self.world_size} process(es) x batch_size {self.batch_size} x grad_accum {self.grad_accum}"


class CompleteMarker(TrainerCallback):
    """After Trainer has saved a checkpoint on every rank, mark it complete (each writing process).

    The marker records the batch layout and the manifest of the folder (every file's size and sha256), which
    is what later judges the checkpoint whole. Put it after every callback that writes into the checkpoint.
    ``oom_split``: each micro-batch ran as this many pieces after an out-of-memory back-off (multitune.training.autofit),
    which a resume keeps.
    """

    oom_split = 1

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its part and RNG state
        if args.should_save:  # the main process, or each node's first one with save_on_each_node
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            layout = {"world_size": args.world_size, "batch_size": args.per_device_train_batch_size,
                      "grad_accum": args.gradient_accumulation_steps}
            write_marker(folder, {"global_step": state.global_step, "time": time.time(), **layout, "oom_split": self.oom_split})
        _barrier()
        return control


class TrainingClock(TrainerCallback):
    """Training time summed over every launch of a run, for the cost columns of `compare`.

    Trainer's own `train_runtime` covers only the last launch. Each checkpoint records the time so far
    (``clock.json``, written before the COMPLETE marker), and a resumed run starts from it: work lost
    after the last checkpoint to a crash is not counted.
    """

    FILE = "clock.json"

    def __init__(self, resumed_from: Path | None = None):
        saved = resumed_from / self.FILE if resumed_from else None
        self.base = json.loads(saved.read_text())["train_seconds"] if saved and saved.exists() else 0.0
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.base + time.monotonic() - self.started

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        return control

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / self.FILE).write_text(json.dumps({"train_seconds": self.seconds()}))
        return control


class TimedCheckpoints(TrainerCallback):
    """Ask for a checkpoint when ``minutes`` have passed since the last one (on top of save_steps).

    Each rank's clock starts after its own model load, so the ranks cross the deadline at different
    steps; one that saved alone would wait in the save's barrier while the others wait in the next
    gradient all-reduce. The ranks agree (one all_reduce per step): all save once any is due.
    """

    def __init__(self, minutes: float | None):
        self.seconds = minutes * 60 if minutes else None
        self.last = time.monotonic()

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds and any_rank(time.monotonic() - self.last >= self.seconds):
            control.should_save = True
        return control


class StopRequest:
    """SIGTERM or SIGINT (a reclaimed pod, Ctrl-C): recorded by the handler, acted on where every rank agrees.

    During training GracefulStop agrees at each step's end; after it, the launch (multitune.launch.runner)
    holds the handlers until it ends and asks :meth:`agreed` between its stages, so a signal during the
    final save, the evaluation or the report lets that stage finish and then stops the launch cleanly
    (one rank's signal stops every rank at the same point). A second Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.training = False
        self._held = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signum = signum
        then = ("saving a checkpoint at the end of this step, then stopping" if self.training
                else "stopping once the current stage (final save, evaluation, report) is finished")
        print(f"\nreceived {signal.Signals(signum).name}: {then}", flush=True)

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on (a no-op when already installed)."""
        if self._previous:
            return
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                pass

    def remove(self) -> None:
        """Give the handlers back, unless a launch holds them."""
        if self._held:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextmanager
    def held(self):
        """Installed from here to the end of the block (the whole launch), whatever training does."""
        self.install()
        self.signum, self._held = None, True  # a signal from before the launch (a trainer that crashed) is not this one's
        try:
            yield self
        finally:
            self._held = False
            self.remove()

    def agreed(self) -> bool:
        """Whether any rank received a signal: one all_reduce, so call it where every rank passes."""
        return any_rank(self.signum is not None)


STOP = StopRequest()  # one per process: signal handlers are


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT, finish the current step, save a checkpoint and stop training cleanly."""

    def __init__(self, request: StopRequest = STOP) -> None:
        self.request = request
        self.stopped = False  # training stopped on an agreed signal, with a checkpoint: the same on every rank

    def on_train_begin(self, args, state, control, **kwargs):
        self.request.install()
        self.request.training = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # ranks may get the signal at different steps; all must stop at the same one, or a collective hangs
        if max_over_ranks(self.request.signum or 0):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.request.training = False
        self.request.remove()  # kept while a launch holds it: a signal after training must not kill silently
        return control


# ---------------------------------------------------------------- completeness


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a checkpoint a resume can use (None: it is one), never unpickling anything.

    Marked complete by multitune, with every file its manifest records there and unchanged (see
    :mod:`multitune.training.manifest`; checkpoints marked before the manifest are checked as far as
    that goes without it), holding what a resume reads, and its trainer state parses.
    """
    marker = read_marker(folder)
    if marker is None:
        return "not marked complete"
    names = manifest_names(marker)
    listed = set(names) if names is not None else {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    world_size = marker.get("world_size")
    why = missing_parts(listed, world_size if isinstance(world_size, int) else None)
    if why is None:
        why = manifest_problem(folder, marker) if "files" in marker else legacy_problem(folder)
    if why is None:
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            why = "trainer_state.json is unreadable"
    return why


def is_complete(folder: Path) -> bool:
    """Marked complete, and every file a resume reads is there and whole (weights, optimizer, scheduler, RNG, state)."""
    return problem(folder) is None


def is_sharded(folder: Path) -> bool:
    """Written under FSDP as per-rank shards of the whole model (full fine-tuning): needs FSDP to load."""
    return (folder / DCP_DIRS[0]).is_dir() and not (folder / "adapter_model.safetensors").exists()


def latest_complete(checkpoints: Path, below: int | None = None) -> Path | None:
    """The newest complete checkpoint (of a step under ``below`` if given); incomplete or corrupt newer ones are
    skipped with a warning (once per node)."""
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
         and (below is None or int(p.name.split("-")[-1]) < below)),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for folder in found:
        why = problem(folder)
        if why is None:
            return folder
        node_print(f"warning: skipping incomplete or corrupt checkpoint {folder} ({why}); trying the previous one")
    return None


def step_of(folder: Path | None) -> int:
    return int(folder.name.split("-")[-1]) if folder else -1


def common_step(checkpoints: Path, steps: list[int]) -> int:
    """When the ranks' newest complete checkpoints differ (node-local copies, one of them damaged), the oldest of
    them if every rank holds it complete, else -1. Every rank calls it with the same gathered ``steps``."""
    oldest = min(steps)
    if len(set(steps)) < 2 or oldest < 0:
        return -1
    if not all(gather_checked(lambda: is_complete(checkpoints / f"checkpoint-{oldest}"))):
        return -1
    main_print(f"warning: not every node holds checkpoint-{max(steps)} complete; every rank resumes from checkpoint-{oldest}")
    return oldest


# ---------------------------------------------------------------- resuming on another number of processes


def saved_layout(folder: Path) -> Layout | None:
    """The batch layout recorded in the checkpoint's marker (None for checkpoints from before it was recorded)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        return Layout(marker["world_size"], marker["batch_size"], marker["grad_accum"])
    except (OSError, ValueError, KeyError):
        return None


def saved_oom_split(folder: Path) -> int:
    """How many pieces each micro-batch of the checkpoint's launch ran as (1: no out-of-memory back-off)."""
    try:
        return int(json.loads((folder / MARKER).read_text()).get("oom_split", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def grad_accum_for_resume(saved: Layout | None, now: Layout, *, grad_accum_from_user: bool) -> int:
    """The grad_accum that keeps the checkpoint's global batch on this launch's processes.

    A pod that comes back with fewer GPUs resumes with the same examples per optimizer step: when
    only the number of processes (or batch_size) changed, grad_accum is adjusted automatically; a
    grad_accum the user changed must itself give the same global batch. Otherwise: a clear error.
    """
    if saved is None or now.global_batch == saved.global_batch:
        return now.grad_accum
    target, per_step = saved.global_batch, now.world_size * now.batch_size
    if not grad_accum_from_user and target % per_step == 0:
        ga = target // per_step
        main_print(f"notice: the checkpoint was trained on {saved}; on {now.world_size} process(es) train.grad_accum "
                   f"becomes {ga} (automatically) to keep the global batch of {target} examples per step")
        return ga
    if target % now.world_size:
        fix = f"resume on a number of processes that divides {target}"
    else:
        per_rank = target // now.world_size
        bs = max(d for d in range(1, min(now.batch_size, per_rank) + 1) if per_rank % d == 0)
        fix = f"e.g. train.batch_size={bs} train.grad_accum={per_rank // bs}"
    raise UserError(
        f"the checkpoint was trained with a global batch of {target} examples per step ({saved}); "
        f"{now} = {now.global_batch} would change the training: set processes x batch_size x grad_accum = {target} ({fix})"
    )


def out_of_space(run: RunDir, err: BaseException) -> UserError:
    """The error for a save the OS refused (``err``, e.g. a full disk): the folder it was writing (the newest checkpoint when that one is
    incomplete, else final/ or the run directory) and what a checkpoint needs (the newest complete one's size)."""
    folders = sorted((p for p in run.root.glob("checkpoints/**/checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                     key=lambda p: p.stat().st_mtime)
    complete = [p for p in folders if is_complete(p)]
    if folders and folders[-1] not in complete:
        where = folders[-1]
    else:
        where = run.final if run.final.exists() else run.root
    needed = folder_size(complete[-1]) if complete else None
    return write_error(err, where, needed, " (the size of the last complete checkpoint)" if complete else "")
