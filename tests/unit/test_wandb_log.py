"""multitune.training.wandb_log's run lifecycle against a stand-in `wandb` module: which runs start, with which ids, and
that a wandb failure is one clear error before training and a warning after it (never a crash of rank 0 alone)."""

from __future__ import annotations

import sys
import types

import pytest

from multitune.training import wandb_log
from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.rundir import RunDir, TaskRun


class FakeWandb(types.ModuleType):
    def __init__(self, fail_init=False, fail_log=False):
        super().__init__("wandb")
        self.run, self.calls, self.fail_init, self.fail_log = None, [], fail_init, fail_log

    def init(self, **kw):
        if self.fail_init:
            raise RuntimeError("api key not configured")
        self.calls.append(("init", kw["id"], kw["name"], kw["group"]))
        self.run = types.SimpleNamespace(id=kw["id"], summary={})

    def finish(self):
        self.calls.append(("finish", self.run.id if self.run else None))
        self.run = None

    def log(self, row):
        if self.fail_log:
            raise ConnectionError("wandb service is gone")
        self.calls.append(("log", sorted(row)))

    Table = Image = staticmethod(lambda *a, **kw: object())


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        module = FakeWandb(**kw)
        monkeypatch.setitem(sys.modules, "wandb", module)
        return module
    return install


def _cfg(tmp_path, strategy="per_task"):
    return config_from_dict({"model": {"name_or_path": "m"}, "strategy": strategy, "run_dir": str(tmp_path),
                             "train": {"report_to": "wandb"}, "tasks": [{"name": "claims", "dataset": "x"}, {"name": "chat", "dataset": "y"}]})


def test_per_task_models_get_their_own_runs_then_the_run_its_own_and_a_relaunch_reuses_every_id(tmp_path, fake):
    wandb, cfg, run = fake(), _cfg(tmp_path), RunDir(tmp_path)
    for task in ("claims", "chat"):
        wandb_log.start(cfg, TaskRun(tmp_path, task))
        wandb_log.start(cfg, TaskRun(tmp_path, task))  # already running: kept, not started again
    wandb_log.finish(cfg, run, {"claims": {"accuracy": 0.5}}, {}, step=0)
    ids = {f.name: f.read_text() for f in tmp_path.glob("wandb_id*")}
    assert [c[0] for c in wandb.calls] == ["init", "finish", "init", "finish", "init", "log", "finish"]
    inits = [c for c in wandb.calls if c[0] == "init"]
    assert [c[1] for c in inits] == [ids["wandb_id-claims"], ids["wandb_id-chat"], ids["wandb_id"]] and len(set(ids.values())) == 3
    assert [c[2] for c in inits] == [f"{tmp_path.name}-claims", f"{tmp_path.name}-chat", tmp_path.name]
    assert {c[3] for c in inits} == {tmp_path.name}  # one group
    relaunched = fake()
    wandb_log.start(cfg, TaskRun(tmp_path, "chat"))
    assert relaunched.calls[0][1] == ids["wandb_id-chat"]  # a resumed task continues its own wandb run


def test_wandb_that_cannot_start_is_one_clear_error_and_records_no_id(tmp_path, fake):
    fake(fail_init=True)
    with pytest.raises(UserError, match="wandb could not start .*WANDB_MODE=offline"):
        wandb_log.start(_cfg(tmp_path, "joint"), RunDir(tmp_path))
    assert not list(tmp_path.glob("wandb_id*"))


def test_a_failed_final_log_is_a_warning_and_still_closes_the_run(tmp_path, fake, capsys):
    wandb, cfg = fake(fail_log=True), _cfg(tmp_path, "joint")
    wandb_log.start(cfg, RunDir(tmp_path))
    wandb_log.log_evaluation({"claims": {"predictions": [{"text": "t", "gold": "a", "predicted": "a", "score": 1.0}]}}, 5)
    wandb_log.log_final({"claims": {"accuracy": 0.5}}, {}, 10)
    out = capsys.readouterr().out
    assert "warning: logging an evaluation's predictions to wandb failed (ConnectionError" in out
    assert "warning: logging the final results to wandb failed (ConnectionError" in out
    assert wandb.run is None and wandb.calls[-1][0] == "finish"


def test_starting_a_run_over_forgets_its_wandb_runs(tmp_path):
    cfg = _cfg(tmp_path, "joint")
    RunDir(tmp_path).prepare(cfg, resuming=False)
    for f in ("wandb_id", "wandb_id-claims"):
        (tmp_path / f).write_text("abc")
    (tmp_path / "wandb" / "offline-run-1").mkdir(parents=True)
    RunDir(tmp_path).prepare(cfg, resuming=True)
    assert (tmp_path / "wandb_id").exists()  # a resume keeps them
    RunDir(tmp_path).prepare(cfg, resuming=False)
    assert not list(tmp_path.glob("wandb*"))
