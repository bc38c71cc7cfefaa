"""Rows without a label are no class (issue 16, item 8): they are left out, counted per task (or refused with
data.drop_unlabelled: false); a ClassLabel -1 is "no label", not the last class; multiple choice takes each
row's own choices, in its prompt and in its scoring."""

from __future__ import annotations

import math

import datasets
import pytest

from multitune.config import TaskConfig, config_from_dict
from multitune.errors import UserError
from tests import oracle

CLAIMS = [("my car was hit in the car park, please open a claim", "Claim"), ("what are your opening hours", "Not a Claim"),
          ("the storm broke my window, I want to claim", "Claim"), ("how do I change my address", "Not a Claim"),
          ("a pipe burst and flooded the kitchen", None), ("please send me the policy document", ""),
          ("someone stole my bike yesterday", "Claim"), ("can I pay monthly", "Not a Claim"),
          ("hail damaged my car roof", "Claim"), ("is there a discount for students", "Not a Claim")]

# ARC-style: 3 to 5 choices, numeric keys in some rows, the answer a key of its own row
ARC = [
    {"question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"question": "What melts ice fastest?", "choices": {"text": ["salt", "sand", "air", "oil"], "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    {"question": "Which planet is largest?", "choices": {"text": ["Mars", "Venus", "Jupiter", "Mercury", "Earth"],
                                                          "label": ["A", "B", "C", "D", "E"]}, "answerKey": "C"},
    {"question": "What do plants take in?", "choices": {"text": ["carbon dioxide", "helium", "neon", "argon"],
                                                         "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"question": "What is unlabelled?", "choices": {"text": ["this", "that", "other"], "label": ["A", "B", "C"]}, "answerKey": ""},
    {"question": "Which is a liquid?", "choices": {"text": ["rock", "water", "wood"], "label": ["1", "2", "3"]}, "answerKey": "2"},
]


def _task(monkeypatch, cfg: dict, ds: datasets.Dataset, drop: bool = True):
    from multitune.tasks import base, build_task

    monkeypatch.setattr(base.hub, "load_rows", lambda *a, **k: ds)
    task = build_task(TaskConfig.model_validate({"dataset": "org/data", **cfg}))
    return task, (task.load(None) if drop else task.load(None, drop_unlabelled=False))


def test_empty_label_cells_are_left_out_and_counted_not_a_class(monkeypatch, capsys):
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in CLAIMS], "label": [lab for _, lab in CLAIMS]})
    task, rows = _task(monkeypatch, {"name": "mine", "type": "classification"}, ds)
    assert task.label_names == ["Claim", "Not a Claim"]
    assert len(rows) == 8 and "left out 2 of 10 rows" in capsys.readouterr().out
    examples = [task.example(r) for r in rows]
    assert [task.label_names[ex.label] for ex in examples] == [lab for _, lab in CLAIMS if lab]
    assert all("None" not in ex.messages[-1]["content"] and ex.target for ex in examples)


def test_drop_unlabelled_false_refuses_such_data(monkeypatch):
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in CLAIMS], "label": [lab for _, lab in CLAIMS]})
    with pytest.raises(UserError, match=r"task mine: 2 of 10 rows have no label.*data\.drop_unlabelled"):
        _task(monkeypatch, {"name": "mine", "type": "classification"}, ds, drop=False)


def test_drop_unlabelled_is_a_validated_config_key():
    base = {"model": {"name_or_path": "m"}, "tasks": [{"name": "claims"}]}
    assert config_from_dict(base).data.drop_unlabelled is True
    assert config_from_dict({**base, "data": {"drop_unlabelled": False}}).data.drop_unlabelled is False
    with pytest.raises(UserError, match="data.drop_unlabelled"):
        config_from_dict({**base, "data": {"drop_unlabelled": "sometimes"}})


