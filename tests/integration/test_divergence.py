"""A diverged run stops with one error and keeps nothing it made: no NaN checkpoint, adapter, metrics or DONE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def _all_finite(folder: Path) -> bool:
    files = list(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return all(torch.isfinite(t).all() for f in files for t in load_file(str(f)).values())


def test_a_learning_rate_that_diverges_stops_before_saving_nan(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", learning_rate=1e30, max_steps=6, save_steps=1, save_total_limit=2,
                      logging_steps=1, eval_rows_during_training=0)
    cfg["train"]["eval_steps"] = 1000
    cfg["tasks"] = cfg["tasks"][:2]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "multitune.cli", "train", str(path)], capture_output=True, text=True, timeout=600, check=False)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    assert "training diverged at step" in errors[0] and "train.learning_rate" in errors[0]
    step = int(errors[0].split("training diverged at step ")[1].split(":")[0])
    run = tmp_path / "run"
    assert not (run / "DONE").exists() and not (run / "final").exists() and not (run / "metrics.json").exists()
    kept = sorted(run.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # every checkpoint kept is one of finite weights from before the divergence, and the newest of them survived rotation
    assert all(int(p.name.split("-")[1]) < step and _all_finite(p) for p in kept)
    if step > 1:
        assert kept and int(kept[-1].name.split("-")[1]) == step - 1
    # the relaunch (same command) resumes from the newest finite checkpoint and stops again the same way
    again = subprocess.run([sys.executable, "-m", "multitune.cli", "train", str(path)], capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 2 and "training diverged at step" in again.stderr, again.stderr[-3000:]
    assert not (run / "DONE").exists()
    state = json.loads((kept[-1] / "trainer_state.json").read_text()) if kept else {"log_history": []}
    assert all(row.get("loss") is None or row["loss"] == row["loss"] for row in state["log_history"])  # no NaN logged
