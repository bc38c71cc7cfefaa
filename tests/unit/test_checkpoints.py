import json

import torch
from safetensors.torch import save_file

from multitune.checkpoints import MARKER, is_complete, latest_complete


def make_ckpt(root, step, *, marker=True, truncate=False):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(64, 64)}, str(folder / "adapter_model.safetensors"))
    if truncate:
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marker:
        (folder / MARKER).write_text("{}")
    return folder


def test_newest_complete_checkpoint_wins(tmp_path):
    make_ckpt(tmp_path, 5)
    newest = make_ckpt(tmp_path, 10)
    assert latest_complete(tmp_path) == newest


def test_incomplete_and_truncated_checkpoints_are_skipped(tmp_path, capsys):
    good = make_ckpt(tmp_path, 5)
    make_ckpt(tmp_path, 10, truncate=True)
    make_ckpt(tmp_path, 15, marker=False)  # killed before every rank finished
    assert latest_complete(tmp_path) == good
    out = capsys.readouterr().out
    assert "checkpoint-15" in out and "checkpoint-10" in out


def test_corrupt_trainer_state_is_not_complete(tmp_path):
    folder = make_ckpt(tmp_path, 3)
    (folder / "trainer_state.json").write_text("{trunc")
    assert not is_complete(folder)
    assert latest_complete(tmp_path / "absent") is None
