"""The offline demo's generated data (multitune.commands.tiny)."""

import re

import datasets

from multitune.commands import tiny


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


def test_the_demo_uses_that_data_and_rebuilds_its_model_when_the_data_changed(tmp_path, monkeypatch):
    from multitune.commands import demo

    built, generate = [], tiny.synthetic_datasets

    def fake_model(out, texts, **kw):  # what make_tiny_model leaves behind, in a blink
        (out.mkdir(parents=True, exist_ok=True), (out / "config.json").write_text("{}"))
        built.append(any("Milk stays cold in the refrigerator." in t for t in texts))

    monkeypatch.setattr(tiny, "make_tiny_model", fake_model)
    demo.prepare_offline(tmp_path)
    demo.prepare_offline(tmp_path)  # the same data: the model is kept
    assert built == [True]  # the demo's questions carry their sentences
    demo.prepare_offline(tmp_path, mc_context=False)  # other data (a workdir made before the sentences): built again
    assert built == [True, False]
    monkeypatch.setattr(tiny, "synthetic_datasets", lambda *a, **kw: generate(*a, **{**kw, "seed": 1}))
    demo.prepare_offline(tmp_path, mc_context=False)
    assert built == [True, False, False]


def _all_strings(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return set().union(*(_all_strings(v) for v in items)) if items else set()


def test_the_demo_model_never_sees_its_validation_rows(tmp_path, monkeypatch):
    """As `make-tiny-model --config`: the demo's tiny model is trained on the training rows of the split the demo's
    run makes, never its validation rows (else its zero-shot and fine-tuned scores on them are inflated)."""
    from multitune.commands import demo
    from multitune.config import config_from_dict
    from multitune.data.load import load_tasks

    seen: set[str] = set()

    def fake_model(out, texts, **kw):
        (out.mkdir(parents=True, exist_ok=True), (out / "config.json").write_text("{}"))
        seen.update(texts)

    monkeypatch.setattr(tiny, "make_tiny_model", fake_model)
    cfg = demo.prepare_offline(tmp_path)
    assert cfg.model_dump() == config_from_dict(demo.offline_config(tmp_path)).model_dump()
    for td in load_tasks(cfg, None, create=True):  # the split `train` makes for this config (deterministic)
        rows = td.task.load(None)
        train = set().union(*(_all_strings(rows[i]) for i in td.split["train"]))
        val_only = set().union(*(_all_strings(rows[i]) for i in td.split["val"])) - train
        assert val_only, td.task.name  # each task has validation text a leak would show
        assert train <= seen and not val_only & seen, td.task.name
