"""Bad input that used to end in a traceback (issue 16, item 9): one `error:` line, exit status 2, nothing
written where it must not be, nothing half-written marked complete."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from multitune.config import config_from_dict
from multitune.errors import UserError
from tests.conftest import tiny_config


def assert_one_error_line(res, *fragments):
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("name", ["../../ESCAPED", "a/b", "..", ".", ".hidden", "..hidden", "a..b", "with space", "", "x" * 65,
                                  "tab\tname", "a\\b", "sst2/../../x"])
def test_a_task_name_that_could_leave_the_run_directory_is_refused(name):
    with pytest.raises(UserError, match=r"tasks\.0\.name"):
        config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": name, "type": "chat", "dataset": "d.jsonl"}]})


@pytest.mark.parametrize("name", ["claims", "banking77", "my_task-2", "A1", "sst2.v1", "v1.2.3", "sst2."])
def test_ordinary_task_names_are_accepted(name):
    cfg = config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": name, "type": "chat", "dataset": "d.jsonl"}]})
    assert cfg.tasks[0].name == name


def test_a_run_recorded_with_a_dotted_task_name_still_loads_and_keeps_its_files_inside_run_dir(tmp_path):
    """Earlier versions took any name: a run whose task is `sst2.v1` must still resume, evaluate and push."""
    from types import SimpleNamespace

    from multitune.data.load import save_splits
    from multitune.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    raw = {"model": {"name_or_path": "m"}, "tasks": [{"name": "sst2.v1", "type": "chat", "dataset": "d.jsonl"}]}
    run.config.write_text(yaml.safe_dump(raw))
    cfg = run.load_config()
    assert cfg.tasks[0].name == "sst2.v1"
    save_splits([SimpleNamespace(task=SimpleNamespace(name="sst2.v1"), split={"train": [0], "val": [1]})], run.splits)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(p.relative_to(run.root).as_posix() for p in written) == ["config.yaml", "splits/sst2.v1.json"]


def test_a_dotted_task_name_is_addressed_by_name_in_overrides(tmp_path):
    from multitune.config import load_config

    raw = {"model": {"name_or_path": "m"}, "tasks": [{"name": "sst2", "type": "chat", "dataset": "a.jsonl"},
                                                     {"name": "sst2.v1", "type": "chat", "dataset": "b.jsonl"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml", ["tasks.sst2.v1.max_rows=3", "tasks.sst2.max_rows=5"])
    assert [(t.name, t.max_rows) for t in cfg.tasks] == [("sst2", 5), ("sst2.v1", 3)]


def test_train_with_an_escaping_task_name_writes_nothing_outside_run_dir(run_cli, tmp_path, assets):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    raw = {"run_dir": str(work / "run"), "model": {"name_or_path": str(assets["model"])},
           "tasks": [{"name": "../../ESCAPED", "type": "classification", "dataset": str(assets["claims"])}]}
    (work / "c.yaml").write_text(yaml.safe_dump(raw))
    assert_one_error_line(run_cli("train", work / "c.yaml"), "tasks.0.name")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "c.yaml"]


def test_a_csv_that_is_not_utf8_is_one_error_line(run_cli, tmp_path, assets):
    rows = ["text,label"] + [f"message number {i} about a claim,Claim" for i in range(6)] + ["Caf\xe9 au lait spilled on my laptop,Claim"]
    (tmp_path / "latin1.csv").write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    raw = {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(assets["model"])},
           "tasks": [{"name": "claims", "dataset": str(tmp_path / "latin1.csv")}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    line = assert_one_error_line(run_cli("train", tmp_path / "c.yaml"), "latin1.csv", "UTF-8")
    assert len(line) < 400
    assert not (tmp_path / "run").exists()


def _six_steps_one_task(assets, tmp_path) -> None:
    """tmp_path/c.yaml: one task, 6 steps, a checkpoint every 2, run_dir tmp_path/run."""
    raw = tiny_config(assets, tmp_path / "run", max_steps=6, save_steps=2, eval_rows_during_training=0, save_minutes=None)
    raw["tasks"] = raw["tasks"][:1]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))


def test_a_full_disk_during_a_checkpoint_save_is_one_error_line_and_nothing_is_marked_complete(run_cli, monkeypatch, tmp_path, assets):
    """The second checkpoint's optimizer file runs out of space half-way: one line naming the folder, the space
    free there and the space a checkpoint needs (the size of the last complete one); checkpoint-4 is not
    COMPLETE, so a relaunch resumes from checkpoint-2; no DONE."""
    import torch

    from multitune.training.checkpoints import MARKER, latest_complete

    _six_steps_one_task(assets, tmp_path)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            Path(f).write_bytes(b"half an optimizer")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    Usage = namedtuple("Usage", "total used free")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1_234_567, 1_234_567)
                        if str(p).startswith(str(tmp_path)) else real_usage(p))
    res = run_cli("train", tmp_path / "c.yaml")
    ckpts = tmp_path / "run" / "checkpoints"
    needed = sum(p.stat().st_size for p in (ckpts / "checkpoint-2").rglob("*") if p.is_file())
    assert_one_error_line(res, "No space left", str(ckpts / "checkpoint-4"), "1.2 MB free", f"{needed / 1e6:.1f} MB")
    assert not (ckpts / "checkpoint-4" / MARKER).exists() and latest_complete(ckpts) == ckpts / "checkpoint-2"
    assert not (tmp_path / "run" / "DONE").exists()


def _errno_lost(path: str):
    """What torch.save raises when the OS refuses a write: its C++ writer drops the errno ('basic_ios::clear', then
    'unexpected pos' when the archive is closed); /dev/full refuses every write with a real ENOSPC."""
    import torch

    try:
        torch.save({"exp_avg": torch.zeros(100_000)}, path)
    except RuntimeError as e:
        return e
    raise AssertionError(f"torch.save to {path} did not fail")


def _free(monkeypatch, under: Path, free: int) -> None:
    Usage = namedtuple("Usage", "total used free")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - free, free)
                        if str(p).startswith(str(under)) else real_usage(p))


def test_torch_losing_the_errno_on_a_nearly_full_disk_is_a_full_disk(monkeypatch, tmp_path):
    from multitune.files import write_error, write_failed

    err = _errno_lost("/dev/full")
    assert "unexpected pos" in str(err) and write_failed(err)
    _free(monkeypatch, tmp_path, 300_000)
    assert str(write_error(err, tmp_path, needed=5_000_000)).startswith(f"No space left on device while writing {tmp_path}: 0.3 MB free")


def test_torch_losing_the_errno_with_space_free_is_not_called_a_full_disk(monkeypatch, tmp_path):
    """Space left where it was writing (under the reviewer's 50 GB): torch's lost errno could be a file-size or quota
    limit or an I/O error as well, so the line names all three and where to look."""
    from multitune.files import write_error

    _free(monkeypatch, tmp_path, 50 * 10**9)
    line = str(write_error(_errno_lost("/dev/full"), tmp_path, needed=5_000_000))
    assert "No space left" not in line and f"writing {tmp_path} failed" in line
    assert "df -h" in line and "ulimit -f" in line


EFBIG = """
import resource, signal, sys
from pathlib import Path
import torch
from multitune.files import write_error, write_failed
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then fails the write with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    torch.save({"exp_avg": torch.zeros(100_000)}, sys.argv[1] + "/optimizer.pt")
except RuntimeError as e:
    print(write_failed(e), write_error(e, Path(sys.argv[1])))
"""


def test_a_file_size_limit_is_not_reported_as_a_full_disk(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE, `ulimit -f`) gives torch's very chain of a full disk; with the disk not full
    the line must not say it is."""
    import os
    import subprocess
    import sys

    assert shutil.disk_usage(tmp_path).free > 10**9  # the premise: this disk is not full
    res = subprocess.run([sys.executable, "-c", EFBIG, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
    assert res.stdout.startswith("True writing"), res.stdout + res.stderr[-2000:]
    assert "No space left" not in res.stdout and "ulimit -f" in res.stdout


def test_a_full_disk_with_errno_is_a_full_disk_whatever_the_free_space(monkeypatch, tmp_path):
    from multitune.files import disk_full, write_error

    _free(monkeypatch, tmp_path, 50 * 10**9)  # freed since: the errno still says what happened
    with open("/dev/full", "wb", buffering=0) as f, pytest.raises(OSError) as e:
        f.write(b"an optimizer")
    assert disk_full(e.value)
    assert str(write_error(e.value, tmp_path)).startswith("No space left on device")
    assert not disk_full(RuntimeError("[enforce fail at inline_container.cc:319] . file not found: archive/data.pkl"))
    assert not disk_full(_errno_lost("/dev/full"))  # errno lost: not known to be a full disk without the free space


@pytest.mark.parametrize("free,fragments", [
    (1_234_567, ["No space left", "1.2 MB free"]),
    (50 * 10**9, ["torch lost the OS error", "df -h", "ulimit -f"]),
])
def test_torchs_errno_less_save_failure_in_training_is_one_error_line(run_cli, monkeypatch, tmp_path, assets, free, fragments):
    """checkpoint-4's optimizer.pt written to /dev/full (torch's real chain): one line naming checkpoint-4, a full
    disk only when little is free there, exit 2; checkpoint-2 stays the newest complete one."""
    import torch

    from multitune.training.checkpoints import latest_complete

    _six_steps_one_task(assets, tmp_path)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            Path(f).write_bytes(b"half an optimizer")
            return real_save(obj, "/dev/full", *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    _free(monkeypatch, tmp_path, free)
    res = run_cli("train", tmp_path / "c.yaml")
    ckpts = tmp_path / "run" / "checkpoints"
    line = assert_one_error_line(res, str(ckpts / "checkpoint-4"), *fragments)
    assert ("No space left" in line) == (free < 10**9)
    assert latest_complete(ckpts) == ckpts / "checkpoint-2" and not (tmp_path / "run" / "DONE").exists()
