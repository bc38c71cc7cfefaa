"""`strategy: per_task`: what the config refuses, the run layout, and the commands that need one model."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitune.cli import export, push
from multitune.config import config_from_dict, dump_config
from multitune.errors import UserError
from multitune.rundir import RunDir, TaskRun, part_of, parts
from tests.conftest import tiny_config


def _cfg(assets, run_dir: Path, **extra):
    raw = tiny_config(assets, run_dir) | {"strategy": "per_task"} | extra
    raw["peft"] = raw["peft"] | {"method": "lora"}
    return raw


@pytest.mark.parametrize("extra, fragment", [
    ({"peft": {"method": "full"}}, "peft.method=full would train a whole model per task"),
    ({"hub": {"push": True, "repo_id": "me/x"}}, "strategy: per_task cannot use hub.push"),
])
def test_config_refuses_what_per_task_cannot_do(assets, tmp_path, extra, fragment):
    raw = tiny_config(assets, tmp_path) | {"strategy": "per_task"}
    raw["peft"]["method"] = "lora"
    for key, value in extra.items():
        raw[key] = raw.get(key, {}) | value
    with pytest.raises(UserError, match=fragment):
        config_from_dict(raw)


def test_each_task_has_its_own_checkpoints_and_final_folder(assets, tmp_path):
    cfg = config_from_dict(_cfg(assets, tmp_path / "run"))
    run = RunDir(tmp_path / "run")
    got = parts(cfg, run)
    assert [p.task for p in got] == ["claims", "banking77", "commonsense_qa", "chat"]
    assert got[1].final == tmp_path / "run" / "final" / "banking77" == got[1].logs
    assert got[1].checkpoints == tmp_path / "run" / "checkpoints" / "banking77"
    assert got[1].config == run.config and got[1].splits == run.splits and got[1].done == run.done  # shared
    assert part_of(cfg, run, "chat") == TaskRun(run.root, "chat")
    joint = config_from_dict(_cfg(assets, tmp_path / "run") | {"strategy": "joint"})
    assert parts(joint, run) == [run] and part_of(joint, run, "chat").final == run.final and run.logs == run.root


@pytest.mark.parametrize("command", ["push", "export"])
def test_push_and_export_refuse_a_run_of_several_adapters(assets, tmp_path, command):
    run = tmp_path / "run"
    cfg = config_from_dict(_cfg(assets, run))
    for task in cfg.tasks:  # a finished run: every task's adapter is there
        (run / "final" / task.name).mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "DONE").write_text("finished\n")
    with pytest.raises(UserError, match=f"`multitune {command}` handles a run with one language-model adapter"):
        if command == "push":
            push(run, repo_id="me/x", private=None, merged=False, dry_run=tmp_path / "out")
        else:
            export(run, tmp_path / "out", merged=False)
    assert not (tmp_path / "out").exists()


def test_a_per_task_run_missing_one_adapter_is_unfinished(assets, tmp_path):
    """eval/predict/chat on a run killed between two tasks: one error line, not a PEFT traceback."""
    from multitune.rundir import RunDir

    run = tmp_path / "run"
    cfg = config_from_dict(_cfg(assets, run))
    (run / "final" / cfg.tasks[0].name).mkdir(parents=True)  # the first task finished, the others did not
    (run / "config.yaml").write_text(dump_config(cfg))
    with pytest.raises(UserError, match=f"no trained weights yet .*final/{cfg.tasks[1].name} is missing"):
        RunDir(run).require_finished()
    for task in cfg.tasks[1:]:
        (run / "final" / task.name).mkdir()
    RunDir(run).require_finished()
