"""wandb reporting offline, and the Hub upload with its model card, without a network."""

import json
from types import SimpleNamespace
from pathlib import Path

import pytest

from multitune.config import config_from_dict
from multitune.launch.runner import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow
SECRET = "wandb-secret-api-key-0123456789abcdef"


def test_wandb_offline_run_keeps_its_id_and_no_secret(assets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    raw = tiny_config(assets, tmp_path / "run", max_steps=2, save_steps=1, eval_rows_during_training=0)
    raw["tasks"] = raw["tasks"][:1]
    raw["train"].update(report_to="wandb", wandb={"project": "multitune-test", "tags": ["ci"]})
    train(config_from_dict(raw))
    run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
    runs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs, list((tmp_path / "run").rglob("*"))[:20]
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_push_uploads_adapter_and_model_card(assets, tmp_path, monkeypatch):
    import huggingface_hub

    from multitune.publishing.publish import push
    from multitune.rundir import RunDir

    token = "hf_NOTsupposedTOleak"
    monkeypatch.setenv("HF_TOKEN", token)  # in the environment from the start: training could capture it too
    raw = tiny_config(assets, tmp_path / "run", max_steps=2, save_steps=1, eval_rows_during_training=0)
    raw["tasks"] = raw["tasks"][:1]
    raw["peft"]["method"] = "lora"
    cfg = config_from_dict(raw)
    results = train(cfg)
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private)
            calls["token"] = huggingface_hub.get_token()  # what a real upload authenticates with

        def list_repo_files(self, repo_id):
            return []  # a new repo: nothing an earlier push left

        def create_commit(self, repo_id, operations, commit_message):  # push uploads its folder as one commit
            files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            calls["upload"] = (repo_id, files)
            return "ok"

        def repo_info(self, repo_id):
            return SimpleNamespace(private=calls["create"][1])

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    hub_cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"push": True, "repo_id": "me/tiny-multitask"})})
    push(RunDir(tmp_path / "run"), hub_cfg, results)
    assert calls["create"] == ("me/tiny-multitask", True)
    assert calls["token"] == token  # the token was there to leak...
    _, files = calls["upload"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.json", "tokenizer.json"} <= set(files)
    assert [name for name, data in files.items() if token.encode() in data] == []  # ...and no uploaded file holds it
    card = files["README.md"].decode()
    assert "base_model:" not in card and "| claims |" in card  # the tiny base is a local folder: no Hub id to name
    assert json.loads(files["metrics.json"])["claims"]["n"] > 0