def test_a_classlabel_minus_one_is_no_label_not_the_last_class(monkeypatch, capsys):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos", "neutral"])})
    ds = datasets.Dataset.from_dict({"text": ["good", "bad", "unknown", "fine", "meh"], "label": [1, 0, -1, 1, 2]}, features=features)
    task, rows = _task(monkeypatch, {"name": "sent", "type": "classification"}, ds)
    assert task.label_names == ["neg", "pos", "neutral"]
    assert rows["text"] == ["good", "bad", "fine", "meh"] and "left out 1 of 5 rows" in capsys.readouterr().out
    assert [task.example(r).target for r in rows] == ["pos", "neg", "pos", "neutral"]


# a chat row's answer is its response (prompt/response data) or its last assistant turn (messages data)
QA = [("what is 2+2", "4"), ("say hi", None), ("capital of France", "Paris"), ("nothing", ""), ("blank", "  \n"),
      ("colour of the sky", "blue")]


def test_chat_rows_without_a_response_are_left_out_and_counted(monkeypatch, capsys):
    """A row with no response would train the model to answer with end-of-turn alone."""
    answered = [(p, r) for p, r in QA if r is not None and r.strip()]  # the oracle: rows with a real response
    ds = datasets.Dataset.from_dict({"prompt": [p for p, _ in QA], "response": [r for _, r in QA]})
    task, rows = _task(monkeypatch, {"name": "qa", "type": "chat"}, ds)
    assert len(rows) == len(answered) and f"left out {len(QA) - len(answered)} of {len(QA)} rows" in capsys.readouterr().out
    examples = [task.example(r) for r in rows]
    assert [(ex.messages[-1]["content"], ex.target) for ex in examples] == answered


