"""DDP on CPU (gloo), launched with torchrun in subprocesses, asserting what really ran.

accelerate's MULTI_CPU config starts one process, so these tests use torchrun, which Trainer picks up
directly. FSDP2 is in test_fsdp.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.conftest import config, free_port, losses, torchrun

pytestmark = pytest.mark.slow


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(assets, tmp_path, single_run):
    ddp = torchrun(str(config(assets, tmp_path, "ddp", batch_size=4)))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    facts = json.loads((tmp_path / "ddp" / "launch.json").read_text())
    assert facts["distributed_type"] == "MULTI_CPU" and facts["world_size"] == 2
    assert facts["wrapped_model"] == "DistributedDataParallel"
    assert json.loads((single_run / "launch.json").read_text())["world_size"] == 1
    # same examples per optimizer step (2 x 4 = 8): the same losses, up to float summation order
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single_run), rel=1e-4)
    a = load_file(str(single_run / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert torch.cat([v.flatten() for v in a.values()]).abs().sum() > 0


def _two_nodes(cfg_by_node: list[Path]) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank, cfg in enumerate(cfg_by_node):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "multitune.cli", "train", str(cfg)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


def test_simulated_two_nodes_with_local_checkpoint_dirs(assets, tmp_path):
    # each "node" writes to its own run dir: no shared filesystem; each keeps a full copy
    cfgs = [config(assets, tmp_path, f"node{r}", save_on_each_node=True) for r in (0, 1)]
    results = _finish(_two_nodes(cfgs))
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    facts = json.loads((tmp_path / "node0" / "launch.json").read_text())
    assert facts["world_size"] == 2 and facts["wrapped_model"] == "DistributedDataParallel"
    for r in (0, 1):
        ckpt = tmp_path / f"node{r}" / "checkpoints" / "checkpoint-6"
        assert (ckpt / "COMPLETE").exists() and (ckpt / "adapter_model.safetensors").exists(), r
        assert (tmp_path / f"node{r}" / "DONE").exists()


def test_node_without_a_copy_refuses_to_resume(assets, tmp_path):
    # only node 0 saved; node 1 has nothing local: relaunching must stop with a clear message, not hang
    cfgs = [config(assets, tmp_path, f"node{r}") for r in (0, 1)]
    _finish(_two_nodes(cfgs))
    (tmp_path / "node0" / "DONE").unlink()  # pretend the job died before finishing
    results = _finish(_two_nodes(cfgs))
    assert all(code != 0 for code, _ in results)
    out = results[0][1] + results[1][1]
    assert "ranks disagree on the checkpoint to resume from" in out and "save_on_each_node" in out
