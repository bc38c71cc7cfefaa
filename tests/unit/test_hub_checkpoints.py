"""Hub checkpoints: the exact commit operations of an upload, and who uploads (main process only)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from safetensors.torch import save_file

from multitune.training import hub_checkpoints
from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.training.hub_checkpoints import HubCheckpoints, commit_operations, wait_for_uploads
from multitune.rundir import RunDir
from tests.fake_hub import FakeHub, install


def fake_run(tmp_path: Path, steps=(4,)) -> RunDir:
    run = RunDir(tmp_path / "myrun")
    (run.splits).mkdir(parents=True)
    run.config.write_text("model: {}\n")
    (run.splits / "claims.json").write_text("{}")
    (run.root / "wandb_id").write_text("abc123")
    for step in steps:
        ck = run.checkpoints / f"checkpoint-{step}"
        (ck / "sub").mkdir(parents=True)
        save_file({"w": torch.ones(2)}, str(ck / "adapter_model.safetensors"))
        for name in ("optimizer.pt", "rng_state.pth", "scheduler.pt"):  # whole torch files: what is_complete checks
            torch.save({"step": step}, ck / name)
        (ck / "sub/x.bin").write_bytes(b"\0" * 8)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (ck / "COMPLETE").write_text("{}")
    return run


def test_upload_is_exactly_these_operations(tmp_path):
    run = fake_run(tmp_path, steps=(6,))
    ck = run.checkpoints / "checkpoint-6"
    ops = commit_operations(run, ck, 6, remote_steps=[2, 4, 5, 9], keep=3)  # 9: a run of this name started over
    p = "myrun/checkpoints/checkpoint-6"
    expected = [
        ("add", "myrun/config.yaml", run.config), ("add", "myrun/splits/claims.json", run.splits / "claims.json"),
        ("add", "myrun/wandb_id", run.root / "wandb_id"),
        ("add", f"{p}/adapter_model.safetensors", ck / "adapter_model.safetensors"), ("add", f"{p}/optimizer.pt", ck / "optimizer.pt"),
        ("add", f"{p}/rng_state.pth", ck / "rng_state.pth"), ("add", f"{p}/scheduler.pt", ck / "scheduler.pt"),
        ("add", f"{p}/sub/x.bin", ck / "sub/x.bin"), ("add", f"{p}/trainer_state.json", ck / "trainer_state.json"),
        ("add", f"{p}/COMPLETE", ck / "COMPLETE"),  # last, although a commit is atomic anyway
        ("delete", "myrun/checkpoints/checkpoint-2/", None),  # newest 3 kept: 6, 5, 4
        ("delete", "myrun/checkpoints/checkpoint-9/", None),  # stale: a resume must never pick it
    ]
    got = [("add", o.path_in_repo, Path(o.path_or_fileobj)) if isinstance(o, CommitOperationAdd) else ("delete", o.path_in_repo, None)
           for o in ops]
    assert got == expected
    assert all(o.is_folder for o in ops if isinstance(o, CommitOperationDelete))


def _cfg(tmp_path, **train):
    return config_from_dict({"run_dir": str(tmp_path / "myrun"), "model": {"name_or_path": "x"}, "tasks": [{"name": "claims"}],
                             "train": {"hub_checkpoints": True, "save_total_limit": 2, **train}, "hub": {"repo_id": "me/tuned"}})


def test_callback_uploads_complete_checkpoints_from_the_main_process_only(tmp_path, monkeypatch):
    run = fake_run(tmp_path, steps=(2, 4, 6))
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    cb = HubCheckpoints(_cfg(tmp_path), run)
    args = SimpleNamespace(output_dir=str(run.checkpoints))
    cb.on_save(args, SimpleNamespace(global_step=2, is_world_process_zero=False), None)  # another rank: nothing
    wait_for_uploads()
    assert hub.commits == []
    (run.checkpoints / "checkpoint-4" / "COMPLETE").unlink()  # not complete: not uploaded
    for step in (2, 4, 6):
        cb.on_save(args, SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    wait_for_uploads()
    assert hub.repos == {"me/tuned-checkpoints": True}  # private
    assert [c[2] for c in hub.commits] == ["myrun: checkpoint-2", "myrun: checkpoint-6"]
    files = hub.files("me/tuned-checkpoints")
    assert "myrun/checkpoints/checkpoint-6/COMPLETE" in files and "myrun/config.yaml" in files
    assert {f.split("/")[2] for f in files if "/checkpoints/" in f} == {"checkpoint-2", "checkpoint-6"}
    assert not (run.root / ".hub-upload" / "checkpoint-6").exists()  # staging cleaned up


def test_upload_survives_rotation_of_the_original(tmp_path, monkeypatch):
    """The staged hard links keep the files even when Trainer deletes the checkpoint before the upload runs."""
    run = fake_run(tmp_path, steps=(2,))
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    staged = hub_checkpoints._stage(run.checkpoints / "checkpoint-2", run.root / ".hub-upload")
    import shutil

    shutil.rmtree(run.checkpoints / "checkpoint-2")
    HubCheckpoints(_cfg(tmp_path), run)._upload(staged, 2)
    assert "myrun/checkpoints/checkpoint-2/optimizer.pt" in hub.files("me/tuned-checkpoints")


def test_a_failed_upload_is_a_warning_not_a_crash(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path, steps=(2,))

    class Down(FakeHub):
        def create_commit(self, *a, **k):
            raise ConnectionError("Hub unreachable")

    install(monkeypatch, Down(tmp_path / "hub"))
    HubCheckpoints(_cfg(tmp_path), run).on_save(SimpleNamespace(output_dir=str(run.checkpoints)),
                                                SimpleNamespace(global_step=2, is_world_process_zero=True), None)
    wait_for_uploads()
    assert "warning: uploading checkpoint-2 to me/tuned-checkpoints failed (ConnectionError: Hub unreachable)" in capsys.readouterr().out


def test_hub_checkpoints_need_a_repo_and_a_token(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="train.hub_checkpoints needs hub.repo_id"):
        config_from_dict({"model": {"name_or_path": "x"}, "tasks": [{"name": "claims"}], "train": {"hub_checkpoints": True}})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no stored login either
    state = SimpleNamespace(is_local_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(UserError, match="needs a Hugging Face token"):
        hub_checkpoints.fetch_newest_checkpoint(_cfg(tmp_path), RunDir(tmp_path / "myrun"), state)
    assert not (tmp_path / "myrun").exists()


@pytest.mark.parametrize("failing", ["listing", "download"])
def test_an_unreachable_hub_on_a_fresh_pod_is_an_error_not_a_fresh_start(tmp_path, monkeypatch, failing):
    """Starting from step 0 instead would make the first upload delete the Hub's newer checkpoints."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    lost = fake_run(tmp_path / "lost-pod", steps=(4,))
    HubCheckpoints(_cfg(tmp_path), lost).on_save(SimpleNamespace(output_dir=str(lost.checkpoints)),
                                                 SimpleNamespace(global_step=4, is_world_process_zero=True), None)
    wait_for_uploads()
    assert "myrun/checkpoints/checkpoint-4/COMPLETE" in hub.files("me/tuned-checkpoints")

    def unreachable(*a, local_dir=None, **k):
        if local_dir:  # a download cut off half way
            (Path(local_dir) / "myrun").mkdir(parents=True)
            (Path(local_dir) / "myrun" / "config.yaml").write_text("partial")
        raise ConnectionError("Hub unreachable")

    if failing == "listing":
        monkeypatch.setattr(hub, "list_repo_tree", unreachable)
    else:
        monkeypatch.setattr(hub_checkpoints, "snapshot_download", unreachable)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    fresh = RunDir(tmp_path / "fresh-pod" / "myrun")
    fresh.root.parent.mkdir(parents=True)
    with pytest.raises(UserError, match="ConnectionError: Hub unreachable.*relaunch"):
        hub_checkpoints.fetch_newest_checkpoint(_cfg(tmp_path), fresh, SimpleNamespace(is_local_main_process=True))
    assert not fresh.checkpoints.exists()
    assert list((tmp_path / "fresh-pod").iterdir()) == []  # no half download left behind
