"""The benchmark suite's pieces run end to end on the tiny assets (a few steps; no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.slow


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_training_sides_report_comparable_numbers(assets, tmp_path):
    raw = tiny_config(assets, tmp_path / "run", logging_steps=1, eval_rows_during_training=4, save_steps=1000)
    raw["tasks"] = raw["tasks"][:3]
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(raw))
    sides = {}
    for side in ("baseline", "padded"):
        out = tmp_path / f"{side}.json"
        _run("benchmarks.train_speed", "--side", side, "--config", str(config), "--steps", "3", "--out", str(out))
        sides[side] = json.loads(out.read_text())
    base, ours = sides["baseline"], sides["padded"]
    for r in (base, ours):
        assert r["steps"] == 3 and r["tokens"] > 0 and r["train_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["val_answer_loss"] < 20
    # the same seed and batch size over the same train split: the same examples, so the same non-pad tokens
    assert base["tokens"] == ours["tokens"]
    assert ours["eval_s"] > 0  # multitune's end-of-training validation pass is not counted as training time


def test_data_prep_is_cold_then_cached(assets, tmp_path):
    raw = tiny_config(assets, tmp_path / "run")
    config = tmp_path / "prep.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {"MULTITUNE_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    runs = [json.loads(_run("benchmarks.data_prep", str(config), env=env).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert [r["cached"] for r in runs] == [False, True]
    assert runs[0]["tasks"] == runs[1]["tasks"] and runs[0]["train_rows"] == runs[1]["train_rows"] > 0


def test_gpu_mode_runs_its_code_path_on_a_tiny_shape(assets, tmp_path):
    # the 8B-shaped GPU benchmark, scaled down to run here: random weights, LoRA bf16 and QLoRA, packed rows
    raw = tiny_config(assets, tmp_path / "run")
    raw["tasks"] = raw["tasks"][:3]
    config = tmp_path / "tasks.yaml"
    config.write_text(yaml.safe_dump(raw))
    work = tmp_path / "gpu"
    _run("benchmarks.gpu", "--shape", "tiny", "--steps", "2", "--seq-len", "256", "--batch-size", "2",
         "--workdir", str(work), "--config", str(config))
    rows = json.loads((work / "gpu-results.json").read_text())["rows"]
    assert [r["side"] for r in rows] == ["baseline", "lora-bf16", "qlora"]
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 2 and r["adapter_params"] > 0 for r in rows)
    # the same LoRA for all three: TRL's peft_config, multitune on the bf16 base and on the 4-bit base
    assert rows[0]["adapter_params"] == rows[1]["adapter_params"] == rows[2]["adapter_params"]
    assert all(r["mfu"] is None for r in rows)  # no peak FLOPs for a CPU
