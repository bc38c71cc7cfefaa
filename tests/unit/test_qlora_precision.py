"""QLoRA trains on a bf16 residual stream: the weights that are not 4-bit (embeddings, output head, norms) stay in
the 4-bit layers' compute dtype, only the adapters are fp32.

PEFT's ``prepare_model_for_kbit_training`` upcasts every parameter that is not 4-bit to fp32; left so, the embedding
output is fp32 and every residual add promotes to fp32 (activations x1.375 and a bf16 copy of the fp32 head every
step under autocast). This runs the real path on the CPU: bitsandbytes' NF4 layers (its CPU backend), the tiny model
loaded in bf16, multitune's ``apply_peft`` and ``adapters_in_fp32``, bf16 autocast as ``train.bf16`` runs it on a GPU.
What the CPU cannot show: the GPU's memory saving and bitsandbytes' CUDA kernels (they compute in the same compute
dtype); ``multitune plan`` models the former (weights at 2 bytes, activations measured on a bf16 base).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multitune.config import config_from_dict
from multitune.modeling.load import adapters_in_fp32, apply_peft, load_model
from multitune.modeling.loss import supervised_loss
from tests.conftest import tiny_config

pytest.importorskip("bitsandbytes")


def _qlora(assets, tmp_path, checkpointing: bool = False):
    raw = tiny_config(assets, tmp_path / "run", gradient_checkpointing=checkpointing)
    raw["model"]["dtype"] = "bfloat16"  # what dtype: auto resolves to on a bf16 GPU
    raw["peft"] = {"method": "qlora", "r": 4, "alpha": 8, "dropout": 0.0}
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    model = apply_peft(load_model(cfg, for_training=True), cfg, checkpointing)
    adapters_in_fp32(model)  # as MultitaskTrainer does once TRL has built it
    with torch.no_grad():  # B starts at zero: move it so the adapters take part in the loss and its gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model.train()


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (2, 24), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = ids[:, -5:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_qlora_keeps_every_weight_that_is_not_4_bit_in_bf16_and_its_adapters_in_fp32(assets, tmp_path):
    model = _qlora(assets, tmp_path)
    kinds = {}
    for name, p in model.named_parameters():
        kind = "4-bit" if type(p).__name__ == "Params4bit" else "adapter" if p.requires_grad else "other"
        kinds.setdefault(kind, set()).add(p.dtype)
        assert p.requires_grad == ("lora_" in name), name  # the base frozen, the adapters trained
    assert kinds["adapter"] == {torch.float32}
    assert kinds["other"] == {torch.bfloat16}  # embeddings, norms (the tiny model's head is its embedding, tied)
    assert "4-bit" in kinds  # really quantised


def test_the_residual_stream_is_bf16_and_the_loss_is_the_oracles(assets, tmp_path):
    """Every decoder layer's output (the residual stream) is bf16; the training loss equals the mean NLL computed by
    hand from the same model's full logits (log-softmax in fp64 at the supervised positions)."""
    model = _qlora(assets, tmp_path)
    decoder = model.get_base_model().model
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append(out[0].dtype if isinstance(out, tuple) else out.dtype))
             for layer in decoder.layers]
    hooks.append(decoder.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(out.dtype)))
    batch = _batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supervised_loss(model, batch)[0]
    assert seen == [torch.bfloat16] * (len(decoder.layers) + 1), seen
    for h in hooks:
        h.remove()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    keep = labels != -100
    oracle = -logp[keep].gather(-1, labels[keep][:, None]).mean()
    assert loss.item() == pytest.approx(oracle.item(), abs=1e-4)  # the same bf16 logits: fp32 against fp64 reduction
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_gradient_checkpointing_still_reaches_the_first_layers_adapters(assets, tmp_path):
    """prepare_model_for_kbit_training's input-gradient hook and checkpointing survive the cast back to bf16."""
    model = _qlora(assets, tmp_path, checkpointing=True)
    assert model.get_base_model().is_gradient_checkpointing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supervised_loss(model, _batch(model.config.vocab_size))[0]
    loss.backward()
    first = [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n]
    assert first and all(g is not None and g.abs().max() > 0 for g in first)
