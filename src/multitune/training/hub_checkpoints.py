"""Checkpoints that survive a lost pod: every complete checkpoint also goes to a private Hub repo.

With ``train.hub_checkpoints: true`` and ``hub.repo_id: me/name``, the repo ``me/name-checkpoints`` (private)
holds one folder per run, named after the run directory::

    <run>/config.yaml  <run>/splits/*.json  <run>/wandb_id  <run>/checkpoints/checkpoint-N/...

Each upload is one Hub commit (atomic: a checkpoint is there whole or not at all) that adds the newest
checkpoint and deletes those beyond ``train.save_total_limit``. It runs in a background thread, so training
does not wait, from the main process only (never more than one process per node, never a collective); the
checkpoint's files are hard-linked into a staging folder first, so Trainer's rotation cannot delete them
mid-upload. A failed upload is a warning and the next checkpoint tries again. The process waits for the
last upload before it exits.

:func:`fetch_newest_checkpoint` is the way back: on a fresh pod whose run directory is empty or missing, it
downloads the run's config, splits and newest checkpoint, so that ``multitune train`` resumes exactly as it
would from the lost pod's disk.
"""

from __future__ import annotations

import os
import shutil
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

from multitune.training.checkpoints import MARKER, is_complete, latest_complete
from multitune.config import Config
from multitune.distributed import checked
from multitune.errors import UserError
from multitune.rundir import RunDir

SUFFIX = "-checkpoints"
_PENDING: list[Future] = []


def make_api():
    """The Hub client (a function so that tests can put a local fake in its place)."""
    from huggingface_hub import HfApi

    return HfApi()


def snapshot_download(**kwargs) -> str:
    from huggingface_hub import snapshot_download as download

    return download(**kwargs)


def checkpoint_repo(cfg: Config) -> str:
    return f"{cfg.hub.repo_id}{SUFFIX}"


def run_files(run: RunDir) -> list[Path]:
    """The run-level files a resume needs besides the checkpoint: the resolved config, the split, the wandb id."""
    files = [run.config, *sorted(run.splits.glob("*.json")), run.root / "wandb_id"]
    return [f for f in files if f.is_file()]


def commit_operations(run: RunDir, staged: Path, step: int, remote_steps: list[int], keep: int) -> list:
    """The exact operations of one upload: add the run files and ``checkpoint-<step>`` (its COMPLETE marker
    last), delete the remote checkpoints beyond the newest ``keep`` and any from a run started over."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    prefix = run.root.name
    ops = [CommitOperationAdd(path_in_repo=f"{prefix}/{f.relative_to(run.root).as_posix()}", path_or_fileobj=str(f))
           for f in run_files(run)]
    files = sorted((f for f in staged.rglob("*") if f.is_file()), key=lambda f: (f.name == MARKER, f.relative_to(staged).as_posix()))
    ops += [CommitOperationAdd(path_in_repo=f"{prefix}/checkpoints/checkpoint-{step}/{f.relative_to(staged).as_posix()}",
                               path_or_fileobj=str(f)) for f in files]
    ops += [CommitOperationDelete(path_in_repo=f"{prefix}/checkpoints/checkpoint-{s}/", is_folder=True)
            for s in sorted(remote_steps) if s not in kept_steps(remote_steps, step, keep)]
    return ops


def kept_steps(remote: list[int], step: int, keep: int) -> list[int]:
    """The newest ``keep`` checkpoints once ``step`` is up. A remote step above ``step`` is from an earlier run of
    the same name that was started over (a live run has no future checkpoint): it goes, or a resume would pick it."""
    return sorted({s for s in remote if s < step} | {step}, reverse=True)[:keep]


def remote_steps(api, repo_id: str, prefix: str) -> list[int]:
    """Steps of this run's checkpoints on the Hub ([] when the repo or the run's folder does not exist yet)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        entries = list(api.list_repo_tree(repo_id, path_in_repo=f"{prefix}/checkpoints"))
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return []
    names = [Path(e.path).name for e in entries]
    return sorted(int(n.split("-")[-1]) for n in names if n.startswith("checkpoint-") and n.split("-")[-1].isdigit())


def _stage(folder: Path, staging: Path) -> Path:
    """Hard links to the checkpoint's files (a copy where links are impossible): rotation may delete the original."""
    target = staging / folder.name
    shutil.rmtree(target, ignore_errors=True)
    for f in folder.rglob("*"):
        dest = target / f.relative_to(folder)
        if f.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dest)
        except OSError:
            shutil.copy2(f, dest)
    return target


