"""The model card names real Hub ids (dots and digits in them: `meta-llama/Llama-3.1-8B-Instruct`) as its
`base_model` and datasets, and its usage code loads and serves that id; local paths never reach it.
Read back with huggingface_hub's own ModelCard parser (the oracle for the header)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitune.config import config_from_dict, load_config
from multitune.publishing import publish
from multitune.rundir import RunDir
from multitune.tasks import resolve_tasks

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [p for p in sorted((REPO / "configs").glob("*.yaml")) if not p.name.startswith("compare-")]
PROMPT = {"task": "claims", "kind": "classification", "messages": [{"role": "user", "content": "{text}"}],
          "rendered": "{text}", "answers": ["Claim", "Not a Claim"], "end_of_turn": "<|eot_id|>"}


def card_of(cfg, tmp_path, monkeypatch, method: str):
    from huggingface_hub import ModelCard

    # the prompts section reads the run's recorded tasks; this test is about the ids, not the prompts
    monkeypatch.setattr(publish, "task_prompts", lambda run, cfg, tokenizer: [PROMPT])
    cfg = cfg.model_copy(update={"peft": cfg.peft.model_copy(update={"method": method})})
    text = publish.model_card(RunDir(tmp_path), cfg, {}, None, repo_id="me/tuned", merged=False)
    return ModelCard(text), text


@pytest.mark.parametrize("base", ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_hub_ids_with_dots_are_the_base_model_and_in_the_usage_code(base, method, tmp_path, monkeypatch):
    cfg = config_from_dict({"model": {"name_or_path": base},
                            "tasks": [{"name": "claims", "dataset": "org/claims-v1.2"},
                                      {"name": "banking77", "dataset": str(tmp_path / "local.v2")}]})
    (tmp_path / "local.v2").mkdir()  # an existing local folder, dotted like an id: never named in the card
    card, text = card_of(cfg, tmp_path, monkeypatch, method)
    assert card.data.base_model == base
    assert card.data.datasets == ["org/claims-v1.2"]
    assert "local.v2" not in str(card.data.datasets)
    if method == "full":  # the published repo is the whole model
        assert 'from_pretrained("me/tuned", dtype' in text and "vllm serve me/tuned\n" in text
    else:  # the adapter on its base: both lines must name the base's full Hub id
        assert f'AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.bfloat16' in text
        assert f"vllm serve {base} --enable-lora" in text
        assert f"`{base}` fine-tuned with" in text


def test_local_paths_are_no_hub_ids(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model-1.5").mkdir()
    for ref in (str(tmp_path / "org" / "model-1.5"), "./x/y", "~/m", "data/claims.csv", "a/b/c", "nodots", "a/..b", ""):
        assert publish._hub_id(ref) is None, ref
    assert publish._hub_id("PolyAI/banking77") == "PolyAI/banking77"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_cards_name_their_hub_ids(path, tmp_path, monkeypatch):
    """Every shipped config's Hub model and datasets reach its card whole (local things live under runs/)."""
    cfg = resolve_tasks(load_config(path))
    monkeypatch.chdir(tmp_path)
    if cfg.model.name_or_path.startswith("runs/"):  # a tiny model built locally first, as its config says
        (tmp_path / cfg.model.name_or_path).mkdir(parents=True)
    card, text = card_of(cfg, tmp_path, monkeypatch, "lora")
    model = cfg.model.name_or_path
    if model.startswith("runs/"):
        assert card.data.base_model is None
    else:
        assert card.data.base_model == model and f'from_pretrained("{model}", dtype' in text
    hub_datasets = sorted({t.dataset for t in cfg.tasks if not t.dataset.startswith("runs/")})
    assert (card.data.datasets or []) == hub_datasets
