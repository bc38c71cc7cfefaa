"""What keeps a launch from losing work or keeping garbage: one launch per run directory, and no
non-finite weights saved, rotated in, resumed from, marked done or pushed.

A diverged run (too high a learning rate) turns its loss and weights into NaN within a few steps; left
alone, Trainer would keep saving checkpoints of NaN weights and rotate the good ones away, then the run
would be marked done and pushed. :class:`DivergenceGuard` stops training at the first optimizer step
whose loss or gradient norm is not finite, before that step is logged, evaluated or saved (so before
rotation deletes anything), with every rank stopping at the same step (one agreed flag per step).
"""

from __future__ import annotations

import functools
import math
import uuid
from pathlib import Path

import torch

from multitune.distributed import any_rank, gather_checked, node_print, rank
from multitune.errors import UserError
from multitune.rundir import RunDir, RunLock
from multitune.training.checkpoints import latest_complete, step_of

# ---------------------------------------------------------------- one launch per run directory

_HELD: dict[Path, RunLock | None] = {}


def lock_run(run: RunDir, writer: bool) -> None:
    """Take the run directory's lock in each writing process (the main one, or each node's first with
    save_on_each_node), before anything is written there. A refusal on any rank stops every rank.

    Rank 0 locks first; the other writers then lock their node's copy, or find it held by this very job
    (save_on_each_node on storage that the nodes share). Every rank makes the same two collectives.
    """
    root = run.root.resolve()
    held = root in _HELD  # this process locked it already (a per_task relaunch of the same stage)

    def first() -> str:
        job = uuid.uuid4().hex
        if rank() == 0 and not held:
            _HELD[root] = RunLock.acquire(root, job)
        return job

    job = gather_checked(first)[0]

    def others() -> None:
        if writer and rank() != 0 and not held:
            _HELD[root] = RunLock.acquire(root, job, same_job_ok=True)

    gather_checked(others)


def releases_run_locks(fn):
    """Release the run directory locks taken during ``fn``, however it ends (a process may train again)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for root in set(_HELD) - before:
                lock = _HELD.pop(root)
                if lock is not None:
                    lock.release()

    return wrapper


# ---------------------------------------------------------------- non-finite weights


def nonfinite_tensor(folder: Path) -> str | None:
    """The name of the first tensor of a checkpoint's safetensors weights that holds NaN or inf (None: all
    finite). Read one tensor at a time. FSDP's sharded checkpoints (DCP) are not read here: a resume from
    one with NaN weights stops at its first step (DivergenceGuard)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        import json

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).exists()]
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if not torch.isfinite(f.get_tensor(key)).all():
                    return key
    return None


def latest_finite(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint whose weights are finite. A newer one holding NaN or inf (saved by a version
    without the divergence guard, or damaged before saves recorded digests) is skipped with a warning, as a
    damaged one is, and kept: a relaunch never stops on it, and a resume that diverges again stops at that step
    (DivergenceGuard). Every rank reads (an adapter is small), so the ranks of a node agree on the step."""
    last = latest_complete(checkpoints)
    while last is not None and (bad := nonfinite_tensor(last)):
        node_print(f"warning: {last} holds non-finite weights ({bad} has NaN or inf); resuming from the checkpoint "
                   "before it (kept; the run saves that step again when it gets there)")
        last = latest_complete(checkpoints, below=step_of(last))
    return last


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this rank's shard


def weights_finite(model: torch.nn.Module) -> bool:
    """Every rank's trainable parameters are finite (agreed: one all_reduce)."""
    with torch.no_grad():
        bad = any(not torch.isfinite(_local(p)).all() for p in model.parameters() if p.requires_grad)
    return not any_rank(bad)


class DivergenceGuard:
    """Trainer mixin: stop with one clear error when training diverges, never saving what it made.

    Checked on every rank at each optimizer step, after the step and before Trainer logs, evaluates or
    saves it (``_maybe_log_save_evaluate``): the loss since the last log (sft_config turns off
    transformers' ``logging_nan_inf_filter``, which would hide a NaN loss) and the gradient norm. Before
    each checkpoint and after training the trainable weights are checked as well.
    """

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        loss_ok = bool(torch.isfinite(tr_loss).all()) if isinstance(tr_loss, torch.Tensor) else math.isfinite(tr_loss)
        norm_ok = grad_norm is None or math.isfinite(float(grad_norm))
        if any_rank(not (loss_ok and norm_ok)):
            what = " and ".join(w for w, ok in (("loss", loss_ok), ("gradient norm", norm_ok)) if not ok) or "loss on another rank"
            self._diverged(f"the {what} {'are' if ' and ' in what else 'is'} not finite (NaN or inf)")
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        if not weights_finite(self.model):
            self._diverged("the weights are not finite (NaN or inf)")
        return super()._save_checkpoint(model, trial)

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        if not weights_finite(self.model):
            self._diverged("the trained weights are not finite (NaN or inf)")
        return out

    def _diverged(self, what: str) -> None:
        step, lr = self.state.global_step, self.args.learning_rate
        for callback in self.callback_handler.callbacks:  # end the progress bar's line: the error gets its own
            bar = getattr(callback, "training_bar", None)
            if bar is not None:
                bar.close()
                callback.training_bar = None
        raise UserError(f"training diverged at step {step}: {what}; nothing from it was saved. Lower train.learning_rate "
                        f"(now {lr:g}, e.g. train.learning_rate={lr / 10:g}) and start over with --no-resume")
