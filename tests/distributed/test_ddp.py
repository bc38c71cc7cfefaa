"""DDP on CPU (gloo), launched with torchrun in subprocesses, asserting what really ran.

accelerate's MULTI_CPU config starts one process, so these tests use torchrun, which Trainer picks up
directly. FSDP2 is in test_fsdp.py; the shared runs (single_run, ddp_run) are in conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitune.training.checkpoints import is_complete
from tests.distributed.conftest import HERE, config, finish, free_port, launch, losses, torchrun

pytestmark = pytest.mark.slow


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(ddp_run, single_run):
    facts = json.loads((ddp_run / "launch.json").read_text())
    assert facts["distributed_type"] == "MULTI_CPU" and facts["world_size"] == 2
    assert facts["wrapped_model"] == "DistributedDataParallel"
    # a LoRA model is a PeftModel, for which Trainer would ask DDP to search for unused parameters every step
    assert facts["find_unused_parameters"] is False
    assert json.loads((single_run / "launch.json").read_text())["world_size"] == 1
    # same examples per optimizer step (2 x 4 = 8): the same losses, up to float summation order
    assert losses(ddp_run) == pytest.approx(losses(single_run), rel=1e-4)
    a = load_file(str(single_run / "final" / "adapter_model.safetensors"))
    b = load_file(str(ddp_run / "final" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert torch.cat([v.flatten() for v in a.values()]).abs().sum() > 0


def test_timed_checkpoint_is_taken_by_both_ranks_at_the_same_step(ddp_run):
    # rank 1 alone found a checkpoint due at step 1 (its clock skewed); the ranks agreed, and both saved
    first = ddp_run / "checkpoints" / "checkpoint-1"
    assert (first / "rng_state_0.pth").exists() and (first / "rng_state_1.pth").exists() and is_complete(first)
    for ckpt in (ddp_run / "checkpoints").glob("checkpoint-*"):
        assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}, ckpt


def _two_nodes(cfg_by_node: list[Path]) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank, cfg in enumerate(cfg_by_node):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "multitune.cli", "train", str(cfg)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def test_simulated_two_nodes_with_local_checkpoint_dirs(assets, tmp_path):
    # each "node" writes to its own run dir: no shared filesystem; each keeps a full copy
    cfgs = [config(assets, tmp_path, f"node{r}", save_on_each_node=True) for r in (0, 1)]
    results = finish(_two_nodes(cfgs))
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    facts = json.loads((tmp_path / "node0" / "launch.json").read_text())
    assert facts["world_size"] == 2 and facts["wrapped_model"] == "DistributedDataParallel"
    for r in (0, 1):
        ckpt = tmp_path / f"node{r}" / "checkpoints" / "checkpoint-6"
        assert is_complete(ckpt) and (ckpt / "adapter_model.safetensors").exists(), r
        assert (tmp_path / f"node{r}" / "DONE").exists()
    # the pod start script reruns the same command on both nodes: finished, nothing to do, status 0
    again = finish(_two_nodes(cfgs))
    assert all(code == 0 for code, _ in again), again[0][1][-3000:] + again[1][1][-3000:]
    assert all("holds a finished run with this config" in out for _, out in again)


def test_node_without_a_copy_refuses_to_resume(assets, tmp_path):
    # only node 0 saved; node 1 has nothing local: relaunching must stop with a clear message, not hang
    cfgs = [config(assets, tmp_path, f"node{r}") for r in (0, 1)]
    finish(_two_nodes(cfgs))
    (tmp_path / "node0" / "DONE").unlink()  # pretend the job died before finishing
    results = finish(_two_nodes(cfgs))
    assert all(code != 0 for code, _ in results)
    out = results[0][1] + results[1][1]
    assert "ranks disagree on the checkpoint to resume from" in out and "save_on_each_node" in out


def test_a_signal_on_one_rank_after_the_last_step_stops_both_after_the_final_save(assets, tmp_path):
    """Rank 1 alone gets SIGTERM once training is over: both ranks must still save the final adapter (its
    collectives), then stop together at the next stage boundary; the relaunch reloads it and finishes."""
    cfg = config(assets, tmp_path, "late")
    shim = HERE / "late_signal.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(shim), "train", str(cfg)]
    first = launch(cmd, {"MULTITUNE_TEST_LATE_SIGNAL": "1"})
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    assert "stopped on a signal before evaluating" in out
    run = tmp_path / "late"
    assert (run / "final" / "adapter_model.safetensors").exists() and (run / "cost.json").exists()
    assert not (run / "DONE").exists() and not (run / "metrics.json").exists()
    again = torchrun(str(cfg))
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "trained by an earlier launch" in again.stdout and (run / "DONE").exists()
