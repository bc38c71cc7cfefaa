import json
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from multitune.training.checkpoints import (
    MARKER, CompleteMarker, Layout, grad_accum_for_resume, is_complete, latest_complete, saved_layout,
)
from multitune.errors import UserError


def mark_as_saved(folder, step):
    """Mark ``folder`` complete the way a save does: multitune's CompleteMarker, on the writing process."""
    args = SimpleNamespace(output_dir=str(folder.parent), should_save=True, world_size=1, per_device_train_batch_size=4,
                           gradient_accumulation_steps=1)
    CompleteMarker().on_save(args, SimpleNamespace(global_step=step), None)


def damage_middle(path):
    """Same size, different bytes in the middle: what a bad disk block or an interrupted copy leaves."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


def make_ckpt(root, step, *, marker=True, truncate=False, optimizer=True, saved=False):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(64, 64)}, str(folder / "adapter_model.safetensors"))
    if truncate:
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if optimizer:
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    if saved:  # the manifest the save records
        mark_as_saved(folder, step)
    elif marker:  # a marker as multitune wrote it before the manifest (no file list)
        (folder / MARKER).write_text(json.dumps({"global_step": step, "world_size": 2, "batch_size": 4, "grad_accum": 1}))
    return folder


def test_newest_complete_checkpoint_wins(tmp_path):
    make_ckpt(tmp_path, 5)
    newest = make_ckpt(tmp_path, 10)
    assert latest_complete(tmp_path) == newest


def test_incomplete_and_truncated_checkpoints_are_skipped(tmp_path, capsys):
    good = make_ckpt(tmp_path, 5)
    make_ckpt(tmp_path, 10, truncate=True)
    make_ckpt(tmp_path, 15, marker=False)  # killed before every rank finished
    make_ckpt(tmp_path, 20, optimizer=False)  # weights without the optimizer would resume with fresh moments
    assert latest_complete(tmp_path) == good
    out = capsys.readouterr().out
    assert "checkpoint-15" in out and "checkpoint-10" in out and "checkpoint-20" in out


def test_truncated_optimizer_is_not_complete(tmp_path):
    folder = make_ckpt(tmp_path, 3)
    data = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert not is_complete(folder)


def test_skipped_checkpoints_are_reported_once_per_node(tmp_path, capsys, monkeypatch):
    make_ckpt(tmp_path, 5, marker=False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # not the node's first process: the first one says it
    assert latest_complete(tmp_path) is None
    assert capsys.readouterr().out == ""


def test_corrupt_trainer_state_is_not_complete(tmp_path):
    folder = make_ckpt(tmp_path, 3)
    (folder / "trainer_state.json").write_text("{trunc")
    assert not is_complete(folder)
    assert latest_complete(tmp_path / "absent") is None


def _dcp_ckpt(root, step):
    """A checkpoint as FSDP writes it for full fine-tuning: DCP folders for the model and the optimizer."""
    folder = root / f"checkpoint-{step}"
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        dcp.save({"model": {"a": torch.randn(32, 8), "b": torch.randn(16)}}, checkpoint_id=folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    mark_as_saved(folder, step)
    return folder


def test_sharded_checkpoint_is_complete_only_with_its_metadata_and_every_shard(tmp_path):
    folder = _dcp_ckpt(tmp_path, 4)
    assert is_complete(folder)
    shards = sorted((folder / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards
    # a node of a save_on_each_node job: its own ranks' shards, but node 0 alone wrote .metadata
    (folder / "pytorch_model_fsdp_0" / ".metadata").unlink()
    assert not is_complete(folder)

    other = _dcp_ckpt(tmp_path, 8)
    data = shards[0].name
    (other / "optimizer_0" / data).unlink()  # a shard the metadata names is missing
    assert not is_complete(other)
    third = _dcp_ckpt(tmp_path, 12)
    shard = third / "pytorch_model_fsdp_0" / data
    shard.write_bytes(shard.read_bytes()[:10])  # truncated
    assert not is_complete(third)
    assert latest_complete(tmp_path) is None


def test_marker_records_the_batch_layout(tmp_path):
    assert saved_layout(make_ckpt(tmp_path, 2)) == Layout(2, 4, 1)


def test_resume_on_fewer_processes_keeps_the_global_batch():
    saved = Layout(world_size=2, batch_size=4, grad_accum=1)
    assert grad_accum_for_resume(saved, Layout(1, 4, 1), grad_accum_from_user=False) == 2
    assert grad_accum_for_resume(saved, Layout(4, 2, 1), grad_accum_from_user=False) == 1
    assert grad_accum_for_resume(saved, Layout(1, 8, 1), grad_accum_from_user=False) == 1  # batch_size set by the user
    assert grad_accum_for_resume(Layout(1, 4, 2), Layout(2, 4, 1), grad_accum_from_user=False) == 1
    assert grad_accum_for_resume(None, Layout(3, 4, 1), grad_accum_from_user=False) == 1  # checkpoint from before layouts


def test_resume_that_would_change_the_global_batch_is_refused():
    saved = Layout(world_size=2, batch_size=4, grad_accum=1)
    with pytest.raises(UserError, match=r"global batch of 8 .* train.batch_size=4 train.grad_accum=2"):
        grad_accum_for_resume(saved, Layout(1, 4, 3), grad_accum_from_user=True)  # the user's own grad_accum: not overridden
    with pytest.raises(UserError, match="number of processes that divides 8"):
        grad_accum_for_resume(saved, Layout(3, 4, 1), grad_accum_from_user=False)
    with pytest.raises(UserError, match=r"train.batch_size=2 train.grad_accum=1"):
        grad_accum_for_resume(saved, Layout(4, 3, 1), grad_accum_from_user=False)  # 4 x 3 cannot make 8


@pytest.mark.parametrize("saved", [True, False], ids=["manifest", "old-marker"])
def test_optimizer_damaged_in_its_middle_falls_back_to_the_previous_checkpoint(tmp_path, capsys, saved):
    """Same size, so a size check passes; every relaunch would die loading it instead of resuming."""
    good = make_ckpt(tmp_path, 5, saved=saved)
    damaged = make_ckpt(tmp_path, 10, saved=saved)
    torch.save({"state": {0: {"exp_avg": torch.randn(4096)}}, "param_groups": []}, damaged / "optimizer.pt")
    if saved:
        mark_as_saved(damaged, 10)  # the manifest of the real file, then the disk damages it
    assert latest_complete(tmp_path) == damaged
    damage_middle(damaged / "optimizer.pt")
    assert latest_complete(tmp_path) == good
    assert "warning: skipping incomplete or corrupt checkpoint" in capsys.readouterr().out


def test_a_file_changed_after_the_save_does_not_match_the_manifest(tmp_path):
    folder = make_ckpt(tmp_path, 3, saved=True)
    assert json.loads((folder / MARKER).read_text())["files"]["adapter_model.safetensors"]["size"] > 0
    save_file({"w": torch.zeros(64, 64)}, str(folder / "adapter_model.safetensors"))  # same size and header, other bytes
    assert not is_complete(folder)


@pytest.mark.parametrize("saved", [True, False], ids=["manifest", "old-marker"])
@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_rng_state_truncated_or_missing_is_not_complete(tmp_path, saved, fault):
    """Without it Trainer resumes silently with fresh random state (dropout, data order): not exact."""
    folder = make_ckpt(tmp_path, 3, saved=saved)
    assert is_complete(folder)
    rng = folder / "rng_state.pth"
    rng.write_bytes(rng.read_bytes()[:100]) if fault == "truncated" else rng.unlink()
    assert not is_complete(folder)


class _Payload:
    """Unpickling this creates a file: proof that the bytes were executed."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        return (open, (self.proof, "w"))


