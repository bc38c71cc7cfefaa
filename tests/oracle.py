"""An independent oracle for every score: the model's own loss with labels.

Each sequence is one unpadded forward pass with ``labels`` = -100 over the tokens that carry no loss.
The model (and PEFT, which aligns labels with the virtual tokens of prompt tuning itself) returns the
mean negative log-likelihood over the supervised tokens, so a completion's summed log-probability is
-loss x its token count. Nothing here shares code with ``multitune.scoring.scorer``: no logits are indexed,
no padding, no masks, no shifting by hand.
"""

from __future__ import annotations

import torch

IGNORE = -100


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def summed_nll(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """(summed NLL, number of supervised tokens) of one sequence, from the model's own loss."""
    n = sum(t != IGNORE for t in labels[1:])  # the first label predicts nothing (causal shift)
    if n == 0:
        return 0.0, 0
    dev = _device(model)
    out = model(input_ids=torch.tensor([input_ids], device=dev), labels=torch.tensor([labels], device=dev))
    return float(out.loss.double()) * n, n


def logprobs(model, prompts: list[list[int]], cands: list[list[int]]) -> torch.Tensor:
    """[N, K] summed log-probability of each candidate completion after each prompt."""
    out = torch.empty(len(prompts), len(cands), dtype=torch.float64)
    for i, p in enumerate(prompts):
        for k, c in enumerate(cands):
            out[i, k] = -summed_nll(model, p + c, [IGNORE] * len(p) + c)[0]
    return out


def mean_loss(model, input_ids: list[list[int]], labels: list[list[int]]) -> float:
    """The token-weighted mean NLL over every supervised token of every sequence."""
    total, count = 0.0, 0
    for ids, lab in zip(input_ids, labels, strict=True):
        nll, n = summed_nll(model, ids, lab)
        total, count = total + nll, count + n
    return total / count


def chat_inputs(tokenizer, examples, labels: list[str], eot: str = "<|eot_id|>") -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and candidate completions from the tokenizer's own chat template, not multitune.data.formatting."""
    prompts = [tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
               for ex in examples]
    return prompts, [tokenizer(x + eot, add_special_tokens=False)["input_ids"] for x in labels]


def accuracy_check(model, tokenizer, examples, labels: list[str], *reported: float, tie: float = 1e-3) -> None:
    """Assert that each reported accuracy is the oracle's: each row's label is the one with the highest
    summed log-prob; a row whose top two are within ``tie`` nats may count either way."""
    scores = logprobs(model, *chat_inputs(tokenizer, examples, labels))
    top2 = scores.topk(min(2, len(labels)), dim=-1).values
    ties = int((top2[:, 0] - top2[:, -1] < tie).sum()) if len(labels) > 1 else 0
    correct = sum(int(p) == ex.label for p, ex in zip(scores.argmax(-1), examples, strict=True))
    for accuracy in reported:
        assert abs(accuracy * len(examples) - correct) <= ties + 1e-6, (accuracy, correct, len(examples), ties)
