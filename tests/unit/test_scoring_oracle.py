"""Every scoring path against the independent oracle (tests/oracle.py: the model's own loss with labels),
for each of the 8 PEFT methods, built through multitune.modeling.load and MultitaskTrainer as training builds
them, in fp32: likelihood scores, the pruned trie search, chat loss and the accuracy logged in training.

Adapters are perturbed so that they change the scores (LoRA's B starts at zero, IA3 at one). The
oracle's inputs come from the tokenizer's own chat template, not from multitune.data.formatting.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import set_seed

from multitune.config import config_from_dict
from multitune.data.load import load_tasks, subsample
from multitune.data.formatting import Formatter
from multitune.modeling.load import apply_peft, load_model
from multitune.rundir import RunDir
from multitune.scoring.scorer import Scorer
from tests import oracle
from tests.conftest import tiny_config

METHODS = ["lora", "qlora", "dora", "rslora", "ia3", "prompt_tuning", "prefix_tuning", "full"]
ROWS = 3  # validation rows per task: every (row, label) pair is one oracle forward pass
LABELLED = ("banking77", "commonsense_qa")  # 12 labels of 2-6 tokens sharing prefixes; 5 one-letter choices


def _rtol(method: str) -> float:
    # bitsandbytes' CPU kernel computes the 4-bit matmul in bf16 on CPUs with AVX512-BF16, even for fp32
    # inputs (a 1e-6 change of an input moves an output by 8e-3), so QLoRA's own forward passes agree
    # only to ~1e-5 relative across sequence lengths; every other method agrees to ~1e-7
    return 1e-4 if method == "qlora" else 1e-5


def _config(assets, tmp_path, method: str):
    raw = tiny_config(assets, tmp_path / "run", eval_rows_during_training=ROWS)
    raw["peft"].update(method=method, num_virtual_tokens=4)
    raw["tasks"][1]["template"] = "minimal"  # short prompts: the oracle's passes are the cost of this test
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def data(assets, tmp_path_factory):
    cfg = _config(assets, tmp_path_factory.mktemp("oracle"), "lora")
    return {td.task.name: td for td in load_tasks(cfg, None, create=True)}


def _model(cfg):
    set_seed(0)
    model = apply_peft(load_model(cfg, for_training=True), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and cfg.peft.method != "full":
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _trainer(cfg, model, tokenizer, tmp_path, task_data):
    from multitune.training.args import sft_config
    from multitune.training.lm import MultitaskTrainer

    formatter = Formatter(tokenizer, cfg.model.max_length)
    enc = formatter.encode(task_data[0].train[:4])
    train = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "labels": enc["labels"]})
    return MultitaskTrainer(model=model, args=sft_config(cfg, RunDir(tmp_path / "run")), train_dataset=train,
                            eval_dataset={}, processing_class=tokenizer, task_data=task_data, formatter=formatter, cfg=cfg)


@pytest.mark.parametrize("method", METHODS)
def test_every_score_equals_the_models_own_loss(assets, tokenizer, tmp_path, data, method, monkeypatch):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = _config(assets, tmp_path, method)
    labelled = [data[name] for name in LABELLED]
    trainer = _trainer(cfg, _model(cfg), tokenizer, tmp_path, labelled)
    model = trainer.model.eval()
    # TRL casts a 4-bit model's adapters to bf16; multitune trains every method's adapters in fp32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    scorer = Scorer(model, Formatter(tokenizer, cfg.model.max_length), batch_size=2)
    expected = {}
    for td in labelled:
        rows = subsample(td.val, ROWS, cfg.seed)  # the rows the trainer scores at each evaluation
        expected[td.task.name] = oracle.logprobs(model, *oracle.chat_inputs(tokenizer, rows, td.task.label_names))
        # likelihood scoring (one trie pass, or full sequences for prompt learning): every candidate's score
        torch.testing.assert_close(scorer.likelihood(rows, td.task.label_names), expected[td.task.name], atol=1e-4,
                                   rtol=_rtol(method), msg=lambda m, name=td.task.name: f"{name}: {m}")

    # the pruned search over the label trie (banking77's labels), forced even for this small label set
    td, best = labelled[0], expected[labelled[0].task.name].max(-1)
    scorer.ONE_PASS_NODES = 0
    idx, values = scorer.best_labels(subsample(td.val, ROWS, cfg.seed), td.task.label_names)
    assert idx == best.indices.tolist()
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), best.values, atol=1e-4, rtol=_rtol(method))

    # chat loss: the token-weighted mean NLL of the responses
    rows = data["chat"].val[:ROWS]
    prompts, _ = oracle.chat_inputs(tokenizer, rows, [])
    completions = [tokenizer(ex.target + "<|eot_id|>", add_special_tokens=False)["input_ids"] for ex in rows]
    expected_loss = oracle.mean_loss(model, [p + c for p, c in zip(prompts, completions, strict=True)],
                                     [[oracle.IGNORE] * len(p) + c for p, c in zip(prompts, completions, strict=True)])
    assert scorer.loss(rows)["loss"] == pytest.approx(expected_loss, abs=1e-4, rel=_rtol(method))

    # the accuracy the trainer logs at each evaluation, with each row's prediction recorded on the way
    predicted = []
    real = Scorer.predict_labels

    def spy(self, *args, **kwargs):
        pred, scores = real(self, *args, **kwargs)
        predicted.append(pred)
        return pred, scores

    monkeypatch.setattr(Scorer, "predict_labels", spy)
    model.train()  # as the trainer holds it between steps
    logged = trainer.evaluate()
    assert model.training  # handed back in training mode
    assert len(predicted) == len(labelled)
    for td, got in zip(labelled, predicted, strict=True):
        rows = subsample(td.val, ROWS, cfg.seed)
        assert got == expected[td.task.name].argmax(-1).tolist(), td.task.name
        accuracy = sum(p == ex.label for p, ex in zip(got, rows, strict=True)) / len(rows)
        assert logged[f"eval_{td.task.name}_accuracy"] == pytest.approx(accuracy), td.task.name


def test_pruned_search_keeps_the_exact_argmax_in_bf16(assets, tokenizer, data):
    """In bf16 the search's cached, incremental passes and the oracle's full passes round differently
    (~1e-2 on a summed log-prob); the prediction must still be the label the model's own loss ranks
    first, up to that rounding."""
    import peft
    from transformers import AutoModelForCausalLM

    set_seed(0)
    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)  # varied predictions, some close calls
    model.eval()
    td = data["banking77"]
    rows = td.val[:8]
    expected = oracle.logprobs(model, *oracle.chat_inputs(tokenizer, rows, td.task.label_names))
    scorer = Scorer(model, Formatter(tokenizer, 192), batch_size=8)
    scorer.ONE_PASS_NODES = 0
    idx, _ = scorer.best_labels(rows, td.task.label_names)
    assert len(set(idx)) > 1
    # the search is exact, so it picks the oracle's argmax; only where the oracle's own top two are closer than
    # bf16's rounding (0.02 nats here) may it pick the runner-up
    top2 = expected.topk(2, dim=-1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > 0.02
    assert clear.sum() >= len(rows) // 2  # most rows are decided: the equality below is not vacuous
    assert [i for i, c in zip(idx, clear.tolist(), strict=True) if c] == top2.indices[clear, 0].tolist()
    chosen = expected[torch.arange(len(rows)), torch.tensor(idx)]
    assert (chosen >= expected.max(-1).values - 0.02).all(), (idx, expected.argmax(-1).tolist())
