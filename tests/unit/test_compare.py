"""The compare spec's errors and the table's arithmetic (no model)."""

import pytest
import yaml

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
