import datasets
import pytest

from multitune.config import TaskConfig
from multitune.errors import UserError
from multitune.tasks import build_task


def parquet(tmp_path, rows, name="d", features=None):
    folder = tmp_path / name
    folder.mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return str(folder)


CLAIM_ROWS = [{"id": i, "Description": f"my car was hit by a truck number {i}" if i % 2 else f"how do I pay invoice {i}",
               "Category": "Claim" if i % 2 else "Not a Claim"} for i in range(10)]


def test_claims_detects_renamed_columns(tmp_path):
    task = build_task(TaskConfig(name="claims", dataset=parquet(tmp_path, CLAIM_ROWS)))
    ds = task.load(None)
    assert (task.text_col, task.label_col) == ("Description", "Category")
    ex = task.example(ds[1])
    assert ex.target == "Claim" and ex.label == 0
    assert "my car was hit by a truck number 1" in ex.messages[-1]["content"]
    assert ex.messages[0]["role"] == "system"


def test_claims_undetectable_columns_lists_what_it_found(tmp_path):
    rows = [{"a": i, "b": "x" if i % 2 else "y"} for i in range(6)]
    task = build_task(TaskConfig(name="claims", dataset=parquet(tmp_path, rows)))
    with pytest.raises(UserError, match=r"columns found: \['a', 'b'\]"):
        task.load(None)


def test_label_outside_label_space_is_rejected(tmp_path):
    rows = [*CLAIM_ROWS, {"id": 99, "Description": "something long enough to be text", "Category": "Maybe"}]
    task = build_task(TaskConfig(name="claims", dataset=parquet(tmp_path, rows), label_column="Category"))
    ds = task.load(None)
    with pytest.raises(UserError, match="'Maybe' is not in the label space"):
        [task.example(r) for r in ds]


def test_label_matching_is_case_and_separator_insensitive(tmp_path):
    rows = [{"text": "long enough text here", "label": v} for v in ("claim", "NOT_A_CLAIM", "Not a Claim")]
    task = build_task(TaskConfig(name="claims", dataset=parquet(tmp_path, rows)))
    ds = task.load(None)
    assert [task.example(r).label for r in ds] == [0, 1, 1]


def test_banking77_uses_classlabel_names(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["b_intent", "a_intent"])})
    rows = [{"text": "where is my card", "label": 0}, {"text": "change my pin", "label": 1}]
    task = build_task(TaskConfig(name="banking77", dataset=parquet(tmp_path, rows, features=feats)))
    ds = task.load(None)
    assert task.label_names == ["b_intent", "a_intent"]
    assert task.example(ds[1]).target == "a_intent"


def test_commonsense_qa_targets_the_letter(tmp_path):
    rows = [{"question": "Where is milk kept?", "choices": {"label": list("ABCDE"), "text": ["sky", "fridge", "car", "sea", "hat"]},
             "answerKey": "B"}]
    task = build_task(TaskConfig(name="commonsense_qa", dataset=parquet(tmp_path, rows)))
    ex = task.example(task.load(None)[0])
    assert ex.target == "B" and ex.label == 1 and task.label_names == list("ABCDE")
    assert "B. fridge" in ex.messages[-1]["content"]


def test_multiple_choice_rejects_unknown_answer(tmp_path):
    rows = [{"question": "q", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "F"}]
    task = build_task(TaskConfig(name="commonsense_qa", dataset=parquet(tmp_path, rows)))
    with pytest.raises(UserError, match="not one of the choices"):
        task.example(task.load(None)[0])


def test_chat_from_messages_and_from_prompt_response(tmp_path):
    msgs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    task = build_task(TaskConfig(name="chat", dataset=parquet(tmp_path, msgs, "m")))
    ex = task.example(task.load(None)[0])
    assert ex.target == "hello" and ex.messages[-1] == {"role": "user", "content": "hi"}
    qa = [{"question": "2+2?", "answer": "4"}]
    task = build_task(TaskConfig(name="qa", type="chat", dataset=parquet(tmp_path, qa, "q")))
    ex = task.example(task.load(None)[0])
    assert ex.target == "4" and ex.messages[-1]["content"] == "2+2?"


def test_chat_without_usable_columns(tmp_path):
    task = build_task(TaskConfig(name="chat", dataset=parquet(tmp_path, [{"foo": "bar"}])))
    with pytest.raises(UserError, match=r"columns found: \['foo'\]"):
        task.load(None)


def test_yaml_declared_classification_task(tmp_path):
    rows = [{"review": "great product, would buy", "stars": "positive"}, {"review": "broke after a day", "stars": "negative"}]
    cfg = TaskConfig(name="sentiment", type="classification", dataset=parquet(tmp_path, rows), text_column="review",
                     label_column="stars", labels=["positive", "negative"], instruction="Sentiment?", template="minimal")
    task = build_task(cfg)
    ex = task.example(task.load(None)[1])
    assert ex.target == "negative" and ex.messages[-1]["content"] == "broke after a day"


def test_unknown_task_and_template():
    with pytest.raises(UserError, match="unknown task 'nope'.*built-in tasks"):
        build_task(TaskConfig(name="nope"))
    with pytest.raises(UserError, match="unknown classification template"):
        build_task(TaskConfig(name="claims", template="fancy"))


def test_missing_dataset_path():
    with pytest.raises(UserError, match="dataset path not found: ./no/such/dir"):
        build_task(TaskConfig(name="claims", dataset="./no/such/dir")).load(None)


def test_score_uses_sklearn_metrics(tmp_path):
    task = build_task(TaskConfig(name="claims", dataset=parquet(tmp_path, CLAIM_ROWS)))
    task.load(None)
    m = task.score([0, 0, 1, 1], [0, 1, 1, 1])
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["confusion_matrix"]["matrix"] == [[1, 1], [0, 2]]
    assert m["per_class"]["Claim"]["support"] == 2
