"""The FLOP count behind the GPU benchmark's MFU, against independent oracles.

Oracles: the published parameter count of Llama-3-8B (8.03B), and torch's own FLOP counter
(torch.utils.flop_counter.FlopCounterMode), which counts every matrix product that one real training
step executes (forward and backward) on a small Llama of the same architecture.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.gpu import SHAPES, flops_per_token, matmul_params, peak_flops

SMALL = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
B, S = 2, 48


def test_llama3_8b_matmul_weights_plus_embeddings_are_its_published_8b_parameters():
    shape = SHAPES["8b"]
    total = matmul_params(shape) + shape["vocab_size"] * shape["hidden_size"]  # + the input embedding
    assert abs(total - 8.03e9) / 8.03e9 < 0.005


def _counted_step(adapter: bool) -> tuple[dict, int | None]:
    """FLOPs of one forward + backward, by torch's counter, split into attention and everything else."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # eager attention: its products are plain batched matmuls the counter sees (CPU SDPA kernels are not counted)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False, attn_implementation="eager"))
    n_adapter = None
    if adapter:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        model.enable_input_require_grads()  # as with gradient checkpointing: layer 0 needs its input gradient too
        n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, SMALL["vocab_size"], (B, S))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(by_op) <= {"aten.mm", "aten.addmm", "aten.bmm"}, by_op
    # weights: the projections (mm/addmm); attention: QK^T and AV (bmm), forward and backward
    return {"attention": by_op["aten.bmm"], "weights": by_op["aten.mm"] + by_op.get("aten.addmm", 0)}, n_adapter


def test_full_fine_tuning_weight_flops_are_exactly_six_per_parameter_and_token():
    counted, _ = _counted_step(adapter=False)
    tokens = B * S
    P, L, d = matmul_params(SMALL), SMALL["num_hidden_layers"], SMALL["hidden_size"]
    assert counted["weights"] == 6 * P * tokens
    # eager attention computes the full S x S scores and masks them; a causal mask needs half: 6·L·s·d per token
    assert counted["attention"] / 2 == 6 * L * S * d * tokens
    assert flops_per_token(SMALL, S, None) * tokens == counted["weights"] + counted["attention"] / 2


def test_lora_counts_no_weight_gradient_for_frozen_weights():
    counted, n_adapter = _counted_step(adapter=True)
    tokens = B * S
    P, L, d = matmul_params(SMALL), SMALL["num_hidden_layers"], SMALL["hidden_size"]
    assert counted["weights"] == (4 * P + 6 * n_adapter) * tokens
    assert flops_per_token(SMALL, S, n_adapter) * tokens == counted["weights"] + counted["attention"] / 2
    assert flops_per_token(SMALL, S, n_adapter) < flops_per_token(SMALL, S, None)


def test_the_readme_worked_figure_for_llama3_8b_lora():
    assert flops_per_token(SHAPES["8b"], 2048, 42_000_000) == pytest.approx(3.2e10, rel=0.03)


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(None) is None and peak_flops("Tesla T4") is None
