"""The attention (KV) cache of the tokens every prompt of a task starts with, computed once per task.

Every prompt of a task opens with the same chat header, system prompt and instruction (Llama 3.1's
template alone puts ~25 tokens of system header first); only the row's text and the assistant header
differ. Scoring runs the shared prefix once, as a batch of one, and starts each batch from a copy of
its cache: the batch feeds only the rows' own tokens (left-padded), at positions that continue the
prefix's, attending to the prefix and to their own tokens.

transformers' DynamicCache holds the keys and values; what it does not do is share one prompt's cache
across a batch: a forward pass appends to the cache it is given, so each batch gets its own copy,
expanded to the batch's rows (``cache``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def shared_length(prompts: Sequence[list[int]]) -> int:
    """The longest token prefix every prompt starts with, leaving each prompt at least its last token
    (the position whose logits score the first answer token)."""
    if not prompts:
        return 0
    lo, hi = min(prompts), max(prompts)  # the common prefix of a set is that of its lexicographic extremes
    common = next((i for i, (a, b) in enumerate(zip(lo, hi)) if a != b), min(len(lo), len(hi)))
    return max(min(common, min(len(p) for p in prompts) - 1), 0)


class SharedPrefix:
    """One forward pass over ``tokens`` (batch of one); each batch then starts from a copy of its cache."""

    # a shorter shared prefix saves less than its own pass costs (under FSDP, one more parameter all-gather)
    MIN_TOKENS = 16

    def __init__(self, model, tokens: list[int]):
        self.tokens = list(tokens)
        self._config = model.config
        dev = next(model.parameters()).device
        out = model(input_ids=torch.tensor([self.tokens], device=dev), use_cache=True, logits_to_keep=1)
        self._kv = [(layer.keys, layer.values) for layer in out.cache.layers]

    def __len__(self) -> int:
        return len(self.tokens)

    def suffixes(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        """Each prompt past the prefix (at least one token each)."""
        n = len(self.tokens)
        if any(len(p) <= n or p[:n] != self.tokens for p in prompts):
            raise ValueError("a prompt does not start with the shared prefix (or has nothing after it)")
        return [p[n:] for p in prompts]

    def cache(self, batch: int) -> DynamicCache:
        """A fresh cache of the prefix for ``batch`` rows (the model appends the batch's keys to it)."""
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self._kv], config=self._config)

    def attention_mask(self, suffix_mask: torch.Tensor) -> torch.Tensor:
        """The 2D mask over prefix + suffix: the prefix is visible to every row."""
        ones = torch.ones(suffix_mask.shape[0], len(self.tokens), dtype=suffix_mask.dtype, device=suffix_mask.device)
        return torch.cat([ones, suffix_mask], dim=1)
