"""Under several ranks: a launch refused by another's lock, and a diverged run, stop every rank (no hang)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from multitune.config import config_from_dict
from multitune.rundir import RunDir
from tests.distributed.conftest import config, edit, torchrun

pytestmark = pytest.mark.slow

HOLD = "import sys; from pathlib import Path; from multitune.rundir import RunLock; RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"


def _errors(proc: subprocess.CompletedProcess, fragment: str) -> list[str]:
    # the ranks share one stderr: rank 1's line may land after rank 0's unfinished progress bar
    # wherever it lands in the line (after a bar, or another rank's text), each error runs to the end of its line
    text = (proc.stdout + proc.stderr).replace("\r", "\n")
    found = ["error:" + part.split("\n", 1)[0] for part in text.split("error:")[1:]]
    return [e for e in found if fragment in e]


def test_a_locked_run_directory_refuses_every_rank(assets, tmp_path):
    path = config(assets, tmp_path, "run")
    run = RunDir(tmp_path / "run")
    run.prepare(config_from_dict(yaml.safe_load(path.read_text())), resuming=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = torchrun(str(path), "--no-resume")
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0 and "ranks hung" not in proc.stderr
    assert len(_errors(proc, f"pid {holder.pid}")) == 2, proc.stderr[-3000:]  # rank 0 names the holder, rank 1 too
    assert not (run.root / "splits").exists()


def test_a_diverged_ddp_run_stops_every_rank_at_the_same_step(assets, tmp_path):
    path = edit(config(assets, tmp_path, "run"), learning_rate=1e30, save_steps=1)
    proc = torchrun(str(path))
    assert proc.returncode != 0 and "ranks hung" not in proc.stderr
    errors = _errors(proc, "training diverged at step")
    steps = {int(e.split("at step ")[1].split(":")[0]) for e in errors}
    assert len(errors) == 2 and len(steps) == 1, proc.stderr[-3000:]  # both ranks, the same step
    step = steps.pop()
    run = tmp_path / "run"
    assert not (run / "DONE").exists() and not (run / "final").exists()
    assert all(int(p.name.split("-")[1]) < step for p in run.glob("checkpoints/checkpoint-*"))
