"""The compare spec's errors and the table's arithmetic (no model)."""

import json
from pathlib import Path

import pytest
import yaml

from multitune.commands import compare as cmp
from multitune.commands.compare import build_table, format_markdown, load_spec
from multitune.errors import UserError


def _spec(tmp_path, **tree):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"config": "c.yaml", "out_dir": "o", **tree}))
    return path


def test_bad_specs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="compare spec not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="unique"):
        load_spec(_spec(tmp_path, rows=[{"name": "a"}, {"name": "a"}]))
    with pytest.raises(UserError, match="not both"):
        load_spec(_spec(tmp_path, rows=[{"name": "a", "run": "r", "overrides": ["peft.method=lora"]}]))
    with pytest.raises(UserError, match="rows.0.shots"):
        load_spec(_spec(tmp_path, rows=[{"name": "a", "shots": -1}]))


def test_table_deltas_and_cost_against_hand_computed_values():
    def res(acc, f1):
        return {"claims": {"kind": "classification", "n": 10, "accuracy": acc, "macro_f1": f1, "chance": 0.5},
                "chat": {"kind": "chat", "n": 4, "loss": 2.0, "perplexity": 7.4}}

    rows = [
        {"name": "two", "method": "2-shot", "run_dir": None, "results": res(0.6, 0.55), "cost": {"train_seconds": 0}},
        {"name": "zero", "method": "zero-shot", "run_dir": None, "results": res(0.5, 0.4), "cost": {"train_seconds": 0}},
        {"name": "lora", "method": "lora", "run_dir": "r", "results": res(0.9, 0.85),
         "cost": {"train_seconds": 12.5, "trainable_params": 1234, "tokens_seen": 5678}},
    ]
    table = build_table(rows)
    assert table["zero_shot_row"] == "zero" and table["tasks"] == ["claims"]  # chat has no accuracy
    cells = {r["name"]: r["tasks"]["claims"] for r in table["rows"]}
    assert cells["two"]["delta_accuracy"] == pytest.approx(0.1) and cells["lora"]["delta_accuracy"] == pytest.approx(0.4)
    assert cells["lora"]["delta_macro_f1"] == pytest.approx(0.45) and cells["zero"]["delta_accuracy"] == 0
    md = format_markdown(table, "spec.yaml")
    assert "| lora | lora | 0.900 | +0.400 | 0.850 | +0.450 | 12 | 1,234 | 5,678 |" in md


# ---------------------------------------------------------------- refused before any row trains; kept as it goes


@pytest.fixture
def base(tmp_path):
    """A base config on small generated data (classification + multiple choice); no model is ever loaded."""
    from multitune.commands import tiny

    data = tiny.synthetic_datasets(tmp_path / "data", per_class=6)
    cfg = {"model": {"name_or_path": "no-such/model"}, "peft": {"method": "lora"},
           "tasks": [{"name": "claims", "dataset": str(data["claims"])},
                     {"name": "commonsense_qa", "dataset": str(data["commonsense_qa"])}]}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _compare_spec(tmp_path, base, rows, **extra):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"config": str(base), "out_dir": str(tmp_path / "out"), "rows": rows, **extra}))
    return path


@pytest.fixture
def trained(monkeypatch):
    """`train` replaced by a recorder that leaves a finished run directory behind (no model)."""
    from multitune.rundir import RunDir

    calls = []

    def fake_train(cfg, **kw):
        calls.append(str(cfg.run_dir))
        run = RunDir(Path(cfg.run_dir))
        run.prepare(cfg, resuming=False)
        run.final.mkdir(exist_ok=True)
        run.mark_done()

    monkeypatch.setattr(cmp, "train", fake_train)  # the launch compare calls
    return calls


@pytest.mark.parametrize(("row", "message"), [
    ({"name": "head", "overrides": ["head=classifier"], "shots": 2}, "row head: shots, template and mode apply to head: lm"),
    ({"name": "head", "overrides": ["head=classifier"], "template": "terse"}, "row head: shots, template and mode apply"),
    ({"name": "lora2", "overrides": ["train.epochs=1"], "template": "no-such"}, "row lora2: --template 'no-such'"),
    ({"name": "seed7", "overrides": ["data.split_seed=7"]}, "row seed7: task claims was trained on another split"),
])
def test_a_bad_row_is_refused_before_any_row_trains(row, message, base, tmp_path, trained):
    spec = _compare_spec(tmp_path, base, [{"name": "lora", "overrides": []}, {"name": "zero-shot"}, row])
    with pytest.raises(UserError, match=message):
        cmp.compare(spec)
    assert trained == []  # nothing trained: the first training row would have taken hours


