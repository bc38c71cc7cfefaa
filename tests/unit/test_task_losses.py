"""loss/<task> in a joint run's log: each task's training loss, from the supervised loss path.

The oracle is the model's own loss with labels on that task's examples alone (the mean NLL over its
supervised tokens), against what TaskLosses records from one mixed, padded batch.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from multitune.modeling.loss import TAGS, TaskLosses, supervised_loss


def _examples():
    g = torch.Generator().manual_seed(1)
    rows = []
    for task, n, a in [("claims", 9, 2), ("chat", 14, 6), ("claims", 6, 3), ("banking77", 11, 2), ("chat", 8, 4)]:
        ids = torch.randint(3, 40, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n - a) + ids[n - a:], "task": task})
    return rows


def test_each_tasks_loss_equals_the_models_own_loss_on_its_examples():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    names = ["claims", "banking77", "chat"]
    losses = TaskLosses(names, padding_free=False)
    collate = losses.collator(DataCollatorForLanguageModeling(pad_token_id=0))
    batch = collate([dict(r) for r in _examples()])
    tags = batch.pop(TAGS)
    model.train()  # recorded in training only; no dropout in this config
    _, logits, targets = supervised_loss(model, batch)
    losses.recorder(batch["labels"], tags)(logits, targets)
    logged = losses.window(Accelerator(cpu=True))
    model.eval()
    for name in names:
        rows = [r for r in _examples() if r["task"] == name]
        own = DataCollatorForLanguageModeling(pad_token_id=0)([{k: v for k, v in r.items() if k != "task"} for r in rows])
        with torch.no_grad():
            expected = model(**own).loss.item()  # mean NLL over the task's supervised tokens
        assert logged[f"loss/{name}"] == pytest.approx(expected, abs=1e-4), name
    assert losses.window(Accelerator(cpu=True)) == {}  # the window starts again: no tokens, no keys


def test_evaluation_batches_are_left_untagged():
    losses = TaskLosses(["a", "b"], padding_free=False)
    batch = losses.collator(DataCollatorForLanguageModeling(pad_token_id=0))([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    assert TAGS not in batch
