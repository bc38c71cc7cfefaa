"""Helpers for the multi-process tests: configs, launchers (torchrun, accelerate) and a shared 1-process reference."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_config

SHIM = REPO / "tests" / "distributed" / "fsdp_on_cpu.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(assets, tmp_path: Path, name: str, **train) -> Path:
    raw = tiny_config(assets, tmp_path / name, max_steps=6, save_steps=3, logging_steps=1, eval_rows_during_training=0,
                      learning_rate=2e-3, **train)
    raw["train"]["eval_steps"] = 1000
    raw["peft"] = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    raw["tasks"] = [{**t, "max_rows": 120} for t in raw["tasks"][:2]]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra,
           "-m", "multitune.cli", "train", *args]
    if not extra:
        cmd[3:3] = [f"--master_port={free_port()}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def accelerate_fsdp(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """The shipped FSDP2 accelerate config, on `nproc` CPU processes through the test-only shim."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp2-1x4.yaml"),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), str(SHIM), "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]


@pytest.fixture(scope="session")
def single_run(assets, tmp_path_factory) -> Path:
    """One process, global batch 8: what 2 ranks x 4 must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, "-m", "multitune.cli", "train", str(config(assets, tmp, "single", batch_size=8))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "single"
