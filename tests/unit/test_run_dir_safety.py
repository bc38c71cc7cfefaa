"""A launch never deletes what multitune did not write, and two launches never share a run directory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import yaml

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.rundir import RunDir, RunLock
from tests.unit.test_cli import assert_clean_error


FAKE = {"model": {"name_or_path": "m"}, "tasks": [{"name": "claims", "dataset": "d"}]}


def _cfg(root):
    return config_from_dict({"run_dir": str(root), **FAKE})


def _foreign(root):
    """A folder someone else filled, with the names multitune's run layout also uses."""
    for rel, text in {"checkpoints/checkpoint-5/model.bin": "mine", "plots/figure.png": "png", "wandb/run-1/log": "w",
                      "report.md": "# my report", "metrics.json": "{}", "config.yaml": "lr: 3\n", "notes.txt": "n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {p: p.read_text() for p in root.rglob("*") if p.is_file()}


def _files(root):
    return {p: p.read_text() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("resume,overwrite", [(True, False), (False, False), (False, True)])
def test_a_folder_that_holds_no_multitune_run_is_refused_and_left_alone(tmp_path, resume, overwrite):
    root = tmp_path / "project"
    before = _foreign(root)
    run = RunDir(root)
    with pytest.raises(UserError, match="holds no multitune run"):
        run.check(_cfg(root), resume=resume, overwrite=overwrite)
    with pytest.raises(UserError, match="holds no multitune run"):
        run.prepare(_cfg(root), resuming=False)
    assert _files(root) == before


def test_a_users_own_config_yaml_does_not_make_a_folder_a_run(tmp_path):
    # the same config the user trains with, saved in the folder by the user: not written by multitune
    root = tmp_path / "project"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(_cfg(root).model_dump(mode="json")))
    (root / "report.md").write_text("# my report")
    before = _files(root)
    with pytest.raises(UserError, match="holds no multitune run"):
        RunDir(root).check(_cfg(root), resume=False, overwrite=True)
    assert _files(root) == before


def test_a_run_multitune_wrote_starts_over_only_when_asked(tmp_path):
    root = tmp_path / "run"
    run = RunDir(root)
    run.prepare(_cfg(root), resuming=False)  # a new folder: made, and the config recorded
    (run.checkpoints / "checkpoint-2").mkdir(parents=True)
    (run.plots / "p.png").parent.mkdir()
    (run.plots / "p.png").write_text("png")
    assert run.check(_cfg(root), resume=True, overwrite=False).mode == "resume"
    assert run.check(_cfg(root), resume=False, overwrite=False).mode == "new"  # --no-resume
    run.prepare(_cfg(root), resuming=False)
    assert not run.checkpoints.exists() and not run.plots.exists() and run.config.exists()


def test_an_empty_folder_is_a_new_run(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert RunDir(root).check(_cfg(root), resume=True, overwrite=False).mode == "new"


def test_a_launch_killed_while_writing_its_first_config_leaves_a_folder_that_is_still_its_own(tmp_path):
    """kill -9 during the first config.yaml write leaves the lock and atomic_write's temporary file: the relaunch
    starts the run (it is not someone else's folder) and nothing of the temporary file stays in the way."""
    from multitune.files import temp_path

    root = tmp_path / "run"
    root.mkdir()
    (root / RunLock.FILE).write_text("")
    temp_path(root / "config.yaml").write_text("model:\n  name_or_")  # cut off mid-write
    run = RunDir(root)
    assert run.check(_cfg(root), resume=True, overwrite=False).mode == "new"
    run.prepare(_cfg(root), resuming=False)
    assert run.holds_run()


def test_train_into_a_foreign_folder_is_one_error_and_writes_nothing(tmp_path, run_cli):
    root = tmp_path / "project"
    before = _foreign(root)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(root), **FAKE}))
    for flags in ([], ["--no-resume"], ["--overwrite"]):
        assert_clean_error(run_cli("train", config, *flags), "holds no multitune run")
        assert _files(root) == before


# ---------------------------------------------------------------- one launch per run directory

HOLD = "import sys; from pathlib import Path; from multitune.rundir import RunLock; RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the run directory's lock until killed."""
    procs = []

    def start(root):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_launch_is_refused_with_the_holders_host_and_pid(tmp_path, holder):
    root = tmp_path / "run"
    proc = holder(root)
    with pytest.raises(UserError) as e:
        RunLock.acquire(root)
    assert f"pid {proc.pid}" in str(e.value) and socket.gethostname() in str(e.value)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    root = tmp_path / "run"
    proc = holder(root)
    proc.kill()  # SIGKILL: no cleanup ran
    proc.wait()
    lock = RunLock.acquire(root)
    lock.release()


def test_a_second_no_resume_launch_cannot_delete_a_live_runs_checkpoints(tmp_path, holder, run_cli):
    root = tmp_path / "run"
    RunDir(root).prepare(_cfg(root), resuming=False)
    ckpt = root / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(json.dumps({"global_step": 4}))
    before = _files(root)
    proc = holder(root)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(root), **FAKE}))
    res = run_cli("train", config, "--no-resume")
    assert_clean_error(res, f"pid {proc.pid}")
    assert {p: t for p, t in _files(root).items() if p.name != RunLock.FILE} == {
        p: t for p, t in before.items() if p.name != RunLock.FILE}
