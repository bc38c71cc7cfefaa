"""`strategy: per_task` (head: lm): one adapter per task, loaded together on one base, each predicting exactly
as its own single-task run with the same seed and data (the oracle: those runs, trained separately)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch

from multitune.cli import eval_
from multitune.config import config_from_dict
from multitune.data.load import load_tasks
from multitune.data.formatting import Formatter
from multitune.modeling.load import load_for_tasks, load_tokenizer, use_adapter
from multitune.results.predict import predict
from multitune.rundir import RunDir
from multitune.scoring.scorer import Scorer
from multitune.launch.runner import train
from tests.conftest import tiny_config
from tests.unit.test_eval_modes import assert_plots_linked
from tests.wandb_offline import history

pytestmark = pytest.mark.slow
TASKS = ("claims", "banking77")


def lora_config(assets, run_dir: Path, tasks=TASKS, strategy: str = "joint") -> dict:
    raw = tiny_config(assets, run_dir, max_steps=4, learning_rate=1e-2, batch_size=8, save_steps=2,
                      eval_rows_during_training=0, logging_steps=2)
    raw["strategy"] = strategy
    raw["peft"] |= {"method": "lora", "target_modules": "all-linear"}
    raw["tasks"] = [t | {"max_eval_rows": 12} for t in raw["tasks"] if t["name"] in tasks]
    return raw


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("per-task")
    out = {"per_task": root / "per_task"}
    raw = lora_config(assets, out["per_task"], strategy="per_task")
    if importlib.util.find_spec("wandb"):  # reporting does not change what is trained (the oracle runs report nothing)
        raw["train"].update(report_to="wandb", wandb={"project": "multitune-test"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        train(config_from_dict(raw))
    for name in TASKS:  # the oracle: each task trained alone, as a joint run of one task
        out[name] = root / name
        train(config_from_dict(lora_config(assets, out[name], tasks=(name,))))
    return out


def test_report_plots_every_tasks_training_and_wandb_holds_each_model_and_the_results(runs):
    run = runs["per_task"]
    assert_plots_linked(run / "report.md", ["training.png", "claims-confusion.png", "claims-f1.png", "banking77-confusion.png",
                                            "banking77-f1.png"])
    if not importlib.util.find_spec("wandb"):
        pytest.skip("wandb is not installed")
    ids = {f.name: f.read_text() for f in run.glob("wandb_id*")}
    assert set(ids) == {"wandb_id", "wandb_id-claims", "wandb_id-banking77"} and len(set(ids.values())) == 3
    offline = {d.name.rsplit("-", 1)[1]: history(d) for d in (run / "wandb").glob("offline-run-*")}
    assert set(offline) == set(ids.values())
    for task in TASKS:  # each task's model trained in its own wandb run, its loss logged every 2 steps
        assert [r["train/global_step"] for r in offline[ids[f"wandb_id-{task}"]] if "train/loss" in r] == [2, 4]
    metrics = json.loads((run / "metrics.json").read_text())
    (final,) = [r for r in offline[ids["wandb_id"]] if "final/claims_accuracy" in r]
    for task in TASKS:  # the run's own wandb run: every task's final metrics and prediction table
        assert final[f"final/{task}_accuracy"] == pytest.approx(metrics[task]["accuracy"])
        assert final[f"final/{task}_predictions/_type"] == "table-file"
    assert final["plots/training/_type"] == "image-file"


def _val_texts(assets, run: Path, task: str) -> list[str]:
    ds = datasets.load_dataset(str(assets[task]), split="train")
    return [ds[i]["text"] for i in json.loads((run / "splits" / f"{task}.json").read_text())["val"][:12]]


def test_layout_one_adapter_per_task_side_by_side(runs):
    run = runs["per_task"]
    for name in TASKS:
        final = run / "final" / name
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert (final / "tokenizer_config.json").exists() and (final / "trainer_state.json").exists()
        assert any((run / "checkpoints" / name).glob("checkpoint-4/COMPLETE"))
    assert not (run / "final" / "adapter_config.json").exists()
    parts = [json.loads((run / "final" / n / "cost.json").read_text()) for n in TASKS]
    total = json.loads((run / "cost.json").read_text())
    assert total["tokens_seen"] == sum(p["tokens_seen"] for p in parts) > 0
    assert total["trainable_params"] == sum(p["trainable_params"] for p in parts)
    # each task's model cost what its own run cost (same rows, same steps)
    for name, part in zip(TASKS, parts, strict=True):
        assert part["tokens_seen"] == json.loads((runs[name] / "cost.json").read_text())["tokens_seen"]


def test_each_adapter_scores_exactly_as_its_own_single_task_run(runs):
    """Both adapters on one base (switched with set_adapter) against each single-task run's own model."""
    run = RunDir(runs["per_task"])
    cfg = run.load_config()
    tok = load_tokenizer(cfg.model, None, source=str(run.root / "final" / "claims"))
    model = load_for_tasks(cfg, run, list(TASKS))
    assert sorted(model.peft_config) == sorted(TASKS)
    base_id = id(model.get_base_model())
    scores = {}
    for name in TASKS:
        single = RunDir(runs[name])
        examples = [ex for td in load_tasks(cfg, run.splits, create=False) if td.task.name == name for ex in td.val][:12]
        labels = next(td.task.label_names for td in load_tasks(cfg, run.splits, create=False) if td.task.name == name)
        use_adapter(model, name)
        assert model.active_adapter == name and id(model.get_base_model()) == base_id  # the base is not reloaded
        mine = Scorer(model, Formatter(tok, cfg.model.max_length), 8).likelihood(examples, labels)
        alone = load_for_tasks(single.load_config(), single, [name])
        theirs = Scorer(alone, Formatter(tok, cfg.model.max_length), 8).likelihood(examples, labels)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
        scores[name] = (examples, labels, mine)
    # the switch matters: claims rows scored under banking77's adapter are not the claims adapter's scores
    use_adapter(model, "banking77")
    examples, labels, mine = scores["claims"]
    other = Scorer(model, Formatter(tok, cfg.model.max_length), 8).likelihood(examples, labels)
    assert (other - mine).abs().max() > 1e-3