def test_a_run_row_on_another_split_is_refused_before_any_row_trains(base, tmp_path, trained):
    from multitune.config import load_config
    from multitune.data.load import load_tasks, save_splits
    from multitune.rundir import RunDir

    other = RunDir(tmp_path / "other")  # a finished run, made with another split seed
    cfg = load_config(base, ["data.split_seed=7", f"run_dir={other.root}"])
    other.prepare(cfg, resuming=False)
    save_splits(load_tasks(cfg, None, create=True), other.splits)
    other.final.mkdir()
    other.mark_done()
    spec = _compare_spec(tmp_path, base, [{"name": "lora", "overrides": []}, {"name": "mine", "run": str(other.root)}])
    with pytest.raises(UserError, match="row mine: task claims was trained on another split"):
        cmp.compare(spec)
    assert trained == []


def _fake_scores(monkeypatch, fail: set[str]):
    """The scoring replaced by a recorder: each row's accuracy is its number of shots / 10 (+0.5 for a trained
    run), so a reused row is told apart from a re-scored one by the calls alone."""
    calls = []

    def cells(name, acc, data):
        return {td.task.name: {"kind": td.task.kind, "n": len(td.val), "accuracy": acc, "macro_f1": acc / 2,
                               "chance": 0.5, "predictions": ["big"]} for td in data}

    def fake_evaluate(cfg, data, variant, seed):  # the base model's scores (results.variants.evaluate)
        calls.append(("base", variant.shots, variant.template))
        if variant.template in fail:
            raise UserError(f"scoring failed for template {variant.template}")
        return cells("base", variant.shots / 10, data)

    def fake_run_row(run, row, spec, reference, seed):
        calls.append(("run", row.name))
        from multitune.data.load import load_tasks

        return cells(row.name, 0.5, load_tasks(run.load_config(), run.splits, create=True))

    monkeypatch.setattr(cmp, "evaluate", fake_evaluate)
    monkeypatch.setattr(cmp, "run_row", fake_run_row)
    return calls


def test_the_table_is_written_after_each_row_and_a_relaunch_continues(base, tmp_path, trained, monkeypatch):
    rows = [{"name": "zero-shot"}, {"name": "2-shot", "shots": 2}, {"name": "lora", "overrides": []},
            {"name": "terse", "template": "terse"}]
    spec = _compare_spec(tmp_path, base, rows)
    out = tmp_path / "out"
    calls = _fake_scores(monkeypatch, fail={"terse"})
    with pytest.raises(UserError, match="scoring failed"):  # the last row fails after three were scored
        cmp.compare(spec)
    kept = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in kept["rows"]] == ["zero-shot", "2-shot", "lora"]
    cells = {r["name"]: r["tasks"]["claims"] for r in kept["rows"]}
    assert cells["2-shot"]["accuracy"] == 0.2 and cells["2-shot"]["delta_accuracy"] == pytest.approx(0.2)
    assert cells["lora"]["accuracy"] == 0.5 and "predictions" not in json.dumps(kept)
    md = (out / "compare.md").read_text()
    assert "| 2-shot | 2-shot | 0.200 | +0.200 |" in md and "terse" in md.split("| lora |")[1]  # still to score
    assert trained == [str(out / "runs" / "lora")]

    calls.clear()
    calls_fail = _fake_scores(monkeypatch, fail=set())
    table = cmp.compare(spec)  # the relaunch scores only the row that failed
    assert calls_fail == [("base", 0, "terse")] and trained == [str(out / "runs" / "lora")]
    assert [r["name"] for r in table["rows"]] == ["zero-shot", "2-shot", "lora", "terse"]
    assert json.loads((out / "compare.json").read_text())["rows"] == table["rows"]
    assert "still to score" not in (out / "compare.md").read_text()

    calls_fail.clear()  # a row whose spec changed is scored again, the others are kept
    rows[1]["shots"] = 3
    spec = _compare_spec(tmp_path, base, rows)
    table = cmp.compare(spec)
    assert calls_fail == [("base", 3, None)]
    assert {r["name"]: r["tasks"]["claims"]["accuracy"] for r in table["rows"]}["2-shot"] == pytest.approx(0.3)

    calls_fail.clear()  # the trained run was trained again (another DONE): its row is scored again
    from multitune.rundir import RunDir

    import os

    done = RunDir(out / "runs" / "lora").done
    os.utime(done, ns=(done.stat().st_atime_ns, done.stat().st_mtime_ns + 10**9))
    cmp.compare(spec)
    assert calls_fail == [("run", "lora")]

    calls_fail.clear()  # the spec's own overrides changed: every row's config did, every row is scored again
    trained.clear()
    cmp.compare(_compare_spec(tmp_path, base, rows, overrides=["train.learning_rate=0.001"]))
    assert trained == [str(out / "runs" / "lora")]
    assert sorted(map(str, calls_fail)) == sorted(map(str, [("base", 0, None), ("base", 3, None), ("run", "lora"), ("base", 0, "terse")]))
