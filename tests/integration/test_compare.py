"""`multitune compare` scores every row as a separate `multitune eval` would; base evaluations never
overwrite a run's metrics.json."""

import json

import pytest
import yaml

from multitune.cli import app
from multitune.commands.compare import compare
from tests.conftest import tiny_config


def _cli(*args):
    app(list(map(str, args)), standalone_mode=False)


@pytest.mark.slow
def test_compare_table_equals_separate_evals(assets, tmp_path):
    out = tmp_path / "cmp"
    run_dir = out / "runs" / "full"
    tree = tiny_config(assets, run_dir, max_steps=2, batch_size=4, eval_rows_during_training=4)
    tree["tasks"] = [{**tree["tasks"][i], "max_eval_rows": 10} for i in (0, 2)]  # claims, commonsense_qa
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tree))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"config": str(base), "out_dir": str(out), "max_rows": 10,
                                    "rows": [{"name": "zero-shot"}, {"name": "full", "overrides": ["train.epochs=1"]}]}))
    table = compare(spec)
    assert (run_dir / "DONE").exists()
    trained_metrics = (run_dir / "metrics.json").read_bytes()

    _cli("eval", base, "--max-rows", 10)  # the config's base model, written beside the run's results
    _cli("eval", run_dir, "--max-rows", 10)
    assert (run_dir / "metrics.json").read_bytes() == trained_metrics  # never over the training metrics
    separate = {"zero-shot": json.loads((run_dir / "metrics-base-likelihood-10rows.json").read_text()),
                "full": json.loads((run_dir / "metrics-likelihood-10rows.json").read_text())}
    rows = {r["name"]: r for r in table["rows"]}
    assert table["tasks"] == ["claims", "commonsense_qa"]
    for name, metrics in separate.items():
        for task in table["tasks"]:
            cell = rows[name]["tasks"][task]
            assert cell["n"] == metrics[task]["n"] == 10
            assert cell["accuracy"] == metrics[task]["accuracy"] and cell["macro_f1"] == metrics[task]["macro_f1"]
            zero = separate["zero-shot"][task]
            assert cell["delta_accuracy"] == pytest.approx(metrics[task]["accuracy"] - zero["accuracy"])
    cost = json.loads((run_dir / "cost.json").read_text())
    assert rows["full"]["cost"] == {k: cost[k] for k in ("train_seconds", "trainable_params", "tokens_seen")}
    assert rows["full"]["cost"]["trainable_params"] > 0 and rows["zero-shot"]["cost"]["tokens_seen"] == 0
    md = (out / "compare.md").read_text()
    assert f"{rows['full']['tasks']['claims']['accuracy']:.3f}" in md and "| zero-shot | zero-shot |" in md

    # a second compare reuses the finished run: nothing retrained, the same numbers
    final = sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "final").iterdir())
    assert compare(spec)["rows"] == table["rows"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "final").iterdir()) == final

    # the demo's closing table: the base model zero-shot (its own file) beside the fine-tuned metrics
    from multitune.commands.demo import before_after
    from multitune.rundir import RunDir

    tuned = json.loads(trained_metrics)
    shown = before_after(RunDir(run_dir).load_config(), tuned)
    zero = json.loads((run_dir / "metrics-base.json").read_text())
    assert (run_dir / "metrics.json").read_bytes() == trained_metrics
    for task in ("claims", "commonsense_qa"):
        line = next(ln for ln in shown.splitlines() if ln.startswith(task)).split()
        assert line[3:5] == [f"{zero[task]['accuracy']:.3f}", f"{tuned[task]['accuracy']:.3f}"]
        assert zero[task]["n"] == tuned[task]["n"]
