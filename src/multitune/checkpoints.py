"""Checkpoints that survive a crash or a reclaimed pod.

Trainer writes ``checkpoint-N/`` piece by piece (weights, optimizer, RNG, state), so a kill in the
middle leaves a folder that looks like a checkpoint but is not one. These callbacks add what Trainer
lacks: a COMPLETE marker written only after every rank finished saving, a checkpoint every M minutes
as well as every N steps, and a checkpoint plus clean stop on SIGTERM/SIGINT. Resume picks the
newest *complete* checkpoint and says which incomplete ones it skipped.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", "pytorch_model_fsdp_0")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CompleteMarker(TrainerCallback):
    """After Trainer has saved a checkpoint on every rank, mark it complete (main process only)."""

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its shard and RNG state
        if args.should_save:  # the main process, or each node's first one with save_on_each_node
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / MARKER).write_text(json.dumps({"global_step": state.global_step, "time": time.time()}))
        _barrier()
        return control


class TimedCheckpoints(TrainerCallback):
    """Ask for a checkpoint when ``minutes`` have passed since the last one (on top of save_steps)."""

    def __init__(self, minutes: float | None):
        self.seconds = minutes * 60 if minutes else None
        self.last = time.monotonic()

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds and time.monotonic() - self.last >= self.seconds:
            control.should_save = True
        return control


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT, finish the current step, save a checkpoint and stop training cleanly."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                pass
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_requested():
            control.should_save = True
            control.should_training_stop = True
        return control

    def _any_rank_requested(self) -> bool:
        """Ranks may get the signal at different steps; all must stop at the same one, or a collective hangs."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested is not None
        flag = torch.tensor([0 if self.requested is None else self.requested], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.requested is None:
            self.requested = int(flag.item())
        return bool(flag.item())

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return control


def _safetensors_intact(path: Path) -> bool:
    """The header parses and the file holds every byte the header points to (catches truncation)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end == size


def is_complete(folder: Path) -> bool:
    if not (folder / MARKER).exists():
        return False
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = [folder / w for w in _WEIGHTS if (folder / w).exists()]
    return bool(weights) and all(_safetensors_intact(w) for w in weights if w.suffix == ".safetensors")


def latest_complete(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint; incomplete or corrupt newer ones are skipped with a warning."""
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for folder in found:
        if is_complete(folder):
            return folder
        print(f"warning: skipping incomplete or corrupt checkpoint {folder}")
    return None


def agree_on_resume(resuming: bool, last: Path | None) -> None:
    """Every rank must resume from the same step. Without shared storage a node may hold no copy of the
    checkpoint the others found; stop with a message instead of letting ranks diverge or hang."""
    import torch.distributed as dist

    from multitune.errors import UserError

    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = (resuming, int(last.name.split("-")[-1]) if last else -1)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    if len(set(seen)) > 1:
        detail = ", ".join(f"rank {r}: {'step ' + str(s) if s >= 0 else 'none'}" for r, (_, s) in enumerate(seen))
        raise UserError(
            f"ranks disagree on the checkpoint to resume from ({detail}); put run_dir on storage shared by all "
            "nodes, or set train.save_on_each_node=true so that every node keeps a full copy"
        )
