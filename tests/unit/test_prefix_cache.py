"""Scoring from the cache of the prefix a task's prompts share (multitune.scoring.prefix_cache) scores what the full
prompts score: against the uncached pass and against the oracle (the model's own loss, tests/oracle.py), for
the base model and LoRA, in fp32, with batches of prompts of different lengths; the pruned search and
generation pick the same labels and texts; the shared tokens are really not fed again."""

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, set_seed

from multitune.data.formatting import Formatter
from multitune.scoring.prefix_cache import SharedPrefix, shared_length
from multitune.scoring.likelihood import best_candidates, candidate_logprobs
from multitune.scoring.scorer import Scorer
from multitune.scoring.trie import LabelTrie
from multitune.tasks import Example
from tests import oracle

LABELS = ["card_arrival", "change_pin", "Refund_not_showing_up", "A", "reverted_card_payment?", "top_up_failed"]
SYSTEM = "You are a banking assistant who routes customer queries to the right team."
TEXTS = ["where is my card", "I want to change my PIN number please, it is urgent and I am abroad", "refund?",
         "top up failed twice today", "pin", "my card payment was reverted, why"]
EXAMPLES = [Example([{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Which intent?\n\nText: {t}"}], "", -1)
            for t in TEXTS]


@pytest.fixture(scope="module", params=["base", "lora"])
def model(request, assets):
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    if request.param == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)  # LoRA's B starts at zero: make the adapter count
    return model.eval()


@pytest.fixture(scope="module")
def inputs(tokenizer):
    f = Formatter(tokenizer, 256)
    prompts, cands = f.prompt_ids(EXAMPLES), f.completion_ids(LABELS)
    n = shared_length(prompts)
    assert n >= SharedPrefix.MIN_TOKENS and len({len(p) - n for p in prompts}) == len(prompts)  # mixed suffix lengths
    return f, prompts, cands, n


def _widths(model) -> tuple[list[int], object]:
    seen: list[int] = []
    emb = model.get_input_embeddings()
    return seen, emb.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))


def test_shared_length_is_the_common_prefix_leaving_each_prompt_a_token():
    assert shared_length([[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4]]) == 3
    assert shared_length([[1, 2, 3], [1, 2, 3]]) == 2  # the last token's logits are needed
    assert shared_length([[1, 2, 3, 4], [1, 2]]) == 1
    assert shared_length([[7, 2], [1, 2]]) == 0
    assert shared_length([]) == 0


def test_trie_pass_from_the_prefix_equals_the_full_pass_and_the_oracle(model, tokenizer, inputs):
    _, prompts, cands, n = inputs
    pad = tokenizer.pad_token_id
    plain = candidate_logprobs(model, prompts, cands, pad, batch_size=4)
    prefix = SharedPrefix(model, prompts[0][:n])
    widths, hook = _widths(model)
    try:
        cached = candidate_logprobs(model, prompts, cands, pad, batch_size=4, shared=prefix)  # 2 batches from one cache
    finally:
        hook.remove()
    # the batches fed each prompt's own tokens and the trie, never the shared prefix again
    assert widths == [max(len(p) for p in batch) - n + len(LabelTrie(cands)) for batch in (prompts[:4], prompts[4:])]
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, oracle.logprobs(model, prompts, cands), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("margin", [1e-4, 1e9], ids=["search", "all-rescored"])
def test_pruned_search_from_the_prefix_finds_the_oracles_argmax(model, tokenizer, inputs, margin):
    _, prompts, cands, n = inputs
    expected = oracle.logprobs(model, prompts, cands).max(-1)
    prefix = SharedPrefix(model, prompts[0][:n])
    idx, scores, rescored = best_candidates(model, prompts, LabelTrie(cands), tokenizer.pad_token_id, batch_size=4,
                                            margin=margin, shared=prefix)
    assert idx == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), expected.values, atol=1e-5, rtol=1e-5)
    if margin > 1:
        assert rescored == len(prompts)  # the rescoring pass (candidate_logprobs) ran from the prefix too


def test_scorer_shares_the_prefix_once_per_call_and_predicts_the_same(model, inputs, monkeypatch):
    f, prompts, _, n = inputs
    # the tiny model mostly writes newlines, so equal texts say little: record every step's logits as well
    steps: list[torch.Tensor] = []
    generate = model.generate

    def recording(**kw):
        out = generate(**kw, return_dict_in_generate=True, output_scores=True)
        steps.append(torch.stack(out.scores))
        return out.sequences

    monkeypatch.setattr(model, "generate", recording)
    shared, plain = Scorer(model, f, batch_size=4), Scorer(model, f, batch_size=4, share_prefix=False)
    widths, hook = _widths(model)
    try:
        scores = shared.likelihood(EXAMPLES, LABELS)
        # one prefix pass, then each batch (in length order) without the prefix
        assert len(widths) == 3 and widths[0] == n and all(w < min(len(p) for p in prompts) for w in widths[1:])
        torch.testing.assert_close(scores, plain.likelihood(EXAMPLES, LABELS), atol=1e-5, rtol=1e-5)
        for s in (shared, plain):
            s.ONE_PASS_NODES = 0  # the search, for this small label set too
        # two computation paths (from the cached prefix, and whole): the same predictions, the scores equal to
        # float32 rounding (they differ by ~2e-6 on some CPUs), never bitwise
        (got, got_scores), (want, want_scores) = shared.predict_labels(EXAMPLES, LABELS), plain.predict_labels(EXAMPLES, LABELS)
        assert got == want and got_scores == pytest.approx(want_scores, abs=1e-5)
        widths.clear()
        texts = shared.generate(EXAMPLES, max_new_tokens=4)
        assert widths[0] == n and widths[1] < min(len(p) for p in prompts)  # generation started from the cache too
        assert texts == plain.generate(EXAMPLES, max_new_tokens=4)
        half = len(steps) // 2  # the cached batches, then the plain ones, in the same order
        assert half == 2
        for cached, full in zip(steps[:half], steps[half:], strict=True):
            torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    finally:
        hook.remove()


def test_a_prompt_without_the_prefix_is_refused(model, inputs):
    _, prompts, _, n = inputs
    prefix = SharedPrefix(model, prompts[0][:n])
    with pytest.raises(ValueError, match="shared prefix"):
        prefix.suffixes([prompts[0], [1] + prompts[1][1:]])