def test_predict_and_eval_match_the_single_task_runs(runs, assets):
    for name in TASKS:
        texts = _val_texts(assets, runs[name], name)
        assert predict(runs["per_task"], name, texts) == predict(runs[name], None, texts)
    before = json.loads((runs["per_task"] / "metrics.json").read_text())
    eval_(runs["per_task"], mode=None, max_rows=None)  # reloads base + both adapters
    after = json.loads((runs["per_task"] / "metrics.json").read_text())
    for name in TASKS:
        alone = json.loads((runs[name] / "metrics.json").read_text())[name]
        assert after[name]["confusion_matrix"] == before[name]["confusion_matrix"] == alone["confusion_matrix"], name
        assert after[name]["accuracy"] == alone["accuracy"]
    assert "](plots/training.png)" in (runs["per_task"] / "report.md").read_text()  # eval keeps every task's curves


def test_relaunch_keeps_finished_adapters_and_finishes_the_rest(runs, assets):
    run = runs["per_task"]
    kept = run / "final" / "claims" / "adapter_model.safetensors"
    stamp = kept.stat().st_mtime_ns
    before = predict(run, "banking77", _val_texts(assets, run, "banking77"))
    (run / "DONE").unlink()  # as if killed while saving banking77's adapter
    (run / "final" / "banking77" / "cost.json").unlink()
    train(config_from_dict(lora_config(assets, run, strategy="per_task")))  # resumes banking77 from checkpoint-4
    assert kept.stat().st_mtime_ns == stamp and (run / "DONE").exists()
    assert predict(run, "banking77", _val_texts(assets, run, "banking77")) == before
