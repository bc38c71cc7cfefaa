"""From a finished tiny run to a published model, with no network: the push dry-run folder, the merged export,
the model card, Hub checkpoints and resume from them, and no secret anywhere. One small run serves all tests.

The independent oracle for predictions is plain transformers scoring each answer's summed log-probability
after the prompt the model card shows (placeholders filled in): if the card's prompts or the published weights
were not exactly the trained ones, the labels or probabilities would differ from the run's own `predict`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from multitune.config import config_from_dict
from multitune.training.hub_checkpoints import wait_for_uploads
from multitune.rundir import RunDir
from tests.conftest import tiny_config
from tests.fake_hub import FakeHub, install

pytestmark = pytest.mark.slow
HF_SECRET = "hf_PLANTEDsecretTOKEN0123456789"
WANDB_SECRET = "planted-wandb-api-key-0123456789abcdef"
BANKING = ["I still have not received my new card", "How do I top up with a cheque?", "my transfer was declined again"]
CSQA = [{"question": "Where would you keep milk cold?", "choices": {"label": list("ABCDE"),
         "text": ["oven", "fridge", "garden", "library", "car"]}}]

ORACLE = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

def classify(model, tok, messages, answers, eot):
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
    scores = []
    for answer in answers:
        completion = tok(answer + eot, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        scores.append(logp[torch.arange(len(completion)), torch.tensor(completion)].sum().item())
    probs = torch.tensor(scores).softmax(-1)
    best = int(probs.argmax())
    return {"label": answers[best], "score": round(float(probs[best]), 4)}

def run(model, tok, jobs):
    return [classify(model, tok, j["messages"], j["answers"], j["eot"]) for j in jobs]
'''


def card_prompts(card: str) -> dict[str, dict]:
    """Each task's messages (JSON block), answers and end-of-turn text, read back from the model card."""
    out = {}
    for name, body in re.findall(r"### `(\w+)` \(\w+\)\n(.*?)(?=\n### |\n## )", card, re.S):
        messages = json.loads(re.search(r"```json\n(.*?)\n```", body, re.S).group(1))
        out[name] = {"messages": messages}
    eot = re.search(r"completion = tok\(answer \+ '(.*?)', add_special_tokens", card).group(1)
    return {k: {**v, "eot": eot} for k, v in out.items()}


def jobs_for(card: str, answers: dict[str, list[str]]) -> list[dict]:
    prompts, jobs = card_prompts(card), []
    for text in BANKING:
        msgs = json.loads(json.dumps(prompts["banking77"]["messages"]).replace("{text}", text))
        jobs.append({"messages": msgs, "answers": answers["banking77"], "eot": prompts["banking77"]["eot"]})
    for row in CSQA:
        raw = json.dumps(prompts["commonsense_qa"]["messages"]).replace("{question}", row["question"])
        for letter, text in zip(row["choices"]["label"], row["choices"]["text"], strict=True):
            raw = raw.replace(f"{{choice {letter}}}", text)
        jobs.append({"messages": json.loads(raw), "answers": answers["commonsense_qa"], "eot": prompts["commonsense_qa"]["eot"]})
    return jobs


def _adapter_and_log(run_dir: Path) -> tuple[bytes, list]:
    logs = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    # wall-clock keys (train_runtime, *_per_second) ride on the last log row and differ run to run
    timed = ("runtime", "per_second")
    rows = [{k: v for k, v in e.items() if not any(t in k for t in timed)} for e in logs if "loss" in e]
    return (run_dir / "final" / "adapter_model.safetensors").read_bytes(), rows