class HubCheckpoints(TrainerCallback):
    """After each complete checkpoint, upload it in the background (main process only). Put it after CompleteMarker."""

    def __init__(self, cfg: Config, run: RunDir):
        self.run, self.repo, self.keep = run, checkpoint_repo(cfg), cfg.train.save_total_limit
        self.staging = run.root / ".hub-upload"
        self._executor: ThreadPoolExecutor | None = None
        self._remote: list[int] | None = None

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not is_complete(folder):
            print(f"warning: {folder} is not complete; not uploading it")
            return control
        try:
            staged = _stage(folder, self.staging)
        except Exception as e:  # noqa: BLE001 - a full disk, a vanished file: never stop training for an upload
            shutil.rmtree(self.staging / folder.name, ignore_errors=True)
            print(f"warning: staging {folder.name} for upload failed ({type(e).__name__}: {e}); not uploading it, "
                  "training goes on", flush=True)
            return control
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-checkpoints")  # uploads in order
        _PENDING.append(self._executor.submit(self._upload, staged, state.global_step))
        return control

    def _upload(self, staged: Path, step: int) -> None:
        try:
            api = make_api()
            if self._remote is None:
                api.create_repo(self.repo, private=True, exist_ok=True)
                self._remote = remote_steps(api, self.repo, self.run.root.name)
            ops = commit_operations(self.run, staged, step, self._remote, self.keep)
            api.create_commit(self.repo, operations=ops, commit_message=f"{self.run.root.name}: checkpoint-{step}")
            self._remote = kept_steps(self._remote, step, self.keep)
            print(f"uploaded checkpoint-{step} to https://huggingface.co/{self.repo} ({self.run.root.name}/)", flush=True)
        except Exception as e:  # never stop training for an upload; the next checkpoint tries again
            print(f"warning: uploading checkpoint-{step} to {self.repo} failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); training goes on", flush=True)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def on_train_end(self, args, state, control, **kwargs):
        running = sum(not f.done() for f in _PENDING)
        if running and state.is_world_process_zero:
            print(f"{running} checkpoint upload(s) still running in the background; the process exits when they finish")
        return control


def wait_for_uploads() -> None:
    """Block until every background upload has finished (the interpreter also waits at exit)."""
    while _PENDING:
        _PENDING.pop(0).result()


def fetch_newest_checkpoint(cfg: Config, run: RunDir, state, *, resume: bool = True) -> Path | None:
    """On a fresh pod, bring this run's newest Hub checkpoint (and its config and split) into ``run_dir``.

    Call it on every rank before resume detection. Each node's first process downloads when its run
    directory holds no complete checkpoint (nodes without shared storage each need a copy); then every rank
    joins one all_gather of the outcome (:func:`multitune.distributed.checked`), so a failure on one node is
    one clear error on every rank, never a rank left waiting.
    """
    if not cfg.train.hub_checkpoints:
        return None
    from huggingface_hub import get_token

    def fetch() -> Path | None:
        if not get_token():  # a node without one refuses inside the agreement, as every other failure here
            raise UserError("train.hub_checkpoints needs a Hugging Face token with write access: export HF_TOKEN=... "
                            "or run `hf auth login` (nothing was written)")
        if resume and state.is_local_main_process and not run.is_finished() and latest_complete(run.checkpoints) is None:
            return _download(cfg, run)
        return None

    # one agreed outcome: a node whose download failed must not leave the others waiting at a barrier
    return checked(fetch)


def _download(cfg: Config, run: RunDir) -> Path | None:
    repo, prefix = checkpoint_repo(cfg), run.root.name
    try:
        steps = remote_steps(make_api(), repo, prefix)
    except Exception as e:
        # never start over silently: the run's first upload would then delete the Hub's newer checkpoints
        raise UserError(f"cannot list the checkpoints of {prefix} in {repo} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'}); check the network and HF_TOKEN and "
                        "relaunch, or pass --no-resume to start over (the Hub's checkpoints of this run are then replaced)") from None
    if not steps:
        print(f"no checkpoint of {prefix} on the Hub yet ({repo}): starting fresh")
        return None
    step = max(steps)
    # unique per node and process: nodes may share this directory, and containers reuse pids
    tmp = run.root.parent / f".{run.root.name}.hub-download-{socket.gethostname()}-{os.getpid()}"
    print(f"downloading checkpoint-{step} of {prefix} from {repo}")
    try:
        snapshot_download(repo_id=repo, local_dir=str(tmp), allow_patterns=[
            f"{prefix}/config.yaml", f"{prefix}/splits/*", f"{prefix}/wandb_id", f"{prefix}/checkpoints/checkpoint-{step}/*"])
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"downloading checkpoint-{step} of {prefix} from {repo} failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'}); check the network and relaunch") from None
    src = tmp / prefix
    run.root.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(src).parts):
        dest = run.root / f.relative_to(src)
        if not dest.exists():  # what the run dir already holds (a config on a volume) is kept
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    target = run.checkpoints / f"checkpoint-{step}"
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src / "checkpoints" / f"checkpoint-{step}", target)
    except OSError:  # another node sharing this directory put it there first
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(target):
        raise UserError(f"the checkpoint downloaded from {repo} into {target} is incomplete; delete it and relaunch")
    return target


def hub_callbacks(cfg: Config, run: RunDir) -> list[TrainerCallback]:
    """The callbacks train.py adds after CompleteMarker: [] unless train.hub_checkpoints is on."""
    return [HubCheckpoints(cfg, run)] if cfg.train.hub_checkpoints else []
