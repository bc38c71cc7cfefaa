"""Lockstep scoring: the number of forward passes does not depend on the rows (under FSDP each is a collective).

In one process the agreement helpers are no-ops, so these tests pin the per-rank half: the fixed count
of passes and the unchanged answers. tests/distributed/test_eval_sharded.py runs it on 2 ranks.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from multitune.data.formatting import Formatter
from multitune.scoring.likelihood import best_candidates, candidate_logprobs_reference
from multitune.scoring.scorer import Scorer
from multitune.scoring.trie import LabelTrie
from multitune.tasks import Example

LABELS = ["card_arrival", "change_pin", "Refund_not_showing_up", "A", "reverted_card_payment?", "top_up_failed"]
TEXTS = ["where is my card", "I want to change my PIN number please, it is urgent", "refund?", "top up", "pin"]


@pytest.fixture(scope="module")
def model(assets):
    return AutoModelForCausalLM.from_pretrained(assets["model"]).eval()


def _counting(model) -> list[int]:
    calls = [0]
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_search_makes_a_fixed_number_of_passes_and_finds_the_same_argmax(model, tokenizer):
    f = Formatter(tokenizer, 256)
    prompts, cands = f.prompt_ids([Example([{"role": "user", "content": t}], "", -1) for t in TEXTS]), f.completion_ids(LABELS)
    trie, longest = LabelTrie(cands), max(len(c) for c in cands)
    full = candidate_logprobs_reference(model, prompts, cands, tokenizer.pad_token_id).max(-1)
    calls = _counting(model)
    for margin, rescoring in ((1e9, 1), (-1e9, 0)):  # every row rescored / none
        for batch in (prompts[:1], prompts):
            calls[0] = 0
            idx, _, _ = best_candidates(model, batch, trie, tokenizer.pad_token_id, batch_size=len(batch), margin=margin, lockstep=True)
            assert calls[0] == longest + rescoring  # the prompt, longest - 1 decoding steps, the rescoring pass
            if margin > 0:
                assert idx == full.indices.tolist()[: len(batch)]


def test_scorer_runs_full_batches_and_drops_the_filler(model, tokenizer):
    f = Formatter(tokenizer, 256)
    examples = [Example([{"role": "user", "content": t}], "", -1) for t in TEXTS]
    plain, lockstep = Scorer(model, f, batch_size=4), Scorer(model, f, batch_size=4, lockstep=True)
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        expected = plain.predict_labels(examples, LABELS[:2])[0]
        assert sizes == [4, 1]
        sizes.clear()
        assert lockstep.predict_labels(examples, LABELS[:2])[0] == expected  # the 5th row's batch is filled up to 4
        assert sizes == [4, 4]
        sizes.clear()
        assert lockstep.predict_labels([], LABELS[:2])[0] == []  # alone, a rank without rows has nothing to keep pace with
        assert sizes == []
    finally:
        hook.remove()
