"""Packed training rows must not attend across examples.

`train.packing` concatenates examples into one row with restarting position_ids (TRL's padding-free
"bfd" packing). transformers 5 turns those position_ids into a block-diagonal mask for sdpa and eager
attention only when no KV cache is built; TRL's SFTTrainer.compute_loss passes use_cache=False. This
pins the transformers half of that: with a cache (the model config's default) the second example
does see the first.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_are_isolated_without_a_cache(assets, attn):
    model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation=attn).train()
    torch.manual_seed(0)
    a, b = torch.randint(5, 1000, (1, 7)), torch.randint(5, 1000, (1, 5))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        alone_b = model(b, use_cache=False).logits[0]
        isolated = model(input_ids=packed, position_ids=pos, use_cache=False).logits[0, 7:]
        leaky = model(input_ids=packed, position_ids=pos, use_cache=True).logits[0, 7:]
    torch.testing.assert_close(isolated, alone_b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(leaky, alone_b, atol=1e-4)  # why use_cache=False matters
