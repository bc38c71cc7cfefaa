"""One tiny training (claims + chat on dolly-schema rows) reporting to an offline wandb run: the plots in the run
directory and report.md, the per-task metrics and prediction tables in the wandb run's own files, and
`multitune chat --input` answering as greedy decoding of the trained model does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multitune.config import config_from_dict
from multitune.launch.runner import train
from tests.conftest import tiny_config
from tests.unit.test_chat_task import write_dolly
from tests.unit.test_eval_modes import assert_plots_linked
from tests.wandb_offline import history

pytestmark = pytest.mark.slow
EVAL_ROWS = 8


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> Path:
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("reports")
    raw = tiny_config(assets, root / "run", max_steps=4, eval_steps=2, save_steps=10, eval_rows_during_training=EVAL_ROWS)
    raw["tasks"] = [raw["tasks"][0], {"name": "chat", "dataset": str(write_dolly(root / "dolly.jsonl", copies=6)), "weight": 0.5}]
    raw["train"].update(report_to="wandb", wandb={"project": "multitune-test"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        train(config_from_dict(raw))
    return root / "run"


def test_end_of_training_writes_valid_plots_linked_from_the_report(trained):
    assert_plots_linked(trained / "report.md", ["training.png", "claims-confusion.png", "claims-f1.png"])
    metrics = json.loads((trained / "metrics.json").read_text())
    assert 0 <= metrics["claims"]["ece"] <= 1 and "predictions" not in metrics["claims"]


def _rows_with(rows, key):
    return [r for r in rows if key in r]


def test_wandb_offline_run_holds_per_task_metrics_and_prediction_tables(trained):
    (run_dir,) = (trained / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    accuracy = {r["train/global_step"]: r["eval/claims_accuracy"] for r in _rows_with(rows, "eval/claims_accuracy")}
    assert sorted(accuracy) == [2, 4]  # at each evaluation during training
    assert {r["train/global_step"] for r in _rows_with(rows, "eval/claims_ece")} == {2, 4}
    tables = {r["train/global_step"]: r for r in _rows_with(rows, "eval/claims_predictions/path")}
    assert sorted(tables) == [2, 4]
    labels = {"Claim", "Not a Claim"}
    for step, row in tables.items():
        assert row["eval/claims_predictions/_type"] == "table-file"
        table = json.loads((run_dir / "files" / row["eval/claims_predictions/path"]).read_text())
        assert table["columns"] == ["text", "gold", "predicted", "score"] and len(table["data"]) == EVAL_ROWS
        assert all(isinstance(t, str) and t and g in labels and p in labels and 0 < s <= 1 for t, g, p, s in table["data"])
        # the table is the evaluation that logged the accuracy
        assert sum(g == p for _, g, p, _ in table["data"]) / EVAL_ROWS == pytest.approx(accuracy[step])
    (final,) = _rows_with(rows, "final/claims_accuracy")
    assert final["final/claims_accuracy"] == pytest.approx(json.loads((trained / "metrics.json").read_text())["claims"]["accuracy"])
    images = {k.split("/")[1] for k, v in final.items() if k.startswith("plots/") and k.endswith("/_type") and v == "image-file"}
    assert images == {"training", "claims-confusion", "claims-f1"}
    for name in images:
        assert (run_dir / "files" / final[f"plots/{name}/path"]).read_bytes()[:4] == b"\x89PNG"


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    """The oracle: greedy decoding by hand, one full forward pass per token, from the tokenizer's own template."""
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    stop = {tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id}
    new: list[int] = []
    for _ in range(n):
        t = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        new.append(t)
        if t in stop:
            break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_chat_input_answers_each_prompt_as_greedy_decoding_does(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["What is the capital of France?", "Who wrote Hamlet?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    res = subprocess.run([sys.executable, "-m", "multitune.cli", "chat", str(trained), "--input", str(tmp_path / "prompts.txt"),
                          "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    model = AutoModelForCausalLM.from_pretrained(trained / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(trained / "final")
    assert res.stdout == "".join(f">>> {p}\n{_greedy(model, tokenizer, p, 8)}\n\n" for p in prompts)


def test_chat_streams_each_token_as_it_comes(trained):
    from multitune.results.converse import open_chat

    class Recorder:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.puts.append("end")

    session = open_chat(trained, max_new_tokens=6)
    rec = Recorder()
    answer = session.reply("Who wrote Hamlet?", rec)
    generated = [p for p in rec.puts[1:-1]]  # first the prompt, then one token per step, then the end
    assert rec.puts[-1] == "end" and len(generated) >= 2 and all(len(p) == 1 for p in generated)
    assert session.formatter.tokenizer.decode([t for p in generated for t in p], skip_special_tokens=True) == answer
    assert session.history[-1] == {"role": "assistant", "content": answer.strip()}  # the next turn sees this one
