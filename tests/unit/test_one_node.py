"""One node must not hang the others (issue 16, item 10).

A check that fails on one node only (a package, a GPU, a token it lacks), or a signal that reaches one node
only, must reach every rank through one agreement that every rank enters. In one process the agreement
helpers are no-ops, so these tests put a fake second rank behind them (multitune.distributed.all_gather,
max_over_ranks) and record what this rank brings to the agreement. tests/distributed/ runs real ranks.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from multitune import distributed
from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.training import checkpoints


@pytest.fixture
def world(monkeypatch):
    """A second rank behind the collectives: ``world.other`` is its outcome (None: it found nothing wrong)
    and ``world.signal`` its signal number (0: none); ``world.gathered`` is what this rank brought."""
    w = SimpleNamespace(other=None, signal=0, gathered=[])

    def all_gather(obj):
        w.gathered.append(obj)
        return [obj, w.other]

    def max_over_ranks(value):
        return max(value, w.signal)

    monkeypatch.setattr(distributed, "all_gather", all_gather)
    monkeypatch.setattr(distributed, "max_over_ranks", max_over_ranks)
    monkeypatch.setattr(checkpoints, "max_over_ranks", max_over_ranks)
    monkeypatch.setattr(checkpoints, "any_rank", lambda flag: bool(max_over_ranks(int(flag))))
    return w


def _cfg(tmp_path, **update):
    d = {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": "m"}, "peft": {"method": "lora"},
         "tasks": [{"name": "claims", "dataset": "d"}]}
    for key, value in update.items():
        d[key] = {**d.get(key, {}), **value}
    return config_from_dict(d)


# ---------------------------------------------------------------- uploads never stop training


def test_a_failure_while_staging_an_upload_is_a_warning(tmp_path, monkeypatch, capsys):
    from multitune.rundir import RunDir
    from multitune.training import hub_checkpoints

    run = RunDir(tmp_path / "myrun")
    cfg = _cfg(tmp_path, train={"hub_checkpoints": True}, hub={"repo_id": "me/tuned"})
    monkeypatch.setattr(hub_checkpoints, "is_complete", lambda folder: True)

    def full_disk(folder, staging):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub_checkpoints, "_stage", full_disk)
    cb = hub_checkpoints.HubCheckpoints(cfg, run)
    control = SimpleNamespace()
    assert cb.on_save(SimpleNamespace(output_dir=str(run.checkpoints)), SimpleNamespace(global_step=4, is_world_process_zero=True),
                      control) is control
    out = capsys.readouterr().out
    assert "warning:" in out and "checkpoint-4" in out and "No space left on device" in out


# ---------------------------------------------------------------- files a crash must not leave half written


def _crash_mid_write(monkeypatch):
    """Path.write_text that dies half way through (the process killed while writing)."""
    real = Path.write_text

    def half(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half)


def test_a_split_is_never_left_half_written(tmp_path, monkeypatch):
    """A relaunch keeps a split file that exists: a truncated one would break every later resume."""
    from multitune.data.load import save_splits

    td = SimpleNamespace(task=SimpleNamespace(name="claims"), split={"train": list(range(50)), "validation": [50, 51]})
    _crash_mid_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_splits([td], tmp_path / "splits")
    monkeypatch.undo()
    assert not (tmp_path / "splits" / "claims.json").exists()
    save_splits([td], tmp_path / "splits")  # the relaunch
    assert json.loads((tmp_path / "splits" / "claims.json").read_text()) == td.split


def test_metrics_are_never_left_half_written(tmp_path, monkeypatch):
    from multitune.results import report

    old = {"claims": {"accuracy": 0.5}}
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    monkeypatch.setattr(report, "write_plots", lambda *a: {})
    _crash_mid_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        report.write_results(tmp_path, {"claims": {"kind": "classification", "accuracy": 0.9, "per_class": {}}}, "run")
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == old
