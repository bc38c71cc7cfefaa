"""Bad input: one line on stderr, exit status 2, no traceback, nothing written."""

import subprocess
import sys

import pytest
import yaml



def assert_clean_error(res, fragment):
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr  # progress bars may precede it
    assert "Traceback" not in res.stderr and fragment in errors[0]


@pytest.fixture
def config(tmp_path, assets):
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(assets["model"])},
           "tasks": [{"name": "claims", "dataset": str(assets["claims"])}]}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["train.lr=1"], "train.lr: unknown key"),
        (["train.epochs=many"], "train.epochs"),
        (["oops"], "not key=value"),
        (["tasks.0.name=nope"], "unknown task 'nope'"),
        (["tasks.0.dataset=./missing"], "dataset path not found"),
        (["model.name_or_path=./no-model"], "model path not found"),
        (["tasks.0.label_column=nolabel"], "columns found"),
        (["tasks.0.labels=[Claim, Other]"], "not in the label space"),
        (["tasks.0.max_rows=3"], "leaves a class without validation rows"),
        (["model.attn_implementation=flash_attention_2"], "flash_attention_2 needs"),  # no flash-attn (or GPU) here
        (["model.max_length=40"], "does not fit model.max_length=40"),
    ],
)
def test_train_bad_input(run_cli, config, tmp_path, extra, fragment):
    res = run_cli("train", str(config), *extra)
    assert_clean_error(res, fragment)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_real_process_exits_2_without_traceback(config):
    res = subprocess.run([sys.executable, "-m", "multitune.cli", "train", str(config), "train.lr=1"],
                         capture_output=True, text=True, timeout=300)
    assert_clean_error(res, "unknown key")


def test_missing_config_and_unknown_run(run_cli, tmp_path):
    assert_clean_error(run_cli("train", str(tmp_path / "nope.yaml")), "config file not found")
    assert_clean_error(run_cli("eval", str(tmp_path)), "not a multitune run directory")


def test_empty_dataset(run_cli, tmp_path, assets):
    (tmp_path / "empty.csv").write_text("text,label\n")
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(assets["model"])},
           "tasks": [{"name": "claims", "dataset": str(tmp_path / "empty.csv")}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert_clean_error(run_cli("train", str(tmp_path / "c.yaml")), "empty")


def test_validate_prints_resolved_config(run_cli, config):
    res = run_cli("validate", str(config), "train.epochs=3")
    assert res.returncode == 0, res.stderr
    out = yaml.safe_load(res.stdout)
    assert out["train"]["epochs"] == 3 and out["tasks"][0]["type"] == "classification"
    assert out["tasks"][0]["labels"] == ["Claim", "Not a Claim"]


def test_tasks_lists_builtins(run_cli):
    res = run_cli("tasks")
    assert res.returncode == 0 and all(n in res.stdout for n in ("claims", "banking77", "commonsense_qa", "chat"))
