import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from multitune.training.checkpoints import MARKER, Layout, grad_accum_for_resume, is_complete, latest_complete, saved_layout
from multitune.errors import UserError


def make_ckpt(root, step, *, marker=True, truncate=False, optimizer=True):
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
    if marker:
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
    (folder / MARKER).write_text("{}")
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
