"""The FLOPs count behind the GPU benchmark's MFU (README: Performance)."""

from benchmarks.gpu import SHAPES, flops_per_token, matmul_params, peak_flops


def test_llama3_8b_matmul_weights_plus_embeddings_are_its_8b_parameters():
    shape = SHAPES["8b"]
    total = matmul_params(shape) + shape["vocab_size"] * shape["hidden_size"]  # + the input embedding
    assert abs(total - 8.03e9) / 8.03e9 < 0.005


def test_frozen_weights_get_no_weight_gradient():
    shape, s = SHAPES["8b"], 2048
    P, adapter = matmul_params(shape), 42_000_000
    full, lora = flops_per_token(shape, s, None), flops_per_token(shape, s, adapter)
    assert full - lora == 2 * P - 6 * adapter
    assert lora == 4 * P + 6 * adapter + 6 * 32 * s * 4096
    assert 3.1e10 < lora < 3.3e10  # the README's worked figure


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(None) is None and peak_flops("Tesla T4") is None
