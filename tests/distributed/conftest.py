"""Helpers for the multi-process tests: configs, launchers (torchrun, accelerate) and shared runs.

The shared runs (1 process, 2-process DDP, 2-process FSDP2) are made once per session. The 2-process
ones start rank 1's checkpoint timer two minutes early (tests/distributed/clock_skew.py) with
`save_minutes: 1`, so rank 1 alone finds a timed checkpoint due at step 1: the ranks must agree on it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_config

HERE = REPO / "tests" / "distributed"
SHIM = HERE / "fsdp_on_cpu.py"
SKEW = HERE / "clock_skew.py"
SKEWED = {"MULTITUNE_TEST_CLOCK_SKEW": "1:120"}  # rank 1's timer started 2 minutes before rank 0's
TIMEOUT = 480  # a hang (ranks waiting in different collectives) fails the test instead of blocking the suite


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


def edit(path: Path, **train) -> Path:
    raw = yaml.safe_load(path.read_text())
    raw["train"].update(train)
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(cmd: list[str], env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run a launcher and its ranks in their own process group; on a timeout (a hang) kill them all."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[killed after {timeout} s: the ranks hung]"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "multitune.cli", "train", *args], env)


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    port = () if extra else (f"--master_port={free_port()}",)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *port, *extra, str(SKEW), "train", *args]
    return launch(cmd, env)


def accelerate_fsdp(*args: str, nproc: int = 2, machine: tuple[int, int, int] | None = None,
                    env: dict | None = None) -> subprocess.CompletedProcess | subprocess.Popen:
    """The shipped FSDP2 accelerate config, on `nproc` CPU processes through the test-only shim.

    With ``machine=(rank, machines, port)`` this launches one node of a multi-node job and returns
    the running process (the nodes must run at the same time).
    """
    nodes = ["--num_machines", str(machine[1]), "--machine_rank", str(machine[0]), "--main_process_ip", "127.0.0.1"] if machine else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp2-1x4.yaml"),
           "--num_processes", str(nproc), *nodes, "--main_process_port", str(machine[2] if machine else free_port()),
           str(SHIM), "train", *args]
    if machine:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, **(env or {})})
    return launch(cmd, env)


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Wait for the nodes of a multi-node job; kill them all if they hang."""
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            text, _ = p.communicate()
            text += f"\n[killed after {timeout} s: the ranks hung]"
        out.append((p.returncode, text))
    return out


def losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def cut_to(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of a finished run as if it had been killed right after checkpoint ``step``."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / "checkpoints").glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    for name in ("final", "DONE", "metrics.json", "report.md", "trainer_state.json", "launch.json"):
        path = dest / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return dest


def copy_config(config_path: Path, run_dir: Path, dest: Path, **train) -> Path:
    raw = yaml.safe_load(config_path.read_text())
    raw["run_dir"] = str(run_dir)
    raw["train"].update(train)
    dest.write_text(yaml.safe_dump(raw))
    return dest


@pytest.fixture(scope="session")
def single_run(assets, tmp_path_factory) -> Path:
    """One process, global batch 8: what 2 ranks x 4 must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    proc = cli(str(config(assets, tmp, "single", batch_size=8)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "single"


def _skewed_config(assets, tmp: Path, name: str, **train) -> Path:
    return config(assets, tmp, name, batch_size=4, save_minutes=1, save_total_limit=10, **train)


@pytest.fixture(scope="session")
def ddp_run(assets, tmp_path_factory) -> Path:
    """2-process DDP (torchrun), batch 4 per rank, rank 1's checkpoint timer skewed."""
    tmp = tmp_path_factory.mktemp("ddp")
    proc = torchrun(str(_skewed_config(assets, tmp, "ddp")), env=SKEWED)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp / "ddp"


@pytest.fixture(scope="session")
def fsdp_run(assets, tmp_path_factory) -> Path:
    """2-process FSDP2 (the shipped accelerate config), transformers' activation checkpointing, as the Llama
    configs train; rank 1's checkpoint timer skewed; every tensor gathered during saves is logged."""
    tmp = tmp_path_factory.mktemp("fsdp")
    env = {**SKEWED, "MULTITUNE_TEST_GATHER_LOG": str(tmp / "gathered")}
    proc = accelerate_fsdp(str(_skewed_config(assets, tmp, "fsdp", gradient_checkpointing=True)), env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp / "fsdp"
