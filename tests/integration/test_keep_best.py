"""train.keep_best end to end on the tiny model: the step the log history says scored best is the step final/ holds,
metrics.json and report.md name it, the rows that chose it are left out of the reported metrics, and a joint
run logs each task's training loss (loss/<task>)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from multitune.config import config_from_dict
from multitune.launch.runner import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow
ROWS = 8


def test_final_holds_the_best_scored_step_and_metrics_exclude_the_rows_that_chose_it(assets, tmp_path):
    raw = tiny_config(assets, tmp_path / "run", max_steps=8, eval_steps=2, save_steps=100, save_total_limit=2,
                      logging_steps=1, eval_rows_during_training=ROWS, keep_best="task:claims")
    train(config_from_dict(raw))
    run = tmp_path / "run"
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    scored = [(r["eval_claims_accuracy"], r["step"]) for r in history if "eval_claims_accuracy" in r]
    assert [s for _, s in scored] == [2, 4, 6, 8]
    best = max(scored, key=lambda a_s: (a_s[0], -a_s[1]))[1]  # the oracle: the first step with the top accuracy
    metrics = json.loads((run / "metrics.json").read_text())
    assert {r["checkpoint_step"] for r in metrics.values()} == {best}
    assert f"Weights of step {best} of 8" in (run / "report.md").read_text()
    final = load_file(str(run / "final" / "model.safetensors"))
    kept = load_file(str(run / "checkpoints" / f"checkpoint-{best}" / "model.safetensors"))
    assert final.keys() == kept.keys() and all((final[k] == kept[k]).all() for k in final)
    if best != 8:  # the last step's weights are another checkpoint's
        last = load_file(str(run / "checkpoints" / "checkpoint-8" / "model.safetensors"))
        assert any(not (final[k] == last[k]).all() for k in final)
    # claims chose: its ROWS scored rows are left out; banking77 did not choose: all its validation rows
    val = {t: len(json.loads((run / "splits" / f"{t}.json").read_text())["val"]) for t in ("claims", "banking77")}
    assert metrics["claims"]["n"] == val["claims"] - ROWS and metrics["claims"]["rows_left_out"] == ROWS
    assert metrics["banking77"]["n"] == val["banking77"] and metrics["banking77"]["rows_left_out"] == 0
    # each task's training loss in the training rows of the joint run (a task without a row in a step has none)
    rows = [r for r in history if "loss" in r]
    tasks = {f"loss/{t}" for t in ("claims", "banking77", "commonsense_qa", "chat")}
    assert len(rows) == 8 and set().union(*(r.keys() & tasks for r in rows)) == tasks
    for r in rows:  # one step a row: Trainer's loss is the token-weighted mean of the tasks' losses of that step
        own = [r[k] for k in r.keys() & tasks]
        assert min(own) - 1e-3 <= r["loss"] <= max(own) + 1e-3, r
