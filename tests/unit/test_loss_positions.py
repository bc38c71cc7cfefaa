"""The supervised-positions loss (multitune.modeling.loss) against the model's own loss with labels.

The oracle is the full computation: `model(..., labels=labels).loss`, the model's (and for prompt
tuning PEFT's) own shift, virtual-token alignment and mean over every position's logits. Loss and
every trainable parameter's gradient must agree to 1e-5 in fp32, for each PEFT method.
"""

from __future__ import annotations

import pytest
import torch

from multitune.config import config_from_dict
from multitune.modeling.loss import supervised_index, supervised_loss
from multitune.modeling.load import apply_peft, load_model
from tests.conftest import tiny_config

METHODS = ["lora", "qlora", "dora", "rslora", "prompt_tuning", "prefix_tuning", "ia3", "full"]


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths; prompt positions and padding are -100, 2-5 answer tokens each."""
    g = torch.Generator().manual_seed(seed)
    lengths, answers = [23, 17, 30, 12], [3, 5, 2, 4]
    T = max(lengths)
    ids = torch.randint(10, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, a) in enumerate(zip(lengths, answers, strict=True)):
        mask[i, :n] = 1
        labels[i, n - a : n] = ids[i, n - a : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _model(assets, tmp_path, method: str):
    raw = tiny_config(assets, tmp_path / "run")
    raw["peft"] = {"method": method, "r": 4, "alpha": 8, "dropout": 0.0, "num_virtual_tokens": 5}
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    model = apply_peft(load_model(cfg), cfg)
    if method in ("lora", "qlora", "dora", "rslora"):  # B starts at zero: move it so every gradient path is exercised
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    return model.train()


def _loss_and_grads(model, fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.item(), grads


@pytest.mark.parametrize("method", METHODS)
def test_loss_and_gradients_equal_the_full_computation(assets, tmp_path, method):
    model = _model(assets, tmp_path, method)
    batch = _batch(model.config.vocab_size)
    full, g_full = _loss_and_grads(model, lambda: model(**batch).loss)
    ours, g_ours = _loss_and_grads(model, lambda: supervised_loss(model, batch)[0])
    assert ours == pytest.approx(full, abs=1e-5)
    assert g_ours.keys() == g_full.keys()
    for name in g_full:
        assert g_full[name].abs().max() > 0, name  # a real gradient, not two zeros agreeing
        torch.testing.assert_close(g_ours[name], g_full[name], rtol=1e-5, atol=1e-5, msg=name)


def test_packed_padding_free_row_equals_the_full_computation(assets, tmp_path):
    """Two examples packed in one row (TRL's padding-free collator): answers sit mid-row, not at the end."""
    model = _model(assets, tmp_path, "full")
    a, b = _batch(model.config.vocab_size, seed=1), _batch(model.config.vocab_size, seed=2)
    rows = [(a["input_ids"][0, :23], a["labels"][0, :23]), (b["input_ids"][2, :30], b["labels"][2, :30])]
    ids = torch.cat([r[0] for r in rows])[None]
    labels = torch.cat([r[1] for r in rows])[None]
    position_ids = torch.cat([torch.arange(len(r[0])) for r in rows])[None]
    labels[position_ids == 0] = -100
    batch = {"input_ids": ids, "position_ids": position_ids, "labels": labels}
    # use_cache=False as the trainer calls it: with a cache, transformers lets packed examples attend to each other
    full, g_full = _loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    ours, g_ours = _loss_and_grads(model, lambda: supervised_loss(model, batch)[0])
    assert ours == pytest.approx(full, abs=1e-5)
    for name in g_full:
        torch.testing.assert_close(g_ours[name], g_full[name], rtol=1e-5, atol=1e-5, msg=name)


def test_accumulated_micro_batches_sum_to_the_whole_batch(assets, tmp_path):
    """Gradient accumulation: each micro-batch divided by the step's total supervised count (Trainer's
    num_items_in_batch) sums to the loss and gradient of the whole batch at once."""
    model = _model(assets, tmp_path, "full")
    batch = _batch(model.config.vocab_size)
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 2), slice(2, 4))]
    total = int((batch["labels"][:, 1:] != -100).sum())
    whole, g_whole = _loss_and_grads(model, lambda: model(**batch).loss)
    acc = sum(_loss_and_grads(model, lambda h=h: supervised_loss(model, h, total)[0])[0] for h in halves)
    model.zero_grad(set_to_none=True)
    for h in halves:
        supervised_loss(model, h, total)[0].backward()
    assert acc == pytest.approx(whole, abs=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_whole[n], rtol=1e-5, atol=1e-5, msg=n)


def test_index_follows_the_shift_and_virtual_tokens():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    index, targets = supervised_index(labels, hidden_len=4)
    # hidden state t predicts label t + 1: row 0 positions 1, 2; row 1 position 0 (flat 4)
    assert index.tolist() == [1, 2, 4] and targets.tolist() == [7, 8, 5]
    index, targets = supervised_index(labels, hidden_len=6)  # two virtual tokens prepended
    assert index.tolist() == [3, 4, 8] and targets.tolist() == [7, 8, 5]  # rows of 6: 2+1, 2+2, 6+2
