import datasets
import pytest

from multitune import hub
from multitune.errors import UserError


def test_mirror_maps_hub_ids_to_local_dirs(tmp_path):
    (tmp_path / "datasets" / "org" / "name").mkdir(parents=True)
    assert hub.resolve("org/name", "dataset", tmp_path) == str(tmp_path / "datasets" / "org" / "name")
    assert hub.resolve("org/other", "dataset", tmp_path) == "org/other"  # falls through to the Hub
    with pytest.raises(UserError, match="model path not found"):
        hub.resolve("./missing-model", "model", tmp_path)


def test_mirror_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path))
    assert hub.mirror_root(None) == tmp_path


def test_legacy_script_repo_falls_back_to_parquet_revision(monkeypatch, capsys):
    calls = []

    def fake_load(repo, subset=None, split=None, revision=None, **kw):
        calls.append((repo, subset, revision))
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found banking77.py")
        return datasets.Dataset.from_dict({"text": ["a"], "label": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = hub.load_rows("PolyAI/banking77", subset=None, split="train", mirror=None)
    assert len(ds) == 1
    assert calls == [("PolyAI/banking77", None, None), ("PolyAI/banking77", "default", "refs/convert/parquet")]
    assert "refs/convert/parquet" in capsys.readouterr().out


def test_unreachable_dataset_is_a_user_error():
    with pytest.raises(UserError, match="cannot load dataset nobody/nothing"):
        hub.load_rows("nobody/nothing", subset=None, split="train", mirror=None)


def test_gated_model_message_says_what_to_do(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    err = OSError("You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/meta-llama/x")
    msg = str(hub.explain_model_load_error("meta-llama/x", err))
    assert "HF_TOKEN" in msg and "hf auth login" in msg and "accept its licence" in msg


def test_gated_model_through_the_loader(monkeypatch):
    from transformers import AutoTokenizer

    from multitune.config import ModelConfig
    from multitune.modeling.load import load_tokenizer

    def gated(*a, **k):
        raise OSError("meta-llama/Llama-3.1-8B-Instruct is a gated repository. Make sure to request access")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", gated)
    with pytest.raises(UserError, match="is gated"):
        load_tokenizer(ModelConfig(name_or_path="meta-llama/Llama-3.1-8B-Instruct"), None)


def test_a_pinned_dataset_revision_is_loaded_and_recorded_in_the_split(monkeypatch):
    from multitune.config import config_from_dict
    from multitune.data.load import load_tasks

    calls = []

    def fake_load(repo, subset=None, split=None, revision=None, **kw):
        calls.append((repo, revision))
        return datasets.Dataset.from_dict({"text": [f"message {i}" for i in range(10)], "label": ["Claim", "Not a Claim"] * 5})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = config_from_dict({"model": {"name_or_path": "m"},
                            "tasks": [{"name": "claims", "dataset": "org/claims", "revision": "3f2c1ab"}]})
    (td,) = load_tasks(cfg, None, create=True)
    assert calls == [("org/claims", "3f2c1ab")]
    assert td.split["revision"] == "3f2c1ab" and len(td.split["fingerprint"]) == 32


REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(("ref", "command"), [
    ("runs/mirror-tiny-model", "multitune make-tiny-model runs/mirror-tiny-model --config configs/mirror-tiny.yaml"),
    ("runs/b77-tiny-model", "multitune make-tiny-model runs/b77-tiny-model --config configs/head-vs-lm-banking77.yaml"),
    ("runs/demo/tiny-model", "multitune demo --offline"),
])
def test_a_missing_local_model_says_both_readings_and_how_to_build_it(ref, command, tmp_path, monkeypatch):
    """`runs/x` is shaped like a Hub `org/name` id: before `make-tiny-model` (HF_HUB_OFFLINE: the Hub is
    unreachable), the error names both readings and, for a shipped tiny config's model, the command that builds it."""
    from multitune.config import ModelConfig
    from multitune.modeling.load import load_tokenizer

    (tmp_path / "configs").symlink_to(REPO_CONFIGS)
    monkeypatch.chdir(tmp_path)  # as the configs are used: from the repository root, before the model is built
    with pytest.raises(UserError) as e:
        load_tokenizer(ModelConfig(name_or_path=ref), None)
    msg = str(e.value)
    assert "\n" not in msg
    if ref.count("/") == 1:  # also a well-formed Hub id: both readings
        assert f"no local directory {ref}" in msg and f"Hub id {ref} could not be reached" in msg
    else:  # a path only
        assert f"model path not found: {ref}" in msg
    assert f"`{command}`" in msg


def test_a_missing_model_with_no_recipe_gets_no_build_command(tmp_path, monkeypatch):
    from multitune.config import ModelConfig
    from multitune.modeling.load import load_tokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_tokenizer(ModelConfig(name_or_path="meta-llama/Llama-3.1-8B-Instruct"), None)
    msg = str(e.value)
    assert "no local directory meta-llama/Llama-3.1-8B-Instruct" in msg and "could not be reached" in msg
    assert "make-tiny-model" not in msg
