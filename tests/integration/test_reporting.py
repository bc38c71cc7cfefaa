"""wandb reporting offline, and the Hub upload with its model card, without a network."""

import json

import pytest

from multitune.config import config_from_dict
from multitune.train import train
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

    from multitune.publish import push
    from multitune.run import RunDir

    raw = tiny_config(assets, tmp_path / "run", max_steps=2, save_steps=1, eval_rows_during_training=0)
    raw["tasks"] = raw["tasks"][:1]
    raw["peft"]["method"] = "lora"
    cfg = config_from_dict(raw)
    results = train(cfg)
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private)

        def upload_folder(self, repo_id, folder_path, commit_message):
            folder = __import__("pathlib").Path(folder_path)  # a temporary folder: read it during the call
            calls["upload"] = (repo_id, sorted(p.name for p in folder.iterdir()))
            calls["card"], calls["metrics"] = (folder / "README.md").read_text(), json.loads((folder / "metrics.json").read_text())
            return "ok"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_NOTsupposedTOleak")
    hub_cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"push": True, "repo_id": "me/tiny-multitask"})})
    push(RunDir(tmp_path / "run"), hub_cfg, results)
    assert calls["create"] == ("me/tiny-multitask", True)
    repo, files = calls["upload"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.json", "tokenizer.json"} <= set(files)
    card = calls["card"]
    assert "base_model:" in card and "| claims |" in card and "hf_NOTsupposedTOleak" not in card
    assert calls["metrics"]["claims"]["n"] > 0