@pytest.fixture(scope="module")
def published(assets, tmp_path_factory):
    from multitune.publishing.export import export
    from multitune.results.predict import predict, restore_task
    from multitune.publishing.publish import push
    from multitune.launch.runner import train

    root = tmp_path_factory.mktemp("publish")
    base = root / "base"  # the tiny model with a model card that declares a licence, as a Hub model has
    shutil.copytree(assets["model"], base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny base\n")
    raw = tiny_config(assets, root / "run", max_steps=6, save_steps=2, save_total_limit=2, eval_rows_during_training=0,
                      hub_checkpoints=True)
    raw["model"]["name_or_path"] = str(base)
    raw["peft"] = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1}
    raw["tasks"] = [{"name": "banking77", "dataset": str(assets["banking77"]), "max_rows": 231, "max_eval_rows": 24},
                    {"name": "commonsense_qa", "dataset": str(assets["commonsense_qa"]), "max_rows": 60, "max_eval_rows": 12},
                    {"name": "chat", "dataset": str(assets["chat"]), "weight": 0.5, "max_eval_rows": 8}]
    raw["hub"] = {"repo_id": "me/tiny-multitask"}
    cfg = config_from_dict(raw)
    out = SimpleNamespace(root=root, cfg=cfg, run=RunDir(root / "run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", HF_SECRET)
        mp.setenv("WANDB_API_KEY", WANDB_SECRET)
        out.hub = install(mp, FakeHub(root / "hub"))
        train(cfg)
        wait_for_uploads()
        out.remote_after_run = out.hub.files("me/tiny-multitask-checkpoints")
        out.preds = {"banking77": predict(out.run.root, "banking77", BANKING), "commonsense_qa": predict(out.run.root, "commonsense_qa", CSQA)}
        out.answers = {n: restore_task(out.run, n).label_names for n in ("banking77", "commonsense_qa")}
        out.plots = {p.name: p.read_bytes() for p in (out.run.root / "plots").glob("*.png")}  # they travel with the run
        push(out.run, cfg, dry_run=root / "dry")
        export(out.run, cfg, root / "merged", merged=True)
        out.uninterrupted = _adapter_and_log(out.run.root)

        # the pod is lost after checkpoint-4 reached the Hub and before checkpoint-6 did
        ckpts = "me/tiny-multitask-checkpoints"
        shutil.rmtree(out.hub.repo(ckpts) / "run" / "checkpoints" / "checkpoint-6")
        # resume from the local disk ...
        for name in ("final", "DONE", "metrics.json", "report.md", "trainer_state.json", "launch.json", "checkpoints/checkpoint-6"):
            path = out.run.root / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        train(cfg)
        wait_for_uploads()
        out.local_resume = _adapter_and_log(out.run.root)
        shutil.rmtree(out.hub.repo(ckpts) / "run" / "checkpoints" / "checkpoint-6")
        # ... and on a fresh pod, from the Hub alone
        shutil.rmtree(out.run.root)
        train(cfg)
        wait_for_uploads()
        out.hub_resume = _adapter_and_log(out.run.root)
        out.hub_resume_state = json.loads(next((out.run.checkpoints).glob("checkpoint-4/trainer_state.json")).read_text())
    return out


def test_checkpoints_reached_the_private_hub_repo(published):
    assert published.hub.repos["me/tiny-multitask-checkpoints"] is True
    steps = {f.split("/")[2] for f in published.remote_after_run if "/checkpoints/" in f}
    assert steps == {"checkpoint-4", "checkpoint-6"}  # newest save_total_limit=2 kept
    assert {"run/config.yaml", "run/splits/banking77.json", "run/checkpoints/checkpoint-6/COMPLETE"} <= set(published.remote_after_run)


def test_resume_from_the_hub_equals_resume_from_local_disk(published):
    """Both resumed from checkpoint-4 (the Hub copy on an empty run dir) and end bitwise equal, and equal to the
    uninterrupted run: the upload carried everything a resume needs (weights, optimizer, scheduler, RNG, split)."""
    assert published.hub_resume_state["global_step"] == 4
    # exact on purpose: the same computation (same process, same inputs, the RNG restored) repeated, which a
    # resume must reproduce bit for bit; a tolerance would hide a lost optimizer or RNG state
    assert published.hub_resume[1] and published.hub_resume[1] == published.local_resume[1]
    assert published.hub_resume[0] == published.local_resume[0] == published.uninterrupted[0]
    # per-step values match the uninterrupted run too (its logged loss averages the steps before the resume as well)
    per_step = [{k: e[k] for k in ("step", "grad_norm", "learning_rate")} for e in published.hub_resume[1]]
    assert per_step == [{k: e[k] for k in ("step", "grad_norm", "learning_rate")} for e in published.uninterrupted[1] if e["step"] > 4]


def test_dry_run_folder_reloads_with_peft_and_predicts_like_the_run(published):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dry = published.root / "dry"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "metrics.json",
            "multitune.yaml"} <= {p.name for p in dry.iterdir()}
    assert "training.png" in published.plots and {n: (dry / "plots" / n).read_bytes() for n in published.plots} == published.plots
    namespace: dict = {}
    exec(ORACLE, namespace)
    base = AutoModelForCausalLM.from_pretrained(published.cfg.model.name_or_path)
    model = peft.PeftModel.from_pretrained(base, str(dry)).eval()
    got = namespace["run"](model, AutoTokenizer.from_pretrained(dry), jobs_for((dry / "README.md").read_text(), published.answers))
    want = published.preds["banking77"] + published.preds["commonsense_qa"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    # one sequence at a time here, batched with padding in `predict`: float sums differ in the last bits
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=2e-4)


