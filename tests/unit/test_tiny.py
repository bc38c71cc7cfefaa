"""The offline demo's generated data (multitune.tiny)."""

import re

import datasets

from multitune import tiny


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_demo_multiple_choice_is_a_reading_task(tmp_path):
    """With ``mc_context`` each question follows a sentence naming its answer and none of its distractors, so a
    tiny model can read the answer off the prompt; without it, it must also recall 16 facts (it stayed at chance)."""
    plain = datasets.load_dataset("parquet", data_files=str(tiny.synthetic_datasets(tmp_path / "a", per_class=4)["commonsense_qa"]
                                                             / "train.parquet"), split="train")
    read = datasets.load_dataset("parquet", data_files=str(tiny.synthetic_datasets(tmp_path / "b", per_class=4, mc_context=True)
                                                            ["commonsense_qa"] / "train.parquet"), split="train")
    assert len(read) == len(plain) == 40
    for p, r in zip(plain, read, strict=True):
        gold = r["choices"]["text"]["ABCDE".index(r["answerKey"])]
        context = r["question"].removesuffix(p["question"])
        assert r["question"].endswith(p["question"]) and context.strip()  # the same question, after its sentence
        named = [c for c in r["choices"]["text"] if c in _words(context)]
        assert named == [gold], (r["question"], r["choices"]["text"])
        assert gold not in _words(p["question"]) and p["choices"] == r["choices"]  # only the sentence names it
