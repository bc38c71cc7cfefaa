"""Plots are valid PNGs of the right content: the confused classes chosen, the curves read from the log."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import classification_report, confusion_matrix, f1_score

from multitune.results.plots import curves, most_confused, panels, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(gold, pred, names):
    ids = list(range(len(names)))
    return {
        "kind": "classification", "macro_f1": f1_score(gold, pred, average="macro"),
        "per_class": classification_report(gold, pred, labels=ids, target_names=names, output_dict=True, zero_division=0),
        "confusion_matrix": {"labels": names, "matrix": confusion_matrix(gold, pred, labels=ids).tolist()},
    }


def _valid_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_most_confused_finds_the_planted_confusions():
    m = np.diag([50] * 30)
    m[3, 17] = m[17, 3] = 9  # 3 and 17 swap often
    m[25, 8] = 4
    m[11, 12] = 1
    assert most_confused(m, 4) == [3, 8, 17, 25]
    assert 11 in most_confused(m, 6) and 12 in most_confused(m, 6)


def test_write_plots_gives_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"intent_{i}" for i in range(40)]
    gold = rng.integers(0, 40, 600)
    pred = np.where(rng.uniform(size=600) < 0.7, gold, rng.integers(0, 40, 600))
    small = _metrics([0, 1, 1, 0, 1], [0, 1, 0, 0, 1], ["Claim", "Not a Claim"])
    log = [{"loss": 2.0 - 0.1 * s, "step": s} for s in range(1, 11)]
    log += [{"eval_loss": 1.5, "eval_banking77_accuracy": 0.4, "step": 5}, {"eval_loss": 1.1, "eval_banking77_accuracy": 0.6, "step": 10}]
    written = write_plots(tmp_path, {"banking77": _metrics(gold, pred, names), "claims": small,
                                     "chat": {"kind": "chat", "loss": 1.0}}, log)
    assert set(written) == {"banking77", "claims", "_training"}
    sizes = {p.name: _valid_png(p) for files in written.values() for p in files}
    assert len(sizes) == 5
    # 40 classes: the F1 chart grows with the classes so that each label stays readable
    assert sizes["banking77-f1.png"][1] > 2 * sizes["claims-f1.png"][1]


def test_curves_read_the_trainer_log(tmp_path):
    log = [{"loss": 2.0, "learning_rate": 1e-3, "step": 5}, {"eval_loss": 1.7, "eval_claims_accuracy": 0.9,
           "eval_claims_macro_f1": 0.8, "eval_runtime": 3.2, "step": 10}, {"train_runtime": 50.0, "step": 10}]
    got = curves(log)
    assert got == {"loss": [(5, 2.0)], "eval_loss": [(10, 1.7)], "eval_claims_accuracy": [(10, 0.9)]}
    assert write_plots(tmp_path, {}, []) == {}  # nothing evaluated, nothing logged: no files


@pytest.mark.parametrize("n", [2, 15, 77])
def test_confusion_stays_readable(tmp_path, n):
    from multitune.results.plots import TOP_CONFUSED, confusion_png

    names = [f"c{i}" for i in range(n)]
    gold = list(range(n)) * 3
    pred = [(g + 1) % n if i % 3 == 0 else g for i, g in enumerate(gold)]
    width, _ = _valid_png(confusion_png("t", _metrics(gold, pred, names), tmp_path / "c.png"))
    # one column per shown class: 77 classes are cut to the most confused ones, not drawn 77 wide
    full_width_77 = (0.45 * 77 + 3) * 110
    assert width < full_width_77 / 3 if n > TOP_CONFUSED else width > 0


def test_a_per_task_run_plots_each_tasks_training_loss(tmp_path):
    """strategy: per_task keeps one Trainer log per task (final/<task>/); the curves hold every task's."""
    import json

    from multitune.config import config_from_dict
    from multitune.rundir import RunDir, training_log

    cfg = config_from_dict({"model": {"name_or_path": "m"}, "strategy": "per_task", "run_dir": str(tmp_path),
                            "tasks": [{"name": "claims", "dataset": "x"}, {"name": "banking77", "dataset": "y"}]})
    for task, start in (("claims", 2.0), ("banking77", 4.0)):
        (tmp_path / "final" / task).mkdir(parents=True)
        # the shape of a per_task model's trainer_state.json: its eval dataset is a dict of one task
        log = [{"loss": start - 0.25 * s, "grad_norm": 1.0, "learning_rate": 1e-3, "step": s} for s in (1, 2, 3)]
        log += [{f"eval_{task}_loss": 1.0, "eval_entropy": 0.9, "eval_mean_token_accuracy": 0.8, "step": 3},
                {f"eval_{task}_accuracy": 0.5, f"eval_{task}_macro_f1": 0.4, "step": 3}]
        (tmp_path / "final" / task / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    got = curves(training_log(cfg, RunDir(tmp_path)))
    assert got["loss/claims"] == [(1, 1.75), (2, 1.5), (3, 1.25)] and got["loss/banking77"][0] == (1, 3.75)
    assert set(got) == {"loss/claims", "loss/banking77", "eval_claims_loss", "eval_banking77_loss", "eval_claims_accuracy",
                        "eval_banking77_accuracy"}  # no bare "loss", no TRL token accuracy posing as a task
    drawn = {title: {label: style for label, style, _ in lines} for title, lines in panels(got).items()}
    assert drawn == {"loss": {"train claims": "-", "train banking77": "-", "claims_loss": "o--", "banking77_loss": "o--"},
                     "validation accuracy per task": {"claims": "o-", "banking77": "o-"}}
    written = write_plots(tmp_path, {}, training_log(cfg, RunDir(tmp_path)))
    _valid_png(written["_training"][0])
