from collections import Counter

import pytest

from multitune.config import TaskConfig
from multitune.data.load import check_split, make_split
from multitune.errors import UserError
from multitune.tasks import Example, build_task


def _task(labels):
    t = build_task(TaskConfig(name="t", type="classification", dataset="x.csv"))
    t.label_names = labels
    return t


def _examples(counts: dict[int, int]):
    return [Example([{"role": "user", "content": f"row {k}-{i}"}], "", k) for k, n in counts.items() for i in range(n)]


def test_split_is_deterministic_stratified_and_disjoint():
    exs = _examples({0: 50, 1: 30, 2: 20})
    task = _task(["a", "b", "c"])
    a = make_split(task, exs, 0.2, seed=6, max_rows=None)
    b = make_split(task, exs, 0.2, seed=6, max_rows=None)
    assert a == b
    assert not set(a["train"]) & set(a["val"])
    assert len(a["val"]) == 20 and len(a["train"]) == 80
    assert Counter(exs[i].label for i in a["val"]) == {0: 10, 1: 6, 2: 4}
    assert make_split(task, exs, 0.2, seed=7, max_rows=None) != a


def test_duplicate_prompts_never_straddle_the_split():
    exs = _examples({0: 10, 1: 10}) + _examples({0: 10, 1: 10})  # every prompt twice
    s = make_split(_task(["a", "b"]), exs, 0.2, seed=6, max_rows=None)
    prompts_train = {exs[i].messages[0]["content"] for i in s["train"]}
    prompts_val = {exs[i].messages[0]["content"] for i in s["val"]}
    assert not prompts_train & prompts_val and len(s["train"]) + len(s["val"]) == 20


def test_max_rows_keeps_class_balance():
    exs = _examples({0: 100, 1: 100})
    s = make_split(_task(["a", "b"]), exs, 0.2, seed=6, max_rows=50)
    assert len(s["train"]) + len(s["val"]) == 50
    assert Counter(exs[i].label for i in s["val"]) == {0: 5, 1: 5}


def test_class_without_validation_rows_is_an_error():
    with pytest.raises(UserError, match="leaves a class without validation rows"):
        make_split(_task(["a", "b"]), _examples({0: 20, 1: 1}), 0.2, seed=6, max_rows=None)
    with pytest.raises(UserError, match="leaves a class without validation rows"):
        make_split(_task([str(i) for i in range(10)]), _examples({i: 2 for i in range(10)}), 0.2, seed=6, max_rows=None)


def _recorded(tmp_path, rows):
    """A one-task config on a local copy of `rows`, with its split recorded as `train` records it."""
    import datasets

    from multitune.config import config_from_dict
    from multitune.data.load import load_tasks, save_splits

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(data / "train.parquet"))
    cfg = config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": "claims", "dataset": str(data)}]})
    save_splits(load_tasks(cfg, None, create=True), tmp_path / "splits")
    return cfg, data / "train.parquet", tmp_path / "splits" / "claims.json"


ROWS = [{"text": f"message number {i} about my policy", "label": "Claim" if i % 2 else "Not a Claim"} for i in range(20)]


def test_a_changed_dataset_with_the_same_row_count_is_refused(tmp_path):
    import datasets

    from multitune.data.load import load_tasks

    cfg, file, record = _recorded(tmp_path, ROWS)
    assert len(load_tasks(cfg, record.parent, create=False)[0].val) == 4  # unchanged: read back
    changed = [dict(r) for r in ROWS]
    changed[3]["text"] = "a different message"  # same count, other content
    datasets.Dataset.from_list(changed).to_parquet(str(file))
    with pytest.raises(UserError, match=r"content changed since the split was recorded.*pin tasks.claims.revision"):
        load_tasks(cfg, record.parent, create=False)


@pytest.mark.parametrize("edit, problem", [
    (lambda s: s["val"].append(s["train"][0]), "share rows"),
    (lambda s: s["train"].append(99), "outside the dataset"),
    (lambda s: s.update(val=[]), "missing or empty"),
])
def test_a_damaged_recorded_split_is_refused(tmp_path, edit, problem):
    import json

    from multitune.data.load import load_tasks

    cfg, _, record = _recorded(tmp_path, ROWS)
    split = json.loads(record.read_text())
    edit(split)
    record.write_text(json.dumps(split))
    with pytest.raises(UserError, match=f"recorded split is damaged.*{problem}"):
        load_tasks(cfg, record.parent, create=False)
    with pytest.raises(UserError, match=problem):
        check_split("t", split, n_rows=20)


def test_max_rows_below_the_number_of_classes_is_a_clear_error():
    with pytest.raises(UserError, match="without validation rows"):
        make_split(_task([str(i) for i in range(10)]), _examples({i: 5 for i in range(10)}), 0.2, seed=6, max_rows=6)
