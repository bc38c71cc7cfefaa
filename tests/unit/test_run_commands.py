"""`multitune eval` and `predict` on a run directory laid out as `train` leaves it (the tiny model as fully fine-tuned weights)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from multitune.config import config_from_dict, dump_config
from multitune.data.load import load_tasks, save_splits
from multitune.errors import UserError
from multitune.results.predict import predict, restore_task
from multitune.rundir import RunDir
from multitune.tasks import resolve_tasks
from tests import oracle
from tests.conftest import tiny_config
from tests.unit.test_cli import assert_clean_error


def _run(assets, tmp_path, n_tasks: int):
    raw = tiny_config(assets, tmp_path / "run")
    raw["tasks"] = raw["tasks"][:n_tasks]
    cfg = resolve_tasks(config_from_dict(raw))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    save_splits(load_tasks(cfg, None, create=True), run / "splits")
    shutil.copytree(assets["model"], run / "final")
    (run / "DONE").write_text("finished\n")  # a finished run, laid out by hand
    return run


def test_one_task_run_needs_no_task_and_scores_are_label_probabilities(assets, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _run(assets, tmp_path, 1)
    text = "My car was rear-ended, I want to file a claim."
    (pred,) = predict(run, None, [text])
    # the probability among the labels, from the model's own loss
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    task = restore_task(RunDir(run), None)
    assert task.name == "claims"
    ex = task.example_from_text(text)
    probs = oracle.logprobs(model, *oracle.chat_inputs(tokenizer, [ex], task.label_names))[0].softmax(-1)
    assert pred["label"] == task.label_names[int(probs.argmax())]
    assert pred["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=probs.dtype))


def test_several_tasks_need_a_task(assets, tmp_path):
    run = _run(assets, tmp_path, 2)
    with pytest.raises(UserError, match=r"trained on 2 tasks; choose one with --task \(claims, banking77\)"):
        predict(run, None, ["hello"])


def test_a_json_row_without_the_text_column_is_one_clear_error(assets, tmp_path, monkeypatch, capsys):
    import sys
    from types import SimpleNamespace

    from multitune.cli import main

    run = _run(assets, tmp_path, 1)
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "my car crashed"}) + "\n")
    monkeypatch.setattr(sys, "argv", ["multitune", "predict", str(run), "--input", str(tmp_path / "in.jsonl")])
    with pytest.raises(SystemExit) as exit_:
        main()
    res = SimpleNamespace(returncode=exit_.value.code, stderr=capsys.readouterr().err)
    assert_clean_error(res, "input 2: task claims: an input row has no 'text' key (it has ['body'])")


def test_partial_or_other_mode_eval_writes_beside_the_run_metrics(assets, tmp_path):
    from multitune.cli import eval_

    run = _run(assets, tmp_path, 1)
    eval_(run, mode=None, max_rows=None)  # the run's own evaluation: metrics.json
    full = json.loads((run / "metrics.json").read_text())
    before = {f: (run / f).read_bytes() for f in ("metrics.json", "report.md")}
    eval_(run, mode=None, max_rows=4)
    eval_(run, mode="generate", max_rows=None)
    eval_(run, mode="generate", max_rows=3)
    assert {f: (run / f).read_bytes() for f in before} == before  # never over the run's own results
    assert json.loads((run / "metrics-likelihood-4rows.json").read_text())["claims"]["n"] == 4
    assert json.loads((run / "metrics-generate.json").read_text())["claims"]["n"] == full["claims"]["n"]
    partial = json.loads((run / "metrics-generate-3rows.json").read_text())["claims"]
    assert partial["mode"] == "generate" and partial["n"] == 3
    assert "at most 3 rows" in (run / "report-generate-3rows.md").read_text()


def test_tiny_model_from_a_config_never_sees_validation_rows(assets, tmp_path, monkeypatch):
    import yaml

    from multitune.commands import tiny
    from multitune.cli import make_tiny_model

    raw = tiny_config(assets, tmp_path / "run")
    raw["tasks"] = raw["tasks"][:2]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    seen = []
    monkeypatch.setattr(tiny, "make_tiny_model", lambda out, texts, **kw: seen.extend(texts))
    make_tiny_model(tmp_path / "tiny", config=tmp_path / "c.yaml")
    for td in load_tasks(config_from_dict(raw), None, create=True):
        rows = td.task.load(None)
        train = {rows[i]["text"] for i in td.split["train"]}
        val = {rows[i]["text"] for i in td.split["val"]}
        assert train <= set(seen) and not val & set(seen), td.task.name


def test_a_run_directory_an_earlier_version_wrote_evaluates_predicts_and_pushes(assets, tmp_path):
    """The layout `train` wrote before the package was reorganised (config.yaml without the record header,
    splits/, final/, DONE): eval rewrites its metrics, predict answers, push --dry-run writes the Hub folder."""
    from multitune.cli import eval_, push

    run = _run(assets, tmp_path, 2)
    assert not (run / "config.yaml").read_text().startswith("# multitune run")  # as an earlier version wrote it
    eval_(run, mode=None, max_rows=4)
    metrics = json.loads(next(run.glob("metrics-*4rows.json")).read_text())
    assert set(metrics) == {"claims", "banking77"} and all(0 <= m["accuracy"] <= 1 for m in metrics.values())
    (pred,) = predict(run, "claims", ["My car was rear-ended, I want to file a claim."])
    assert pred["label"] in ("Claim", "Not a Claim") and 0 < pred["score"] <= 1
    push(run, repo_id="me/old-run", private=None, merged=False, dry_run=tmp_path / "out")
    assert (tmp_path / "out" / "README.md").exists() and (tmp_path / "out" / "multitune.yaml").exists()
