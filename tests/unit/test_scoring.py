"""The trie pass and the pruned search must equal the brute-force per-candidate reference on the base model.

Every PEFT method, and the reference itself, is checked against the model's own loss in test_scoring_oracle.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from multitune.data.formatting import Formatter
from multitune.scoring.likelihood import candidate_logprobs, candidate_logprobs_reference
from multitune.scoring.scorer import Scorer
from multitune.scoring.trie import LabelTrie
from multitune.tasks import Example

LABELS = ["card_arrival", "change_pin", "Refund_not_showing_up", "A", "reverted_card_payment?", "top_up_failed"]
EXAMPLES = [Example([{"role": "user", "content": t}], "", -1) for t in
            ["where is my card", "I want to change my PIN number please, it is urgent and I am abroad", "refund?"]]


@pytest.fixture(scope="module")
def model(assets):
    return AutoModelForCausalLM.from_pretrained(assets["model"]).eval()


def test_trie_scoring_equals_reference(model, tokenizer):
    f = Formatter(tokenizer, 256)
    prompts, cands = f.prompt_ids(EXAMPLES), f.completion_ids(LABELS)
    assert len({len(c) for c in cands}) > 1  # candidates of different lengths exercise the padding
    fast = candidate_logprobs(model, prompts, cands, tokenizer.pad_token_id, batch_size=2)
    ref = candidate_logprobs_reference(model, prompts, cands, tokenizer.pad_token_id)
    assert fast.shape == (3, len(LABELS))
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_reference_equals_the_models_own_loss(model, tokenizer):
    from tests import oracle

    f = Formatter(tokenizer, 256)
    prompts, cands = f.prompt_ids(EXAMPLES), f.completion_ids(LABELS[:3])
    torch.testing.assert_close(candidate_logprobs_reference(model, prompts, cands, tokenizer.pad_token_id, batch_size=4),
                               oracle.logprobs(model, prompts, cands), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_label_prefixes_are_fed_once(assets, tokenizer, attn):
    f = Formatter(tokenizer, 256)
    prompts = f.prompt_ids(EXAMPLES)
    cands = f.completion_ids(["card arrival", "card arriving late", "card linking", "cash", "A"])
    trie = LabelTrie(cands)
    assert len(trie) < sum(len(c) - 1 for c in cands)  # "card" and "card arriv" are one node each
    model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation=attn).eval()
    fast = candidate_logprobs(model, prompts, cands, tokenizer.pad_token_id, batch_size=2, trie=trie)
    ref = candidate_logprobs_reference(model, prompts, cands, tokenizer.pad_token_id)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_single_token_candidates_need_no_second_pass(model, tokenizer):
    f = Formatter(tokenizer, 256)
    prompts = f.prompt_ids(EXAMPLES)
    cands = [[tokenizer.convert_tokens_to_ids(x)] for x in ("A", "B", "C")]
    fast = candidate_logprobs(model, prompts, cands, tokenizer.pad_token_id)
    ref = candidate_logprobs_reference(model, prompts, cands, tokenizer.pad_token_id)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_predict_labels_is_the_reference_argmax(model, tokenizer):
    s = Scorer(model, Formatter(tokenizer, 256), batch_size=2)
    idx, scores = s.predict_labels(EXAMPLES, LABELS)
    ref = candidate_logprobs_reference(model, s._prompts(EXAMPLES, 16), s.candidates(LABELS), tokenizer.pad_token_id)
    assert idx == ref.argmax(-1).tolist() and len(scores) == 3


def test_pruned_search_finds_the_exact_argmax(model, tokenizer):
    from multitune.scoring.likelihood import best_candidates

    f = Formatter(tokenizer, 256)
    prompts, cands = f.prompt_ids(EXAMPLES * 3), f.completion_ids(LABELS)
    full = candidate_logprobs_reference(model, prompts, cands, tokenizer.pad_token_id).max(-1)
    idx, scores, rescored = best_candidates(model, prompts, LabelTrie(cands), tokenizer.pad_token_id, batch_size=4)
    assert idx == full.indices.tolist()
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), full.values, atol=1e-4, rtol=1e-4)
    # with no margin for doubt, every row is rescored in full, and the answer is the same
    idx2, _, rescored2 = best_candidates(model, prompts, LabelTrie(cands), tokenizer.pad_token_id, batch_size=4, margin=1e9)
    assert idx2 == idx and rescored2 == len(prompts)


def test_pruned_search_without_rescoring_when_the_model_is_sure(model, tokenizer):
    from multitune.scoring.likelihood import best_candidates

    prompt = Formatter(tokenizer, 256).prompt_ids(EXAMPLES[:1])[0]
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[0, len(prompt):].tolist()
    with torch.no_grad():
        unlikely = model(torch.tensor([prompt + greedy[:1]])).logits[0, -2:].argsort(-1)[:, :3].tolist()  # least likely
    cands = [greedy, [unlikely[0][0], 5, 6], [unlikely[0][1], 7], [greedy[0], unlikely[1][0], 8], [greedy[0], unlikely[1][1]]]
    ref = candidate_logprobs_reference(model, [prompt], cands, tokenizer.pad_token_id)[0]
    idx, scores, rescored = best_candidates(model, [prompt, prompt], LabelTrie(cands), tokenizer.pad_token_id)
    assert rescored == 0  # every branch left behind scored below the greedy label: no second pass
    assert idx == [int(ref.argmax())] * 2 == [0, 0]
    assert scores[0] == pytest.approx(float(ref[0]), abs=1e-4)
