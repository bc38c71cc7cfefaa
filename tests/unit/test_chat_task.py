"""The chat task's built-in default, databricks-dolly-15k, in its own schema (a local jsonl: the mirror has none):
`context` folded into the prompt when a row has it, over-long answers left out, the Llama configs train it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from multitune.config import TaskConfig
from multitune.errors import UserError
from multitune.data.formatting import Formatter
from multitune.tasks import BUILTIN, build_task

REPO = Path(__file__).resolve().parents[2]
FACTS = [("What is the capital of France?", "Paris is the capital of France.", "France is a country in Europe. Its capital is Paris."),
         ("Name a colour of the sky.", "The sky is blue.", ""),
         ("Summarise the passage.", "A cat sat on a mat.", "Once upon a time a cat sat on a mat all day long."),
         ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", "")]


def write_dolly(path: Path, copies: int = 1) -> Path:
    """Rows in databricks-dolly-15k's schema: instruction, context (often empty), response, category."""
    rows = [{"instruction": q, "context": c, "response": a, "category": "closed_qa" if c else "open_qa"}
            for _ in range(copies) for q, a, c in FACTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_defaults_to_dolly_and_the_llama_configs_train_it():
    assert BUILTIN["chat"]["dataset"] == "databricks/databricks-dolly-15k"
    for name in ("llama3-8b-lora.yaml", "llama3-8b-qlora.yaml"):
        tasks = {t["name"]: t for t in yaml.safe_load((REPO / "configs" / name).read_text())["tasks"]}
        assert "dataset" not in tasks["chat"] and 0 < tasks["chat"]["weight"] < 1  # the built-in default, weighted


def test_context_is_folded_into_the_prompt_when_present(tmp_path, tokenizer):
    task = build_task(TaskConfig(name="chat", dataset=str(write_dolly(tmp_path / "dolly.jsonl"))))
    ds = task.load(None)
    assert task.context_col == "context" and task.columns() == ["instruction", "response", "context"]
    with_ctx, without = task.example(ds[0]), task.example(ds[1])
    assert with_ctx.messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert with_ctx.messages[-1]["content"] == ("What is the capital of France?\n\nContext:\n"
                                                "France is a country in Europe. Its capital is Paris.")
    assert with_ctx.target == "Paris is the capital of France."
    assert without.messages[-1]["content"] == "Name a colour of the sky." and "Context" not in str(without.messages)
    # too long: the request and the context are cut, never the answer
    f = Formatter(tokenizer, 80)
    long = task.example({"instruction": "Summarise the passage.", "context": "word " * 300, "response": "short."})
    (ids,) = f.prompt_ids([long], reserve=8)
    assert len(ids) <= 72 and "Context:" in tokenizer.decode(ids)


def test_predict_input_with_context_and_without(tmp_path):
    task = build_task(TaskConfig(name="chat", dataset=str(write_dolly(tmp_path / "dolly.jsonl"))))
    task.load(None)
    ex = task.example_from_input({"instruction": "Who?", "context": "Bob did it."})
    assert ex.messages[-1]["content"] == "Who?\n\nContext:\nBob did it."
    assert task.example_from_input("Who?").messages[-1]["content"] == "Who?"


def test_long_answers_are_left_out(tmp_path):
    path = write_dolly(tmp_path / "dolly.jsonl")
    task = build_task(TaskConfig(name="chat", dataset=str(path), max_answer_chars=18))
    kept = task.load(None)
    assert list(kept["response"]) == [a for _, a, _ in FACTS if len(a) <= 18] == ["The sky is blue."]
    with pytest.raises(UserError, match="no row has an answer of at most 5 characters"):
        build_task(TaskConfig(name="chat", dataset=str(path), max_answer_chars=5)).load(None)
