"""Packed training rows must train each example as if it were alone, through our collator path.

`train.packing` hands TRL's SFTTrainer the tokenised stream; its BFD packing concatenates examples into
one row with restarting position_ids, and transformers turns those into a block-diagonal mask only when
no KV cache is built. This takes a batch from the trainer's own dataloader, as training does, and
checks the loss the trainer computes on it against the oracle: each packed example's NLL from the
model's own loss with the example alone (tests/oracle.py).
"""

import itertools

import pytest
import torch

from multitune.config import config_from_dict
from multitune.data.formatting import Formatter
from multitune.modeling.load import load_model
from multitune.data.prepared import prepare
from multitune.rundir import RunDir
from tests import oracle
from tests.conftest import tiny_config


def test_a_packed_batch_trains_each_example_as_if_alone(assets, tokenizer, tmp_path):
    from multitune.training.args import sft_config
    from multitune.training.lm import MultitaskTrainer

    raw = tiny_config(assets, tmp_path / "run", packing=True, batch_size=4, eval_rows_during_training=0)
    raw["tasks"] = raw["tasks"][:2]
    cfg = config_from_dict(raw)
    formatter = Formatter(tokenizer, cfg.model.max_length)
    prepared = prepare(cfg, formatter, None)
    trainer = MultitaskTrainer(model=load_model(cfg, for_training=True), args=sft_config(cfg, RunDir(tmp_path / "run")),
                               train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tokenizer,
                               task_data=prepared.data, formatter=formatter, cfg=cfg)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1  # padding-free: the batch is one packed row
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) - 1 >= 4  # several examples share the row
    rows = {tuple(ids): labels for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"], strict=True)}
    total, count = 0.0, 0
    for a, b in itertools.pairwise(starts):
        ids, labels = batch["input_ids"][0, a:b].tolist(), batch["labels"][0, a:b].tolist()
        assert rows.get(tuple(ids)) == labels  # each segment is one training example, its labels intact
        nll, n = oracle.summed_nll(trainer.model, ids, labels)
        total, count = total + nll, count + n
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(total / count, abs=1e-4)
