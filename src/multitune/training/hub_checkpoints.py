"""Checkpoints that survive a lost pod: every complete checkpoint also goes to a private Hub repo.

With ``train.hub_checkpoints: true`` and ``hub.repo_id: me/name``, the repo ``me/name-checkpoints`` (private)
holds one folder per run, named after the run directory::

    <run>/config.yaml  <run>/splits/*.json  <run>/wandb_id  <run>/checkpoints/checkpoint-N/...

Each upload is one Hub commit (atomic: a checkpoint is there whole or not at all) that adds the newest
checkpoint and deletes those beyond ``train.save_total_limit``; a Hub checkpoint newer than the one
uploaded is kept (it is this run's own, e.g. one the launch could not load). A run started over
(--no-resume, --overwrite) deletes the folder's checkpoints when it starts, and its first upload any that
appeared since (the earlier run's: a later resume must never pick one). The folder's ``config.yaml`` is the run's identity,
compared as the run recorded it (the user's config, not auto-fit's choices; a key added since at its
default): a run whose training config differs from it neither resumes from, nor starts over in, nor
uploads into that folder, unless --overwrite replaces it. It runs in a background thread, so training
does not wait, from the main process only (never more than one process per node, never a collective); the
checkpoint's files are hard-linked into a staging folder first, so Trainer's rotation cannot delete them
mid-upload. A failed upload is a warning and the next checkpoint tries again. The process waits for the
last upload before it exits.

:func:`fetch_newest_checkpoint` is the way back: when the Hub holds a newer checkpoint than the run directory
(a fresh pod, or a volume older than the lost pod), it downloads the run's config, splits and that
checkpoint, only the files its manifest names, verified, and falls back to the previous one when it does
not match; so ``multitune train`` resumes exactly as it would from the lost pod's disk.
"""

from __future__ import annotations

import os
import shutil
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import yaml
from transformers import TrainerCallback

from multitune.config import Config
from multitune.distributed import checked
from multitune.errors import UserError
from multitune.rundir import RunDir, training_differences
from multitune.training.checkpoints import is_complete, latest_complete, problem, step_of
from multitune.training.manifest import MARKER, manifest_names, read_marker

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


