"""Constrained decoding: greedy generation that can only spell one of the labels.

At each step the model may pick only a token that continues some label along the label trie
(:class:`~multitune.scoring.trie.LabelTrie`), so whatever it generates is a valid label, even from an
untrained model. The walk is transformers' own greedy ``generate`` with ``prefix_allowed_tokens_fn``
(the KV cache and ``synced_gpus`` included); this module only says which tokens each trie state allows
and reads the label and its log-probability back. Prompt/prefix-tuning models take a plain loop of
full forward passes instead: PEFT's generate for them drifted from its own forward pass by ~0.05-0.25
nats per label here (peft 0.21, positions around the virtual tokens), which can change the pick.

Unlike likelihood scoring it never compares whole labels: a first token that looks good can lead to
a label that is worse overall. It is the behaviour of a deployed generator with a grammar, at the
cost of one short generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multitune.scoring.trie import LabelTrie


def _walk(trie: LabelTrie, tokens: list[int]) -> tuple[int, int, int]:
    """(trie state, finished candidate or -1, tokens consumed) after following ``tokens`` from the root."""
    state = -1
    for n, t in enumerate(tokens):
        node, cand = trie.moves[state].get(t, (-1, -1))
        if node < 0:
            return state, cand, n + 1
        state = node
    return state, -1, len(tokens)


def _stop_tokens(trie: LabelTrie) -> list[int]:
    """Tokens that end a candidate and never appear inside one: safe end-of-sequence ids for ``generate``."""
    inner = {t for c in trie.cands for t in c[:-1]}
    return sorted({c[-1] for c in trie.cands} - inner)


@torch.no_grad()
def constrained_greedy(model, ids: torch.Tensor, mask: torch.Tensor, trie: LabelTrie, pad_id: int,
                       synced_gpus: bool = False) -> tuple[list[int], list[float]]:
    """For left-padded prompts [B, L]: the candidate greedy decoding reaches inside the trie, and its summed log-prob.

    The log-prob is the model's own (softmax over the whole vocabulary, as likelihood scoring has it),
    so it equals the likelihood score of the label reached.
    """
    width = ids.shape[1]

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        state, cand, _ = _walk(trie, input_ids[width:].tolist())
        return [pad_id] if cand >= 0 else list(trie.moves[state])  # a finished row waits (generate pads it anyway)

    stop = _stop_tokens(trie)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max(len(c) for c in trie.cands), do_sample=False,
        prefix_allowed_tokens_fn=allowed, eos_token_id=stop or None, pad_token_id=pad_id, num_beams=1,
        return_dict_in_generate=True, output_logits=True, synced_gpus=synced_gpus,
    )
    steps = torch.stack(out.logits, dim=1).float()  # [B, T, V] raw logits: the model's distribution
    logp = F.log_softmax(steps, dim=-1)
    new = out.sequences[:, width:]
    picks, scores = [], []
    for b in range(len(ids)):
        tokens = new[b].tolist()
        _, cand, n = _walk(trie, tokens)
        if cand < 0:
            raise RuntimeError(f"constrained decoding stopped inside the label trie after {tokens}")  # cannot happen
        picks.append(cand)
        scores.append(float(logp[b, torch.arange(n), new[b, :n]].sum()))
    return picks, scores


@torch.no_grad()
def constrained_greedy_uncached(model, prompt: list[int], trie: LabelTrie, logits_of, steps: int | None = None) -> tuple[int, float]:
    """The same walk for one unpadded prompt, one full forward pass per token (``logits_of(ids)`` -> [1, T, V]).

    With ``steps`` (every rank of a distributed evaluation) it makes exactly that many passes, whatever
    the label, so that all ranks make the same number of forward passes.
    """
    dev = next(model.parameters()).device
    done: list[int] = []
    state, cand, total, passes = -1, -1, 0.0, 0
    while cand < 0 or (steps is not None and passes < steps):
        logp = F.log_softmax(logits_of(torch.tensor([prompt + done], device=dev))[0, -1].float(), dim=-1)
        passes += 1
        if cand >= 0:
            continue  # keeping pace with other ranks
        moves = trie.moves[state]
        pick = max(moves, key=lambda t: float(logp[t]))
        total += float(logp[pick])
        done.append(pick)
        node, cand = moves[pick]
        state = node
    return cand, total
