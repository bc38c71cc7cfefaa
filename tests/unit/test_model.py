"""Precision and attention decisions in multitune.modeling.load, and scoring under a training-only attention."""

from __future__ import annotations

import pytest
import torch
import transformers

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.modeling.load import load_model, resolve_dtype
from tests.conftest import tiny_config


def _cfg(assets, tmp_path, method="lora", **model):
    raw = tiny_config(assets, tmp_path / "run")
    raw["peft"]["method"] = method
    raw["model"].update(model)
    return config_from_dict(raw)


def _gpu(monkeypatch, native_bf16: bool):
    """A CUDA machine: an A100 (native bf16) or a V100/T4, where torch reports bf16 through emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation)


@pytest.mark.parametrize("native", [True, False])
def test_auto_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, assets, tmp_path, native):
    from multitune.training.args import _bf16

    _gpu(monkeypatch, native)
    assert resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert _bf16(_cfg(assets, tmp_path)) is native  # autocast: the same decision, made in one place


@pytest.fixture
def loaded(monkeypatch):
    """The keyword arguments load_model hands to from_pretrained (nothing is loaded)."""
    seen = {}

    def fake(source, **kwargs):
        seen.update(kwargs)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    torch.nn.Linear.num_parameters = lambda self: 2  # what load_model logs
    yield seen
    del torch.nn.Linear.num_parameters


def test_full_fine_tuning_keeps_fp32_master_weights_on_a_bf16_gpu(monkeypatch, assets, tmp_path, loaded):
    from multitune.training.args import _bf16

    _gpu(monkeypatch, native_bf16=True)
    full = _cfg(assets, tmp_path, "full")
    load_model(full, for_training=True)
    assert loaded["dtype"] == torch.float32  # AdamW updates fp32 weights...
    assert _bf16(full)  # ...and the forward runs under bf16 autocast
    load_model(full)
    assert loaded["dtype"] == torch.bfloat16  # inference from the trained weights: bf16
    load_model(_cfg(assets, tmp_path, "lora"), for_training=True)
    assert loaded["dtype"] == torch.bfloat16  # frozen weights under an adapter: only read
    load_model(_cfg(assets, tmp_path, "full", dtype="bfloat16"), for_training=True)
    assert loaded["dtype"] == torch.bfloat16  # an explicit dtype is obeyed


def test_missing_flash_attn_or_bitsandbytes_is_one_clear_error(monkeypatch, assets, tmp_path, loaded):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("flash_attn", "bitsandbytes") else real(name, *a))
    with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package"):
        load_model(_cfg(assets, tmp_path, attn_implementation="flash_attention_2"))
    with pytest.raises(UserError, match="qlora needs the bitsandbytes package"):
        load_model(_cfg(assets, tmp_path, "qlora"))
    assert not loaded  # refused before loading anything


def test_scoring_uses_sdpa_under_a_training_only_attention(assets, tokenizer):
    """flash_attention_2 takes no tree mask: scoring switches to SDPA (one pass per batch, not one per
    label) and hands the model back with the attention it trains with."""
    from multitune.data.formatting import Formatter
    from multitune.scoring.scorer import Scorer
    from multitune.tasks import Example
    from tests import oracle

    model = transformers.AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    examples = [Example([{"role": "user", "content": t}], "", -1) for t in ("where is my card", "change my pin")]
    labels = ["card_arrival", "change_pin", "cash"]
    f = Formatter(tokenizer, 128)
    expected = oracle.logprobs(model, f.prompt_ids(examples), f.completion_ids(labels))
    # as loaded with flash_attention_2 (not installable here: any forward through it would fail)
    model.config._attn_implementation_internal = "flash_attention_2"
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(mod.config._attn_implementation))
    scores = Scorer(model, f, batch_size=2).likelihood(examples, labels)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert calls == ["sdpa"]  # one trie pass for the batch of 2 prompts x 3 labels
    assert model.config._attn_implementation == "flash_attention_2"


def test_an_installed_bitsandbytes_that_cannot_import_is_one_clear_error(monkeypatch, assets, tmp_path, loaded):
    import importlib

    real = importlib.import_module

    def broken(name, *a):
        if name == "bitsandbytes":
            raise RuntimeError("CUDA Setup failed despite GPU being available\nmore lines")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(UserError, match=r"bitsandbytes is installed but does not import \(RuntimeError: CUDA Setup failed"):
        load_model(_cfg(assets, tmp_path, "qlora"))
    assert not loaded


@pytest.mark.parametrize("flash", [True, False])
def test_auto_attention_gives_packed_rows_on_a_gpu_the_sequence_boundaries(monkeypatch, assets, tmp_path, loaded, flash):
    """Packed rows on SDPA get a [T, T] block mask; on a GPU auto loads flash-attn's varlen kernel where it imports,
    else FlexAttention. Unpacked rows, inference and the CPU (FlexAttention has no CPU backward) keep SDPA."""
    from multitune.modeling import load

    monkeypatch.setattr(load, "flash_attn_imports", lambda: flash)
    packed = tiny_config(assets, tmp_path / "run", packing=True)
    _gpu(monkeypatch, native_bf16=True)
    load_model(config_from_dict(packed), for_training=True)
    assert loaded["attn_implementation"] == ("flash_attention_2" if flash else "flex_attention")
    load_model(config_from_dict(packed))  # inference (and scoring) of the same run
    assert loaded["attn_implementation"] == "sdpa"
    load_model(_cfg(assets, tmp_path), for_training=True)  # padded rows
    assert loaded["attn_implementation"] == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    load_model(config_from_dict(packed), for_training=True)
    assert loaded["attn_implementation"] == "sdpa"


def test_flex_attention_refuses_to_train_on_the_cpu(assets, tmp_path, loaded):
    with pytest.raises(UserError, match="flex_attention trains only on a GPU"):
        load_model(_cfg(assets, tmp_path, attn_implementation="flex_attention"), for_training=True)
    assert not loaded
    load_model(_cfg(assets, tmp_path, attn_implementation="flex_attention"))  # its forward runs on the CPU
    assert loaded["attn_implementation"] == "flex_attention"
