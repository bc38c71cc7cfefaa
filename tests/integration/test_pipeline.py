"""End to end on the tiny model: train all four tasks for 2 epochs, checkpoint, evaluate, predict, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.launch.runner import train
from multitune.rundir import RunDir
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow
SECRET = "hf_SECRETtokenVALUE123"


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "multitune.cli", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "run"
    os.environ["HF_TOKEN"] = SECRET  # must never reach any file of the run
    try:
        train(config_from_dict(tiny_config(assets, run_dir)))
    finally:
        del os.environ["HF_TOKEN"]
    return run_dir


def test_training_writes_checkpoints_metrics_and_splits(trained):
    assert (trained / "DONE").exists() and (trained / "final" / "config.json").exists()
    ckpts = sorted((trained / "checkpoints").glob("checkpoint-*"))
    assert ckpts and (ckpts[-1] / "trainer_state.json").exists()
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(2.0)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics) == {"claims", "banking77", "commonsense_qa", "chat"}
    for name in ("claims", "banking77", "commonsense_qa"):
        m = metrics[name]
        matrix = m["confusion_matrix"]["matrix"]
        assert sum(map(sum, matrix)) == m["n"] == len(json.loads((trained / "splits" / f"{name}.json").read_text())["val"])
        assert m["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(len(matrix))) / m["n"])
    assert metrics["chat"]["n"] == len(json.loads((trained / "splits" / "chat.json").read_text())["val"])
    assert "| banking77 |" in (trained / "report.md").read_text()
    for name in metrics:
        split = json.loads((trained / "splits" / f"{name}.json").read_text())
        assert not set(split["train"]) & set(split["val"])


def test_training_logged_per_task_validation(trained):
    logs = json.loads((trained / "trainer_state.json").read_text())["log_history"]
    keys = set().union(*logs)
    for name in ("claims", "banking77", "commonsense_qa", "chat"):
        assert f"eval_{name}_loss" in keys
    assert "eval_banking77_accuracy" in keys and "learning_rate" in keys
    lrs = [entry["learning_rate"] for entry in logs if "learning_rate" in entry]
    assert lrs[-1] < max(lrs)  # the schedule decays


def test_training_learns(trained):
    # accuracy on a few dozen generated rows is too noisy for a tiny model; the losses are not
    logs = json.loads((trained / "trainer_state.json").read_text())["log_history"]
    train_losses = [e["loss"] for e in logs if "loss" in e]
    assert train_losses[-1] < 0.6 * train_losses[0]
    for name in ("claims", "banking77", "commonsense_qa", "chat"):
        val = [e[f"eval_{name}_loss"] for e in logs if f"eval_{name}_loss" in e]
        assert len(val) == 2 and val[1] < val[0], name  # one evaluation per epoch, improving


def test_cost_counts_every_training_token_and_parameter(trained):
    from transformers import AutoModelForCausalLM

    from multitune.data.formatting import Formatter
    from multitune.modeling.load import load_tokenizer
    from multitune.data.prepared import prepare
    from multitune.rundir import RunDir

    cost = json.loads((trained / "cost.json").read_text())
    run = RunDir(trained)
    cfg = run.load_config()
    prepared = prepare(cfg, Formatter(load_tokenizer(cfg.model, None), cfg.model.max_length), run.splits)
    # 2 epochs over the mixed training set: every row's tokens twice (the collator's padding not counted)
    assert cost["tokens_seen"] == 2 * sum(len(ids) for ids in prepared.train["input_ids"])
    assert cost["trainable_params"] == AutoModelForCausalLM.from_pretrained(trained / "final").num_parameters()  # full fine-tuning
    started = min((trained / "splits").stat().st_mtime, (trained / "config.yaml").stat().st_mtime)
    assert 0 < cost["train_seconds"] < (trained / "cost.json").stat().st_mtime - started


def test_no_secret_in_run_dir(trained):
    for path in trained.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def _final(trained):
    from multitune.data.load import load_tasks
    from multitune.modeling.load import load_for_inference, load_tokenizer
    from multitune.rundir import RunDir

    run = RunDir(trained)
    cfg = run.load_config()
    model = load_for_inference(cfg, run.final)
    return model, load_tokenizer(cfg.model, None, source=str(run.final)), {td.task.name: td for td in load_tasks(cfg, run.splits, create=False)}


def test_eval_reproduces_the_oracles_metrics(trained):
    from tests import oracle

    before = json.loads((trained / "metrics.json").read_text())
    res = cli("eval", str(trained))
    assert res.returncode == 0, res.stderr
    after = json.loads((trained / "metrics.json").read_text())
    model, tokenizer, data = _final(trained)
    for name in ("claims", "commonsense_qa"):  # banking77's 12 labels x rows are left out for time
        assert name in res.stdout
        # at the end of training, and from the saved model
        oracle.accuracy_check(model, tokenizer, data[name].val, data[name].task.label_names, before[name]["accuracy"],
                              after[name]["accuracy"])
    assert after["banking77"]["accuracy"] == pytest.approx(before["banking77"]["accuracy"])
    chat = data["chat"].val
    prompts, _ = oracle.chat_inputs(tokenizer, chat, [])
    completions = [tokenizer(ex.target + "<|eot_id|>", add_special_tokens=False)["input_ids"] for ex in chat]
    loss = oracle.mean_loss(model, [p + c for p, c in zip(prompts, completions, strict=True)],
                            [[oracle.IGNORE] * len(p) + c for p, c in zip(prompts, completions, strict=True)])
    assert before["chat"]["loss"] == pytest.approx(loss, abs=1e-4)


def test_eval_generate_mode_writes_beside_the_run_metrics(trained):
    before = (trained / "metrics.json").read_bytes()
    res = cli("eval", str(trained), "--mode", "generate", "--max-rows", "8")
    assert res.returncode == 0, res.stderr
    assert (trained / "metrics.json").read_bytes() == before  # push uploads these: never replaced by a partial eval
    partial = json.loads((trained / "metrics-generate-8rows.json").read_text())
    assert partial["claims"]["mode"] == "generate" and partial["claims"]["n"] == 8


def test_predict_text_and_jsonl(trained, tmp_path):
    from tests import oracle

    text = "My car was rear-ended, I want to file a claim."
    res = cli("predict", str(trained), "--task", "claims", text)
    assert res.returncode == 0, res.stderr
    label, score, _ = res.stdout.strip().splitlines()[-1].split("\t")
    model, tokenizer, data = _final(trained)
    task = data["claims"].task
    probs = oracle.logprobs(model, *oracle.chat_inputs(tokenizer, [task.example_from_text(text)], task.label_names))[0].softmax(-1)
    assert label == task.label_names[int(probs.argmax())] and float(score) == pytest.approx(float(probs.max()), abs=1e-4)
    rows = [{"question": "Where do fish live?", "choices": {"label": list("ABCDE"), "text": ["desk", "water", "sky", "car", "hat"]}}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = cli("predict", str(trained), "--task", "commonsense_qa", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert res.returncode == 0, res.stderr
    pred = json.loads((tmp_path / "out.jsonl").read_text())
    assert pred["label"] in list("ABCDE")


def test_finished_run_is_not_overwritten(trained, assets, capsys):
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    # the same command again (a pod start script after a restart): finished, nothing to do
    assert train(config_from_dict(tiny_config(assets, trained))) == json.loads(before[trained / "metrics.json"])
    assert "holds a finished run with this config: nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"holds a finished run with a different config \(train.learning_rate\)"):
        train(config_from_dict(tiny_config(assets, trained, learning_rate=0.5)))
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before


def test_sigkill_then_relaunch_resumes(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", save_steps=3, eval_rows_during_training=0)
    cfg["train"]["eval_steps"] = 1000
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "multitune.cli", "train", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any((p / "trainer_state.json").exists() for p in ckpt_dir.glob("checkpoint-*")):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*"))
    assert not (tmp_path / "run" / "DONE").exists()
    clocks = {p.name: json.loads((p / "clock.json").read_text())["train_seconds"]
              for p in ckpt_dir.glob("checkpoint-*") if (p / "COMPLETE").exists()}

    res = cli("train", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout
    resumed_from = Path(res.stdout.split("resuming from", 1)[1].split()[0])
    final = max(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] > killed_at and state["epoch"] == pytest.approx(2.0)
    assert (tmp_path / "run" / "DONE").exists()
    # the cost counts the first launch's time up to its checkpoint, and the resumed launch's
    before_kill = clocks[resumed_from.name]
    assert json.loads((tmp_path / "run" / "cost.json").read_text())["train_seconds"] > before_kill > 0


def test_changed_config_does_not_silently_resume(assets, tmp_path):
    cfg = config_from_dict(tiny_config(assets, tmp_path / "run", max_steps=2))
    (tmp_path / "run").mkdir()
    RunDir(tmp_path / "run").write_config(cfg.model_copy(update={"seed": 1}))  # recorded by an earlier launch
    with pytest.raises(UserError, match="different config"):
        train(cfg)


def _wait_for(path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_sigterm_checkpoints_and_exits_cleanly_then_resume_finishes(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", save_steps=1000, eval_rows_during_training=0, epochs=3)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "multitune.cli", "train", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each log row reaches the file as printed
        # the Trainer's first log row (step logging_steps=5): training is under way, the handler is installed
        # ("/" would match the model-loading bar, and a SIGTERM then kills the process before training starts)
        _wait_for(log, "{'loss':")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert "received SIGTERM" in log.read_text()
    ckpts = list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").exists()
    assert int(ckpts[0].name.split("-")[1]) >= 5  # saved at the step where it stopped, after the logged one
    assert not (tmp_path / "run" / "DONE").exists()
    res = cli("train", str(path))
    assert res.returncode == 0 and f"resuming from {ckpts[0]}" in res.stdout, res.stdout + res.stderr
    assert (tmp_path / "run" / "DONE").exists()
