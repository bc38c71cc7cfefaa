import pytest
import yaml

from multitune.config import apply_overrides, config_from_dict, load_config
from multitune.errors import UserError

BASE = {"model": {"name_or_path": "m"}, "tasks": [{"name": "banking77"}, {"name": "claims"}]}


def write(tmp_path, tree):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_defaults_follow_the_seed(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.train.epochs == 2 and cfg.train.lr_scheduler == "cosine" and cfg.train.warmup_ratio > 0
    assert cfg.data.val_fraction == 0.2 and cfg.data.split_seed == 6
    assert cfg.peft.method == "lora" and cfg.train.report_to == "none"


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.epochs=1", "train.learning_rate=1e-4", "peft.method=dora",
                                               "tasks.banking77.max_rows=500", "tasks.1.weight=2", "train.wandb.tags=[a, b]"])
    assert cfg.train.epochs == 1.0 and cfg.train.learning_rate == 1e-4 and cfg.peft.method == "dora"
    assert cfg.tasks[0].max_rows == 500 and cfg.tasks[1].weight == 2.0
    assert cfg.train.wandb.tags == ["a", "b"]
    assert type(cfg.train).__name__ == "TrainConfig"  # stays typed


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.epochz=1"], "train.epochz: unknown key"),
        (["train.epochs=two"], "train.epochs"),
        (["train.epochs"], "not key=value"),
        (["tasks.nope.max_rows=3"], "no task named 'nope'"),
        (["peft.method=lorax"], "peft.method"),
        (["train.lr_scheduler=cosinee"], "train.lr_scheduler"),
        (["peft.method=prefix_tuning", "train.packing=true"], "cannot be combined with packing"),
        (["hub.push=true"], "hub.push needs hub.repo_id"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_config(write(tmp_path, BASE), overrides)


def test_unknown_top_level_key_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="unknown key"):
        config_from_dict({**BASE, "learning_rate": 1})
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_duplicate_task_names_rejected():
    with pytest.raises(UserError, match="unique"):
        config_from_dict({**BASE, "tasks": [{"name": "claims"}, {"name": "claims"}]})


def test_override_creates_nested_keys():
    tree = apply_overrides({"model": {"name_or_path": "m"}}, ["train.wandb.project=x"])
    assert tree["train"]["wandb"]["project"] == "x"
