"""Constrained decoding spells only labels, even from an untrained model, and is exactly greedy decoding
restricted to the labels: checked against a by-hand greedy walk (one full forward pass per step, no
cache, no trie, no `generate`)."""

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from multitune.data.formatting import Formatter
from multitune.scoring.scorer import Scorer
from multitune.tasks import Example
from tests import oracle

LABELS = ["card_arrival", "change_pin", "Refund_not_showing_up", "A", "reverted_card_payment?", "top_up_failed"]
EXAMPLES = [Example([{"role": "user", "content": t}], "", -1) for t in
            ["where is my card", "I want to change my PIN number please", "refund?", "hello", "top up did not work"]]


@pytest.fixture(scope="module")
def untrained(assets):
    torch.manual_seed(0)
    return LlamaForCausalLM(AutoConfig.from_pretrained(assets["model"])).eval()  # random weights: no idea of labels


@torch.no_grad()
def greedy_among(model, prompt: list[int], cands: list[list[int]]) -> tuple[int, float]:
    """The oracle: at each step the most likely next token among those that continue some candidate."""
    done: list[int] = []
    total = 0.0
    while True:
        alive = [c for c in cands if c[: len(done)] == done]
        if len(done) and any(c == done for c in alive):
            return cands.index(done), total
        logp = model(input_ids=torch.tensor([prompt + done])).logits[0, -1].double().log_softmax(-1)
        allowed = sorted({c[len(done)] for c in alive})
        pick = max(allowed, key=lambda t: float(logp[t]))
        total += float(logp[pick])
        done = done + [pick]


def test_untrained_model_emits_only_labels_where_free_generation_emits_garbage(untrained, tokenizer):
    s = Scorer(untrained, Formatter(tokenizer, 256), batch_size=2)
    free, _ = s.predict_labels(EXAMPLES, LABELS, mode="generate")
    assert free == [-1] * len(EXAMPLES)  # nothing it generates freely is a label
    idx, scores = s.predict_labels(EXAMPLES, LABELS, mode="constrained")
    assert all(0 <= i < len(LABELS) for i in idx)
    prompts, cands = oracle.chat_inputs(tokenizer, EXAMPLES, LABELS)
    for p, i, v in zip(prompts, idx, scores, strict=True):
        want, logp = greedy_among(untrained, p, cands)
        assert i == want
        assert v == pytest.approx(logp, abs=1e-4)
        assert v == pytest.approx(float(oracle.logprobs(untrained, [p], [cands[i]])[0, 0]), abs=1e-4)  # its likelihood score


def test_prompt_tuning_model_decodes_inside_the_labels(untrained, tokenizer):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(untrained, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    idx, scores = Scorer(model, Formatter(tokenizer, 256), batch_size=3).predict_labels(EXAMPLES[:3], LABELS, mode="constrained")
    prompts, cands = oracle.chat_inputs(tokenizer, EXAMPLES[:3], LABELS)
    for p, i, v in zip(prompts, idx, scores, strict=True):
        want, logp = greedy_among(model, p, cands)  # the virtual tokens come first: the last logits are the prompt's
        assert i == want and v == pytest.approx(logp, abs=1e-4)  # two paths: rounding to 3 places could split a tie
