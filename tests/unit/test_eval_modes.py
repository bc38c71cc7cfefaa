"""`eval` and `predict` beyond the default: the calibration (ECE) of the label probabilities, `--min-confidence`,
constrained decoding, and the plots linked from each report. Checked against the oracle's probabilities
(the model's own loss, softmaxed over the labels)."""

from __future__ import annotations

import json
import re

import matplotlib.image
import numpy as np
import pytest
from PIL import Image

from multitune.scoring.calibration import expected_calibration_error
from multitune.errors import UserError
from multitune.results.predict import predict
from tests import oracle
from tests.unit.test_run_commands import _run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXTS = ["My car was rear-ended, I want to file a claim.", "What are your opening hours?", "A tree fell on my roof last night",
         "Can I change my address online?", "water damage in the kitchen after the pipe burst", "thanks for the help"]


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    return _run(assets, tmp_path_factory.mktemp("evalmodes"), 1)


def _oracle_probs(run, examples, labels):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    return oracle.logprobs(model, *oracle.chat_inputs(tok, examples, labels)).softmax(-1)


def assert_plots_linked(report, names):
    """Every image the report links exists, is a PNG that PIL and matplotlib read, and the expected ones are there."""
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert sorted(links) == sorted(f"plots/{n}" for n in names)
    for link in links:
        data = (report.parent / link).read_bytes()
        assert data[:8] == PNG_MAGIC, link
        with Image.open(report.parent / link) as im:
            im.verify()
        assert matplotlib.image.imread(report.parent / link).ndim == 3


def test_eval_reports_the_calibration_of_the_label_probabilities(run):
    from multitune.cli import eval_
    from multitune.data.load import load_tasks
    from multitune.rundir import RunDir

    eval_(run, mode=None, max_rows=None)
    metrics = json.loads((run / "metrics.json").read_text())["claims"]
    (td,) = load_tasks(RunDir(run).load_config(), run / "splits", create=False)
    probs = _oracle_probs(run, td.val, td.task.label_names)
    conf, pred = probs.max(-1)
    correct = [int(p) == ex.label for p, ex in zip(pred, td.val, strict=True)]
    assert metrics["ece"] == pytest.approx(expected_calibration_error(conf.tolist(), correct), abs=1e-4)
    assert metrics["mean_confidence"] == pytest.approx(float(conf.mean()), abs=1e-4)
    assert sum(b["n"] for b in metrics["reliability"]) == metrics["n"] == len(td.val)
    assert "predictions" not in metrics  # rows go to wandb tables, not into the metrics file
    report = run / "report.md"
    assert "| ECE |" in report.read_text() and f"| {metrics['ece']:.3f} |" in report.read_text()
    assert_plots_linked(report, ["claims-confusion.png", "claims-f1.png"])  # no trainer log here: no training curves


def test_eval_constrained_emits_only_labels_and_links_its_own_plots(run):
    from multitune.cli import eval_

    eval_(run, mode="constrained", max_rows=None)
    m = json.loads((run / "metrics-constrained.json").read_text())["claims"]
    assert m["mode"] == "constrained"
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == m["n"]  # an unparsable answer would be missing here
    assert "ece" not in m  # the calibration is that of likelihood scores
    assert_plots_linked(run / "report-constrained.md", ["claims-confusion-constrained.png", "claims-f1-constrained.png"])


def test_min_confidence_answers_unsure_below_it(run):
    from multitune.results.predict import restore_task
    from multitune.rundir import RunDir

    task = restore_task(RunDir(run), None)
    probs = _oracle_probs(run, [task.example_from_text(t) for t in TEXTS], task.label_names)
    conf = probs.max(-1).values.numpy()
    # The threshold sits midway across the widest gap between two rows' confidences, measured in log-odds, the
    # scale of the summed log-probs that predict and the oracle compute along two paths (the tiny model puts
    # every row at 1 - 5e-8: a threshold on one row's value, such as the median of an odd count, could fall on
    # either side of predict's value for it). Each row stays at least 1e-4 nats from it: beyond their rounding.
    odds = np.sort(np.log(conf) - np.log1p(-conf))
    k = int(np.argmax(np.diff(odds))) + 1
    assert odds[k] - odds[k - 1] > 2e-4
    threshold = float(1 / (1 + np.exp(-(odds[k - 1] + odds[k]) / 2)))
    got = predict(run, None, TEXTS, min_confidence=threshold)
    for p, c, row in zip(got, conf, probs, strict=True):
        best = task.label_names[int(row.argmax())]
        if c < threshold:
            assert p == {"label": "unsure", "score": pytest.approx(float(c), abs=1e-4), "guess": best}
        else:
            assert p == {"label": best, "score": pytest.approx(float(c), abs=1e-4)}
    assert sum(p["label"] == "unsure" for p in got) == int((conf < threshold).sum()) >= 1


def test_predict_constrained_scores_the_label_it_spelled(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from multitune.results.predict import restore_task
    from multitune.rundir import RunDir

    task = restore_task(RunDir(run), None)
    got = predict(run, None, TEXTS[:3], mode="constrained")
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    prompts, cands = oracle.chat_inputs(tok, [task.example_from_text(t) for t in TEXTS[:3]], task.label_names)
    for p, prompt in zip(got, prompts, strict=True):
        k = task.label_names.index(p["label"])
        assert p["score"] == pytest.approx(float(oracle.logprobs(model, [prompt], [cands[k]]).exp()[0, 0]), abs=1e-4)


@pytest.mark.parametrize("kw, fragment", [
    ({"min_confidence": 1.5}, "--min-confidence 1.5: give a probability between 0 and 1"),
    ({"mode": "constrained", "min_confidence": 0.5}, "--min-confidence needs --mode likelihood"),
    ({"mode": "beam"}, "--mode 'beam': predict chooses labels by likelihood or constrained"),
])
def test_bad_predict_options_are_one_clear_error(run, kw, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        predict(run, None, TEXTS[:1], **kw)


def test_chat_on_a_run_without_a_chat_task_is_one_clear_error(run, tmp_path):
    from multitune.results.converse import open_chat, read_prompts

    with pytest.raises(UserError, match=r"this run trained no chat task \(its tasks: \['claims'\]\)"):
        open_chat(run)
    with pytest.raises(UserError, match="input file not found"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
