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


@pytest.mark.parametrize("name", ["../../ESCAPED", "a/b", "..", ".hidden", "with space", "", "x" * 65, "tab\tname"])
def test_a_task_name_that_could_leave_the_run_directory_is_refused(name):
    with pytest.raises(UserError, match=r"tasks\.0\.name"):
        config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": name, "type": "chat", "dataset": "d.jsonl"}]})


@pytest.mark.parametrize("name", ["claims", "banking77", "my_task-2", "A1"])
def test_ordinary_task_names_are_accepted(name):
    cfg = config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": name, "type": "chat", "dataset": "d.jsonl"}]})
    assert cfg.tasks[0].name == name


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


def test_a_full_disk_during_a_checkpoint_save_is_one_error_line_and_nothing_is_marked_complete(run_cli, monkeypatch, tmp_path, assets):
    """The second checkpoint's optimizer file runs out of space half-way: one line naming the folder, the space
    free there and the space a checkpoint needs (the size of the last complete one); checkpoint-4 is not
    COMPLETE, so a relaunch resumes from checkpoint-2; no DONE."""
    import torch

    from multitune.training.checkpoints import MARKER, latest_complete

    raw = tiny_config(assets, tmp_path / "run", max_steps=6, save_steps=2, eval_rows_during_training=0, save_minutes=None)
    raw["tasks"] = raw["tasks"][:1]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
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


def test_torch_save_cut_short_by_a_real_full_disk_counts_as_a_full_disk():
    """What torch.save raised when a checkpoint's optimizer.pt met a full tmpfs (scripts/fault_injection.py --matrix
    --only disk-full): its C++ writer loses the errno, first in a write, then again when closing the archive."""
    from multitune.rundir import disk_full

    def save():
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 172544 vs 172432")

    with pytest.raises(RuntimeError) as e:
        save()
    assert disk_full(e.value)
    assert not disk_full(RuntimeError("[enforce fail at inline_container.cc:319] . file not found: archive/data.pkl"))