@pytest.mark.parametrize("saved", [True, False], ids=["manifest", "old-marker"])
def test_a_planted_pickle_in_dcp_metadata_is_never_run_by_the_completeness_check(tmp_path, saved):
    """A checkpoint folder (a shared volume, a Hub download) is data: judging it must not execute it."""
    proof = tmp_path / "payload-ran"
    sharded = _dcp_ckpt(tmp_path / "ckpts", 4)
    if not saved:
        (sharded / MARKER).write_text("{}")
    adapter = make_ckpt(tmp_path / "ckpts", 8, saved=saved)
    (adapter / "optimizer_0").mkdir()  # an adapter checkpoint never has DCP folders: nothing may read them
    for folder in (sharded / "pytorch_model_fsdp_0", sharded / "optimizer_0", adapter / "optimizer_0"):
        (folder / ".metadata").write_bytes(pickle.dumps(_Payload(proof)))
    is_complete(sharded), is_complete(adapter), latest_complete(tmp_path / "ckpts")
    assert not proof.exists()
    if saved:  # the planted file does not match what the save recorded
        assert not is_complete(sharded)


def test_ranks_with_different_newest_checkpoints_agree_on_the_oldest_if_all_hold_it(tmp_path, monkeypatch):
    """Node-local copies: one node's newest is damaged. Every rank gets the gathered steps and checks the oldest."""
    from multitune import distributed
    from multitune.training.checkpoints import common_step

    monkeypatch.setattr(distributed, "all_gather", lambda obj: [obj, obj])  # two ranks that see the same disk here
    make_ckpt(tmp_path, 3, saved=True)
    make_ckpt(tmp_path, 6, saved=True)
    assert common_step(tmp_path, [6, 3]) == 3
    assert common_step(tmp_path, [6, 6]) == -1  # they agree already
    assert common_step(tmp_path, [6, -1]) == -1  # a rank holds none: nothing in common
    damage_middle(tmp_path / "checkpoint-3" / "optimizer.pt")
    assert common_step(tmp_path, [6, 3]) == -1  # not complete everywhere: the ranks-disagree error stays


def test_an_adapter_checkpoint_needs_its_gathered_optimizer_not_dcp_shards(tmp_path):
    """Resuming it would otherwise go through Trainer's DCP loader, which unpickles the .metadata."""
    folder = make_ckpt(tmp_path, 3)
    (folder / "optimizer.pt").unlink()
    (folder / "optimizer_0").mkdir()
    (folder / "optimizer_0" / ".metadata").write_bytes(b"x")
    (folder / "optimizer_0" / "__0_0.distcp").write_bytes(b"x")
    mark_as_saved(folder, 3)
    assert not is_complete(folder)