def test_merged_export_loads_without_peft_and_predicts_like_the_run(published):
    merged = published.root / "merged"
    assert not (merged / "adapter_config.json").exists() and "quantization_config" not in json.loads((merged / "config.json").read_text())
    jobs = jobs_for((merged / "README.md").read_text(), published.answers)
    script = ("import sys\nsys.modules['peft'] = None  # PEFT uninstalled: importing it fails\n" + ORACLE +
              f"\nmodel = AutoModelForCausalLM.from_pretrained({str(merged)!r}).eval()\n"
              f"print(json.dumps(run(model, AutoTokenizer.from_pretrained({str(merged)!r}), json.loads(sys.stdin.read()))))\n")
    res = subprocess.run([sys.executable, "-c", script], input=json.dumps(jobs), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    want = published.preds["banking77"] + published.preds["commonsense_qa"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=2e-4)  # W + BA summed once: rounding


def test_model_card_header_and_results_read_back_by_huggingface_hub(published):
    from huggingface_hub import ModelCard

    text = (published.root / "dry" / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    # the tiny base is a local folder: no Hub id to name, and the builder's path never reaches the card
    assert "base_model" not in header and header["library_name"] == "peft"
    assert str(published.cfg.model.name_or_path) not in text
    assert header["license"] == "apache-2.0"  # inherited from the base model's card
    assert {"multitune", "lora", "multi-task"} <= set(header["tags"])
    metrics = json.loads((published.root / "dry" / "metrics.json").read_text())
    expected = set()
    for task, r in metrics.items():
        pairs = [("loss", "loss"), ("perplexity", "perplexity")] if r["kind"] == "chat" else [("accuracy", "accuracy"), ("f1", "macro_f1")]
        expected |= {(task, metric, round(r[key], 6)) for metric, key in pairs}
    in_yaml = {(res["task"]["name"], m["type"], m["value"]) for res in header["model-index"][0]["results"] for m in res["metrics"]}
    assert in_yaml == expected
    card = ModelCard.load(published.root / "dry" / "README.md")
    assert {(e.task_name, e.metric_type, e.metric_value) for e in card.data.eval_results} == expected
    for task in ("banking77", "commonsense_qa", "chat"):
        assert f"### `{task}`" in text
    assert "vllm serve" in text and "PeftModel.from_pretrained" in text


def test_merged_card_says_transformers(published):
    header = yaml.safe_load((published.root / "merged" / "README.md").read_text().split("---\n")[1])
    assert header["library_name"] == "transformers" and "merged" in header["tags"]


def test_no_secret_in_any_file_written(published):
    """HF_TOKEN and WANDB_API_KEY were set through the run, the Hub uploads, the dry-run and the export."""
    written = [p for p in published.root.rglob("*") if p.is_file()]
    assert len(written) > 50
    for path in written:
        data = path.read_bytes()
        assert HF_SECRET.encode() not in data and WANDB_SECRET.encode() not in data, path
