"""How a scorer's prompts reach the model: one batch scheduler for every scoring mode.

It owns the three things each mode would otherwise re-derive:
- length order: prompts are batched with others of similar length (less padding), and the results
  come back in the input order;
- lockstep: under torchrun/accelerate each rank scores its own rows with a model that may be sharded,
  where every forward pass is a collective, so every rank runs the same number of batches of the same
  size (a rank out of rows repeats a prompt, whose results are dropped);
- the shared prefix: the cache of the tokens every prompt of the call starts with, computed once
  (multitune.scoring.prefix_cache), used on every rank or on none.
The per-batch scorers (likelihood, constrained decoding, generation) only see a batch of prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from multitune.distributed import any_rank, max_over_ranks
from multitune.scoring.inputs import supports_tree_mask, uses_prompt_learning
from multitune.scoring.prefix_cache import SharedPrefix, shared_length


@dataclass
class Schedule:
    model: object
    batch_size: int
    pad_id: int
    lockstep: bool = False
    share_prefix: bool = True

    def shared_prefix(self, prompts: list[list[int]]) -> SharedPrefix | None:
        """The cache of the prefix every prompt starts with, when it is long enough to be worth its pass.

        Prompt/prefix tuning put their own virtual tokens in front, and an attention without an arbitrary
        mask cannot continue a cache: those never share (the same on every rank: the model and setting are)."""
        if not self.share_prefix or uses_prompt_learning(self.model) or not supports_tree_mask(self.model):
            return None
        n = shared_length(prompts)
        use = n >= SharedPrefix.MIN_TOKENS
        if self.lockstep:  # one more forward pass (a collective under FSDP): on every rank or on none
            use = not any_rank(not use)
        return SharedPrefix(self.model, prompts[0][:n]) if use else None

    def run(self, prompts: list, fn: Callable[[list], list], desc: str, length: Callable = len, filler=None) -> list:
        """``fn`` over batches of prompts of similar ``length``; one result per prompt, in the input order.
        ``filler``: what a rank with no prompts at all feeds under lockstep (default: one pad token)."""
        order = sorted(range(len(prompts)), key=lambda i: length(prompts[i]))
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        n_batches = max_over_ranks(len(batches)) if self.lockstep else len(batches)
        out: list = [None] * len(prompts)
        for b in tqdm(range(n_batches), desc=desc, unit="batch", leave=False):
            idx = batches[b] if b < len(batches) else []
            batch = [prompts[i] for i in idx]
            if self.lockstep:  # full batches only; a rank out of rows repeats a prompt (or a pad token)
                spare = batch[0] if batch else (prompts[0] if prompts else filler or [self.pad_id])
                batch += [spare] * (self.batch_size - len(batch))
            for i, r in zip(idx, fn(batch)[: len(idx)], strict=True):  # results for repeated prompts are dropped
                out[i] = r
        return out
