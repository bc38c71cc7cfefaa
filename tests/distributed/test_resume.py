"""Resuming where the job left off, on another number of processes, on one node alone, or after the end.

A reclaimed pod often comes back with fewer GPUs: an adapter run checkpointed by 2 processes resumes on
1, and one checkpointed by 1 on 2, with the same global batch (grad_accum adjusted automatically, or
batch_size set by the user), under DDP and under FSDP2; each ends where the uninterrupted 1-process run
ends. Every refusal is one clear line on every rank, nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from multitune.training.checkpoints import is_complete
from tests.distributed.conftest import accelerate_fsdp, cli, config, copy_config, cut_to, finish, free_port, losses, torchrun

pytestmark = pytest.mark.slow


def assert_ends_like(run: Path, reference: Path) -> None:
    """The resumed run's whole loss history and final adapter are the uninterrupted run's (float order aside)."""
    assert losses(run) == pytest.approx(losses(reference), rel=1e-4)
    a = load_file(str(reference / "final" / "adapter_model.safetensors"))
    b = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_ddp_checkpoint_resumes_on_one_process_with_grad_accum_adjusted(ddp_run, single_run, tmp_path):
    run = cut_to(ddp_run, tmp_path / "run", 3)
    proc = cli(str(copy_config(ddp_run.parent / "ddp.yaml", run, tmp_path / "run.yaml")))  # the same command
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "train.grad_accum becomes 2 (automatically)" in proc.stdout and "checkpoint-3" in proc.stdout
    facts = json.loads((run / "launch.json").read_text())
    assert facts["world_size"] == 1 and facts["gradient_accumulation_steps"] == 2
    assert_ends_like(run, single_run)


def test_one_process_checkpoint_resumes_on_two_ddp_processes(single_run, tmp_path):
    run = cut_to(single_run, tmp_path / "run", 3)
    newer = run / "checkpoints" / "checkpoint-5"  # killed while saving: skipped, and said once on this node
    newer.mkdir()
    (newer / "trainer_state.json").write_text("{}")
    # the user halves batch_size for 2 processes: the global batch stays 8
    proc = torchrun(str(copy_config(single_run.parent / "single.yaml", run, tmp_path / "run.yaml", batch_size=4)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("skipping incomplete or corrupt checkpoint") == 1
    assert json.loads((run / "launch.json").read_text())["world_size"] == 2
    assert_ends_like(run, single_run)


def test_resume_that_would_change_the_global_batch_is_refused_on_every_rank(single_run, tmp_path):
    run = cut_to(single_run, tmp_path / "run", 3)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = torchrun(str(copy_config(single_run.parent / "single.yaml", run, tmp_path / "run.yaml")))  # 2 x 8 = 16
    assert proc.returncode != 0
    line = "error: the checkpoint was trained with a global batch of 8 examples per step"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]  # each rank says why, none waits for the other
    assert "train.batch_size=4 train.grad_accum=1" in proc.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_fsdp_checkpoint_resumes_on_one_process(fsdp_run, single_run, tmp_path):
    run = cut_to(fsdp_run, tmp_path / "run", 3)
    proc = cli(str(copy_config(fsdp_run.parent / "fsdp.yaml", run, tmp_path / "run.yaml")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "train.grad_accum becomes 2 (automatically)" in proc.stdout
    assert json.loads((run / "launch.json").read_text())["is_fsdp"] is False
    assert_ends_like(run, single_run)


def test_one_process_checkpoint_resumes_under_fsdp(single_run, tmp_path):
    run = cut_to(single_run, tmp_path / "run", 3)
    proc = accelerate_fsdp(str(copy_config(single_run.parent / "single.yaml", run, tmp_path / "run.yaml", batch_size=4)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    facts = json.loads((run / "launch.json").read_text())
    assert facts["is_fsdp"] and facts["world_size"] == 2
    assert_ends_like(run, single_run)


def test_fsdp_with_save_on_each_node_gives_every_node_a_checkpoint_it_resumes_alone(assets, single_run, tmp_path):
    # two nodes of one process each, each with its own run dir: no shared storage
    cfgs = [config(assets, tmp_path, f"node{r}", batch_size=4, save_on_each_node=True) for r in (0, 1)]
    port = free_port()
    results = finish([accelerate_fsdp(str(c), machine=(r, 2, port)) for r, c in enumerate(cfgs)])
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    assert json.loads((tmp_path / "node0" / "launch.json").read_text())["distributed_type"] == "FSDP"
    for step in (3, 6):
        copies = [tmp_path / f"node{r}" / "checkpoints" / f"checkpoint-{step}" for r in (0, 1)]
        assert all(is_complete(c) for c in copies)
        a, b = (load_file(str(c / "adapter_model.safetensors")) for c in copies)
        # exact: both nodes save the same gathered tensors (copies of one computation, not two computations)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # node 0 is lost; node 1 resumes from its own copy, on one process
    run = cut_to(tmp_path / "node1", tmp_path / "alone", 3)
    proc = cli(str(copy_config(cfgs[1], run, tmp_path / "alone.yaml")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert_ends_like(run, single_run)


def test_a_run_killed_after_its_last_checkpoint_ends_without_another_step(single_run, tmp_path):
    # killed while saving the final adapter or evaluating: the relaunch has nothing left to train
    run = cut_to(single_run, tmp_path / "run", 6)
    proc = cli(str(copy_config(single_run.parent / "single.yaml", run, tmp_path / "run.yaml")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (run / "DONE").exists()
    assert_ends_like(run, single_run)


def _damage_middle(path: Path) -> None:
    """Flip bytes inside the pickle record of a torch file, keeping its size: loading it fails (a size check passes)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[info.header_offset + k:info.header_offset + k + 2], "little") for k in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(single_run, tmp_path):
    """Loading it would kill every relaunch with a traceback (a crash loop); the previous one resumes exactly."""
    run = cut_to(single_run, tmp_path / "run", 6)
    _damage_middle(run / "checkpoints" / "checkpoint-6" / "optimizer.pt")
    proc = cli(str(copy_config(single_run.parent / "single.yaml", run, tmp_path / "run.yaml")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "skipping incomplete or corrupt checkpoint" in proc.stdout and "checkpoint-6" in proc.stdout
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-3'}" in proc.stdout
    assert_ends_like(run, single_run)


def test_nodes_whose_newest_copies_differ_agree_on_the_previous_checkpoint(single_run, tmp_path):
    """Node-local run dirs (save_on_each_node): node 1's copy of checkpoint-6 is damaged, node 0's is whole."""
    cfgs = []
    for r in (0, 1):
        run = cut_to(single_run, tmp_path / f"node{r}", 6)
        cfgs.append(copy_config(single_run.parent / "single.yaml", run, tmp_path / f"node{r}.yaml", batch_size=4,
                                save_on_each_node=True))
    _damage_middle(tmp_path / "node1" / "checkpoints" / "checkpoint-6" / "optimizer.pt")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "multitune.cli",
                               "train", str(c)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for r, c in enumerate(cfgs)]
    results = finish(procs)
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    assert "every rank resumes from checkpoint-3" in results[0][1]
    for r in (0, 1):
        assert_ends_like(tmp_path / f"node{r}", single_run)
