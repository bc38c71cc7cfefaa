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
from transformers import AutoModelForCausalLM

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


def _largest_allocation(fn) -> int:
    """The largest block of memory any one op (or compiled region) allocated while ``fn`` ran, from the profiler's
    allocator records; FlexAttention's mask and kernel are compiled code, which this sees as well."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_packed_rows_on_flex_attention_equal_the_rows_alone_without_a_t_by_t_mask(assets, tokenizer, tmp_path):
    """FlexAttention (what model.attn_implementation: auto gives packed rows on a GPU without flash-attn) on one
    padding-free row of the trainer's own packed batch: the training loss equals the oracle on each example alone
    (an SDPA model, no packing), each example's logits equal its logits alone, and no op allocates T x T bytes, the
    size of the boolean block mask SDPA builds (the probe sees it there). The CPU runs FlexAttention's forward only
    (torch 2.13 has no CPU backward); its backward, and flash-attn's varlen kernel, are GPU-only and not run here."""
    from torch.nn.attention.flex_attention import BlockMask

    from multitune.training.args import sft_config
    from multitune.training.lm import MultitaskTrainer

    raw = tiny_config(assets, tmp_path / "run", packing=True, batch_size=16, eval_rows_during_training=0)
    raw["tasks"] = raw["tasks"][:2]
    raw["model"]["attn_implementation"] = "flex_attention"
    cfg = config_from_dict(raw)
    formatter = Formatter(tokenizer, cfg.model.max_length)
    prepared = prepare(cfg, formatter, None)
    flex = load_model(cfg)  # the forward only: for_training would refuse FlexAttention on the CPU
    trainer = MultitaskTrainer(model=flex, args=sft_config(cfg, RunDir(tmp_path / "run")), train_dataset=prepared.train,
                               eval_dataset=prepared.eval, processing_class=tokenizer, task_data=prepared.data,
                               formatter=formatter, cfg=cfg)
    batch = next(iter(trainer.get_train_dataloader()))
    T = batch["input_ids"].shape[1]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [T]
    assert batch["input_ids"].shape[0] == 1 and len(starts) - 1 >= 16 and T >= 2000
    sdpa = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, attn_implementation="sdpa").eval()

    masks = []
    flex.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))  # compiles FlexAttention once, outside the probe
        largest = _largest_allocation(lambda: trainer.compute_loss(trainer.model, dict(batch)))
        loss = trainer.compute_loss(trainer.model, dict(batch))
        packed_logits = flex(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        sdpa_largest = _largest_allocation(lambda: sdpa(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False))
    assert isinstance(masks[0], BlockMask)
    assert largest < T * T <= sdpa_largest, (largest, T * T, sdpa_largest)

    total, count = 0.0, 0
    for a, b in itertools.pairwise(starts):
        ids, labels = batch["input_ids"][0, a:b].tolist(), batch["labels"][0, a:b].tolist()
        nll, n = oracle.summed_nll(sdpa, ids, labels)
        total, count = total + nll, count + n
        with torch.no_grad():
            alone = sdpa(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        torch.testing.assert_close(packed_logits[a:b], alone, atol=1e-4, rtol=1e-4)
    assert loss.item() == pytest.approx(total / count, abs=1e-4)