def test_chat_conversations_whose_last_turn_is_empty_are_left_out(monkeypatch, capsys):
    def talk(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    ds = datasets.Dataset.from_dict({"messages": [talk(p, r or "") for p, r in QA]})
    task, rows = _task(monkeypatch, {"name": "talks", "type": "chat"}, ds)
    answered = [r for _, r in QA if r is not None and r.strip()]
    assert [task.example(r).target for r in rows] == answered
    assert f"left out {len(QA) - len(answered)} of {len(QA)} rows" in capsys.readouterr().out


def test_drop_unlabelled_false_refuses_chat_rows_without_a_response(monkeypatch):
    ds = datasets.Dataset.from_dict({"prompt": [p for p, _ in QA], "response": [r for _, r in QA]})
    with pytest.raises(UserError, match=r"task qa2: 3 of 6 rows have no response.*data\.drop_unlabelled"):
        _task(monkeypatch, {"name": "qa2", "type": "chat"}, ds, drop=False)


def test_multiple_choice_prompts_offer_each_rows_own_choices(monkeypatch, capsys):
    task, rows = _task(monkeypatch, {"name": "arc", "type": "multiple_choice"}, datasets.Dataset.from_list(ARC))
    assert len(rows) == 5 and "left out 1 of 6 rows" in capsys.readouterr().out
    labelled = [r for r in ARC if r["answerKey"]]
    for row, ex in zip(labelled, (task.example(r) for r in rows), strict=True):
        prompt = ex.messages[-1]["content"]
        keys = row["choices"]["label"]
        assert ex.target == row["answerKey"] and [task.label_names[i] for i in ex.choices] == keys
        assert all(text in prompt for text in row["choices"]["text"])
        others = [t for r in ARC for t in r["choices"]["text"] if t not in row["choices"]["text"]]
        assert not any(t in prompt for t in others)


@pytest.fixture
def arc_scored(monkeypatch, capsys, assets, tokenizer):
    from transformers import AutoModelForCausalLM

    from multitune.data.formatting import Formatter
    from multitune.scoring.scorer import Scorer

    task, rows = _task(monkeypatch, {"name": "arc", "type": "multiple_choice"}, datasets.Dataset.from_list(ARC))
    examples = [task.example(r) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    return task, examples, model, Scorer(model, Formatter(tokenizer, 192), batch_size=2)


def test_multiple_choice_is_scored_over_each_rows_own_choices(arc_scored, tokenizer):
    """The probabilities are the softmax over the row's own choices of their summed log-probs, computed
    independently (tests/oracle.py: the model's own loss, one unpadded sequence per choice)."""
    task, examples, model, scorer = arc_scored
    probs = scorer.likelihood(examples, task.label_names).softmax(-1)
    pred, _ = scorer.predict_labels(examples, task.label_names, "likelihood")
    for i, ex in enumerate(examples):
        own = [task.label_names[k] for k in ex.choices]
        prompts, cands = oracle.chat_inputs(tokenizer, [ex], own)
        want = oracle.logprobs(model, prompts, cands)[0].softmax(-1)
        got = probs[i, list(ex.choices)]
        assert got.tolist() == pytest.approx(want.tolist(), abs=1e-4)
        assert float(probs[i].sum()) == pytest.approx(1.0) and float(got.sum()) == pytest.approx(1.0)
        assert task.label_names[pred[i]] == own[int(want.argmax())]


def test_multiple_choice_generation_outside_the_rows_choices_is_wrong(arc_scored, monkeypatch):
    """Free generation that names a key the row does not offer is unparsable (-1), never a prediction."""
    task, examples, _, scorer = arc_scored
    answers = iter(["E", "1", "E", "A", "4"])  # row 0 offers A-C, row 2 offers A-E, row 4 offers 1-3
    monkeypatch.setattr(scorer, "generate", lambda exs, width, **k: [next(answers) for _ in exs])
    pred, ok = scorer.predict_labels(examples, task.label_names, "generate")
    names = task.label_names
    assert pred == [-1, names.index("1"), names.index("E"), names.index("A"), -1] and ok == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_a_multiple_choice_report_names_each_class_once(arc_scored):
    from multitune.data.load import TaskData
    from multitune.scoring.evaluate import evaluate_tasks

    task, examples, model, scorer = arc_scored
    td = TaskData(task, [], examples, {})
    res = evaluate_tasks(model, scorer.formatter, [td], mode="likelihood", batch_size=2, detail=True)["arc"]
    names = res["confusion_matrix"]["labels"]
    assert len(names) == len(set(names)) and res["n"] == 5
    for ex, row in zip(examples, res["predictions"], strict=True):
        assert row["gold"] == ex.target and row["predicted"] in [task.label_names[k] for k in ex.choices]
    assert math.isclose(sum(p["predicted"] == p["gold"] for p in res["predictions"]) / 5, res["accuracy"])


def test_constrained_decoding_refuses_rows_with_their_own_choices(arc_scored):
    """Constrained decoding walks one label trie for all rows: it could spell a key a row does not offer."""
    task, examples, _, scorer = arc_scored
    with pytest.raises(UserError, match="use eval.mode likelihood or generate"):
        scorer.predict_labels(examples, task.label_names, "constrained")


def test_a_split_an_earlier_version_made_on_all_rows_names_the_cause_and_the_way_out(monkeypatch, tmp_path):
    """Before rows without a label were left out, a split was made on every row: its indices no longer fit the rows
    loaded now. The relaunch says so (not "the data changed"), and a split made now records what it left out."""
    import json

    from multitune.data import load
    from multitune.tasks import base

    ds = datasets.Dataset.from_dict({"text": [t for t, _ in CLAIMS], "label": [lab for _, lab in CLAIMS]})
    monkeypatch.setattr(base.hub, "load_rows", lambda *a, **k: ds)
    cfg = config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": "claims", "dataset": "org/claims",
                                                                       "type": "classification"}]})
    (tmp_path / "claims.json").write_text(json.dumps({"n_rows": 10, "train": [0, 1, 2, 3, 4, 6, 7], "val": [5, 8, 9]}))
    with pytest.raises(UserError) as err:
        load.load_tasks(cfg, tmp_path, create=False)
    message = str(err.value)
    assert "all 10 rows" in message and "2 of them without a label" in message and "--no-resume" in message
    assert "the data changed" not in message
    made = load.load_tasks(cfg, None, create=True)[0].split
    assert made["n_rows"] == 8 and made["unlabelled_left_out"] == 2
