"""Every PEFT method trains a few steps, saves, reloads and scores through the same pipeline."""

import json

import pytest

from multitune.cli import eval_
from multitune.config import config_from_dict
from multitune.data.load import load_tasks
from multitune.modeling.load import load_for_inference, load_tokenizer
from multitune.rundir import RunDir
from multitune.launch.runner import train
from tests import oracle
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "full"])
def test_method_trains_and_evaluates(assets, tmp_path, method):
    pytest.importorskip("bitsandbytes") if method == "qlora" else None
    raw = tiny_config(assets, tmp_path / "run", max_steps=3, save_steps=2, eval_rows_during_training=0, learning_rate=2e-3)
    raw["peft"]["method"] = method
    raw["tasks"] = raw["tasks"][:3]
    raw["tasks"][1]["max_rows"] = 60
    results = train(config_from_dict(raw))
    assert set(results) == {"claims", "banking77", "commonsense_qa"}
    # the accuracies measured at the end of training, and again from the saved weights reloaded (base +
    # adapter), are the oracle's on the reloaded model: the argmax of each label's summed log-prob from
    # the model's own loss (banking77's 12 labels x rows are left out for time)
    eval_(tmp_path / "run", mode=None, max_rows=None)
    reloaded = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = RunDir(tmp_path / "run")
    cfg = run.load_config()
    model = load_for_inference(cfg, run.final)
    tokenizer = load_tokenizer(cfg.model, None, source=str(run.final))
    for td in load_tasks(cfg, run.splits, create=False):
        if td.task.name != "banking77":
            name = td.task.name
            oracle.accuracy_check(model, tokenizer, td.val, td.task.label_names, results[name]["accuracy"], reloaded[name]["accuracy"])
    final = tmp_path / "run" / "final"
    assert (final / ("config.json" if method == "full" else "adapter_config.json")).exists()
    if method != "full":
        adapter = json.loads((final / "adapter_config.json").read_text())
        expected = {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING", "ia3": "IA3"}.get(method, "LORA")
        assert adapter["peft_type"] == expected
        if method == "dora":
            assert adapter["use_dora"]
        if method == "rslora":
            assert adapter["use_rslora"]


def test_last_n_layers_adapts_only_those_layers(assets, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from multitune.modeling.load import apply_peft

    raw = tiny_config(assets, tmp_path / "run")
    raw["peft"].update(method="lora", last_n_layers=1, target_modules="attention")
    model = apply_peft(AutoModelForCausalLM.from_pretrained(assets["model"]), config_from_dict(raw))
    assert isinstance(model, peft.PeftModel)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}  # the tiny model has 2 layers
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in names)