def commit_operations(run: RunDir, staged: Path, step: int, remote_steps: list[int], keep: int, *,
                      started_over: bool = False) -> list:
    """The exact operations of one upload: add the run files and ``checkpoint-<step>`` (its COMPLETE marker
    last), delete the remote checkpoints beyond the newest ``keep`` (see :func:`kept_steps`).

    ``started_over``: the first upload of a run started over, so every other remote checkpoint is the earlier
    run's and goes, older ones included (a fresh pod would resume the newest of them: the earlier run's
    optimizer and data position under this run's config). A remote ``checkpoint-<step>`` itself is
    overwritten file by file; its COMPLETE marker then names only this run's files.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    prefix = run.root.name
    ops = [CommitOperationAdd(path_in_repo=f"{prefix}/{f.relative_to(run.root).as_posix()}", path_or_fileobj=str(f))
           for f in run_files(run)]
    files = sorted((f for f in staged.rglob("*") if f.is_file()), key=lambda f: (f.name == MARKER, f.relative_to(staged).as_posix()))
    ops += [CommitOperationAdd(path_in_repo=f"{prefix}/checkpoints/checkpoint-{step}/{f.relative_to(staged).as_posix()}",
                               path_or_fileobj=str(f)) for f in files]
    kept = [step] if started_over else kept_steps(remote_steps, step, keep)
    ops += [CommitOperationDelete(path_in_repo=f"{prefix}/checkpoints/checkpoint-{s}/", is_folder=True)
            for s in sorted(remote_steps) if s not in kept]
    return ops


def kept_steps(remote: list[int], step: int, keep: int) -> list[int]:
    """The remote checkpoints left once ``step`` is up: the newest ``keep`` up to ``step``, and every newer one.

    A newer one is this run's own (resumed from an older checkpoint, say when the newest could not be
    loaded): it stays until the run gets there. (A run started over removes the earlier run's first:
    :func:`commit_operations`.)
    """
    kept = set(sorted({s for s in remote if s < step} | {step}, reverse=True)[:keep])
    return sorted(kept | {s for s in remote if s > step}, reverse=True)


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


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"


def _temporary(run: RunDir, what: str) -> Path:
    # unique per node and process: nodes may share the run's parent directory, and containers reuse pids
    return run.root.parent / f".{run.root.name}.hub-{what}-{socket.gethostname()}-{os.getpid()}"


def foreign_run(cfg: Config, repo: str, prefix: str, tmp: Path) -> list[str]:
    """The training settings in which the run recorded in the Hub folder ``prefix`` (its ``config.yaml``)
    differs from ``cfg`` (the user's config, as the run records it): [] when it is the same run, or the
    folder records none yet. The recorded config is read as :meth:`RunDir.changes` reads the run
    directory's (:func:`training_differences`): a folder an earlier version uploaded is this run's."""
    snapshot_download(repo_id=repo, local_dir=str(tmp), allow_patterns=[f"{prefix}/config.yaml"])
    path = tmp / prefix / "config.yaml"
    if not path.is_file():
        return []
    try:
        return training_differences(yaml.safe_load(path.read_text()), cfg)
    except yaml.YAMLError:
        return ["config.yaml (unreadable)"]
    except UserError:
        return ["config.yaml (not a config this version reads)"]


def foreign_to(cfg: Config, repo: str, run: RunDir) -> list[str]:
    """:func:`foreign_run` for the run directory ``run``'s Hub folder, downloaded beside it and removed."""
    tmp = _temporary(run, "identity")
    try:
        return foreign_run(cfg, repo, run.root.name, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def foreign_message(repo: str, prefix: str, differ: list[str]) -> str:
    return (f"{repo} holds, in {prefix}/, the checkpoints of another run (its config differs in {', '.join(differ[:5])}); "
            "the Hub folder is named after run_dir's last folder name: give this run another run_dir name, or pass "
            "--overwrite to start over and replace them")


class HubCheckpoints(TrainerCallback):
    """After each complete checkpoint, upload it in the background (main process only). Put it after CompleteMarker.

    ``started_over``: the flag that started this launch's run over ("--no-resume", "--overwrite"; "" when it
    resumed): the Hub's checkpoints of that name are the earlier run's (the launch deleted them), and the first
    upload deletes any that appeared since. A
    folder holding a run of another config is replaced only with --overwrite (:func:`fetch_newest_checkpoint`
    refused it at launch; checked again here, the Hub may have changed since).
    """

    def __init__(self, cfg: Config, run: RunDir, *, started_over: str = ""):
        self.cfg, self.run, self.repo, self.keep = cfg, run, checkpoint_repo(cfg), cfg.train.save_total_limit
        self.started_over = started_over
        self.staging = run.root / ".hub-upload"
        self._executor: ThreadPoolExecutor | None = None
        self._remote: list[int] | None = None
        self._refused: str | None = None
        self._replacing = bool(started_over)  # until the first upload has replaced the earlier run's checkpoints

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if read_marker(folder) is None:
            print(f"warning: {folder} is not complete; not uploading it")
            return control
        try:
            staged = _stage(folder, self.staging)  # checked against its manifest in the background
        except Exception as e:  # noqa: BLE001 - a full disk, a vanished file: never stop training for an upload
            shutil.rmtree(self.staging / folder.name, ignore_errors=True)
            print(f"warning: staging {folder.name} for upload failed ({type(e).__name__}: {e}); not uploading it, "
                  "training goes on", flush=True)
            return control
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-checkpoints")  # uploads in order
        _PENDING.append(self._executor.submit(self._upload, staged, state.global_step))
        return control

    def _first_contact(self, api) -> None:
        """Create the repo, list this run's checkpoints there, and make sure the folder is this run's.

        The identity is the config the run recorded (the user's): ``self.cfg`` is what the trainer runs, with
        train.batch_size auto's choices (micro-batch, accumulation, gradient checkpointing) filled in."""
        api.create_repo(self.repo, private=True, exist_ok=True)
        remote = remote_steps(api, self.repo, self.run.root.name)
        if remote and self.started_over != "--overwrite":
            differ = foreign_to(self.run.load_config(), self.repo, self.run)
            if differ:
                self._refused = foreign_message(self.repo, self.run.root.name, differ)
        self._remote = remote

    def _upload(self, staged: Path, step: int) -> None:
        try:
            why = problem(staged)
            if why:
                print(f"warning: checkpoint-{step} is damaged ({why}); not uploading it", flush=True)
                return
            api = make_api()
            if self._remote is None:
                self._first_contact(api)
            if self._refused:
                print(f"warning: not uploading checkpoint-{step}: {self._refused}", flush=True)
                return
            ops = commit_operations(self.run, staged, step, self._remote, self.keep, started_over=self._replacing)
            api.create_commit(self.repo, operations=ops, commit_message=f"{self.run.root.name}: checkpoint-{step}")
            self._remote = [step] if self._replacing else kept_steps(self._remote, step, self.keep)
            self._replacing = False  # the folder holds this launch's checkpoints alone: later uploads rotate
            print(f"uploaded checkpoint-{step} to https://huggingface.co/{self.repo} ({self.run.root.name}/)", flush=True)
        except Exception as e:  # never stop training for an upload; the next checkpoint tries again
            print(f"warning: uploading checkpoint-{step} to {self.repo} failed ({_one_line(e)}); training goes on", flush=True)
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


def fetch_newest_checkpoint(cfg: Config, run: RunDir, state, *, resume: bool = True, overwrite: bool = False) -> Path | None:
    """Bring this run's newest Hub checkpoint into ``run_dir`` when it is newer than the newest complete one there.

    Call it on every rank before resume detection. Each node's first process looks (nodes without shared
    storage each need a copy); then every rank joins one all_gather of the outcome
    (:func:`multitune.distributed.checked`), so a failure on one node, a missing token included, is one
    clear error on every rank, never a rank left waiting. Returns the checkpoint to resume from on this
    process (None elsewhere, or when there is none). A launch that starts the run over (``resume`` False, or
    ``overwrite``) downloads nothing; without ``overwrite`` it refuses, the same way, a Hub folder holding a
    run of another config; allowed, it deletes the folder's checkpoints (the earlier run's) before training.
    """
    if not cfg.train.hub_checkpoints:
        return None

    def fetch() -> Path | None:
        from huggingface_hub import get_token

        if not get_token():
            raise UserError("train.hub_checkpoints needs a Hugging Face token with write access: export HF_TOKEN=... "
                            "or run `hf auth login` (nothing was written)")
        if not state.is_local_main_process or (resume and not overwrite and run.is_finished()):
            return None
        try:
            if overwrite or not resume:
                _start_over(cfg, run, overwrite=overwrite, main=state.is_main_process)
                return None
            return _sync(cfg, run)
        except UserError:
            raise
        except Exception as e:  # raised here alone, it would leave the other ranks waiting
            raise UserError(f"reading the checkpoints of {run.root.name} in {checkpoint_repo(cfg)} failed "
                            f"({_one_line(e)}); relaunch, or set train.hub_checkpoints=false to use this disk alone") from e

    return checked(fetch)


def _start_over(cfg: Config, run: RunDir, *, overwrite: bool, main: bool) -> None:
    """A launch that starts the run over (--no-resume, --overwrite): the Hub folder's checkpoints are the earlier
    run's. Without --overwrite they are refused when that run had another config (the same run_dir name); allowed,
    the main process deletes them now, before training, not at the first upload: a relaunch before that upload
    would resume the earlier run's newest as this run's."""
    from huggingface_hub import CommitOperationDelete

    api, repo, prefix = make_api(), checkpoint_repo(cfg), run.root.name
    steps = remote_steps(api, repo, prefix)
    if not steps:
        return
    if not overwrite and (differ := foreign_to(cfg, repo, run)):
        raise UserError(foreign_message(repo, prefix, differ))
    if main:
        ops = [CommitOperationDelete(path_in_repo=f"{prefix}/checkpoints/checkpoint-{s}/", is_folder=True) for s in steps]
        api.create_commit(repo, operations=ops, commit_message=f"{prefix}: started over, the earlier run's checkpoints removed")
        print(f"started over: removed the earlier run's checkpoints {steps} from {repo} ({prefix}/)", flush=True)


def _sync(cfg: Config, run: RunDir) -> Path | None:
    """The newest complete checkpoint among the run directory's and the Hub's, downloaded when it is the Hub's."""
    repo, prefix = checkpoint_repo(cfg), run.root.name
    local = latest_complete(run.checkpoints)
    try:
        steps = remote_steps(make_api(), repo, prefix)
    except Exception as e:
        # never resume an older checkpoint silently: the Hub may hold a newer one
        raise UserError(f"cannot list the checkpoints of {prefix} in {repo} ({_one_line(e)}); check the network and "
                        "HF_TOKEN and relaunch, or set train.hub_checkpoints=false to resume from this disk alone") from None
    if not steps:
        print(f"no checkpoint of {prefix} on the Hub yet ({repo})")
        return local
    newer = [s for s in sorted(steps, reverse=True) if s > step_of(local)]
    tmp = _temporary(run, "download")
    try:
        _download(repo, tmp, [f"{prefix}/config.yaml", *(f"{prefix}/checkpoints/checkpoint-{s}/{MARKER}" for s in newer)])
        differ = foreign_run(cfg, repo, prefix, tmp)
        if differ:
            raise UserError(foreign_message(repo, prefix, differ))
        for step in newer:
            got = _fetch_step(repo, prefix, step, tmp, run)
            if got is not None:
                return got
        return local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(repo: str, tmp: Path, patterns: list[str]) -> None:
    try:
        snapshot_download(repo_id=repo, local_dir=str(tmp), allow_patterns=patterns)
    except Exception as e:
        raise UserError(f"downloading from {repo} failed ({_one_line(e)}); check the network and relaunch") from None


def _fetch_step(repo: str, prefix: str, step: int, tmp: Path, run: RunDir) -> Path | None:
    """Download the Hub's ``checkpoint-<step>`` (only the files its manifest names) and verify it: its place in
    the run directory, or None (with a warning) when it does not match what its save recorded."""
    base = f"{prefix}/checkpoints/checkpoint-{step}"
    src = tmp / base
    marker = read_marker(src)
    names = manifest_names(marker) if marker is not None else None
    if marker is None or ("files" in marker and names is None):
        print(f"warning: checkpoint-{step} of {prefix} in {repo} has no readable COMPLETE marker; trying the previous one")
        return None
    print(f"downloading checkpoint-{step} of {prefix} from {repo}", flush=True)
    files = [f"{base}/{n}" for n in names] if names else [f"{base}/*"]  # marked before the manifest: the whole folder
    _download(repo, tmp, [f"{prefix}/config.yaml", f"{prefix}/splits/*", f"{prefix}/wandb_id", *files])
    why = problem(src)
    if why:
        print(f"warning: checkpoint-{step} of {prefix} in {repo} is incomplete or damaged ({why}); trying the previous one")
        shutil.rmtree(src, ignore_errors=True)
        return None
    run.root.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in (tmp / prefix).rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(tmp / prefix).parts):
        dest = run.root / f.relative_to(tmp / prefix)
        if not dest.exists():  # what the run dir already holds (a config on a volume) is kept
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    target = run.checkpoints / f"checkpoint-{step}"
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    if target.exists() and not is_complete(target):  # a save of that step killed half way: the Hub's copy replaces it
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(src, target)
    except OSError:  # another node sharing this directory put it there first
        return target if is_complete(target) else None
    return target


def hub_callbacks(cfg: Config, run: RunDir, *, started_over: str = "") -> list[TrainerCallback]:
    """The callbacks train.py adds after CompleteMarker: [] unless train.hub_checkpoints is on. ``started_over``:
    see :class:`HubCheckpoints`."""
    return [HubCheckpoints(cfg, run, started_over=started_over)] if cfg.train.hub_checkpoints else []
