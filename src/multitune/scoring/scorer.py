"""Scoring a model on labelled examples: label likelihood (default), constrained decoding, greedy generation,
and chat loss. The Scorer asks the batch scheduler (multitune.scoring.schedule) for batches and hands each to
a per-batch scorer (multitune.scoring.likelihood, multitune.scoring.constrained, ``generate``).

Label likelihood: each candidate completion (label text + end-of-turn, exactly as trained) gets the
summed log-probability of its tokens given the prompt; the prediction is the argmax. One forward pass
per batch scores every candidate: the prompt followed by the prefix trie of the tokenised labels, under
a tree attention mask (LabelTrie). A 77-way label set costs one pass over the prompt plus the labels'
distinct prefixes instead of 77 full passes; 5 one-letter choices cost the prompt plus 5 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from multitune.data.formatting import IGNORE, Formatter
from multitune.distributed import any_rank
from multitune.errors import UserError
from multitune.scoring.constrained import constrained_greedy, constrained_greedy_uncached
from multitune.scoring.inputs import input_logits, left_pad, model_device, right_pad, supports_tree_mask, uses_prompt_learning, with_sdpa
from multitune.scoring.likelihood import best_candidates, candidate_logprobs
from multitune.scoring.schedule import Schedule
from multitune.scoring.trie import LabelTrie
from multitune.tasks import Example
from multitune.tasks.base import normalize_label

# how a label is chosen: likelihood ranks every label; constrained decodes greedily inside the label trie;
# generate decodes freely and parses the text (README: "Choosing an evaluation mode")
MODES = ("likelihood", "constrained", "generate")


def own_choices_only(scores: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    """[N, K] scores with -inf for the labels a row does not offer (Example.choices; empty: it offers all)."""
    offered = torch.ones(scores.shape, dtype=torch.bool)
    for i, ex in enumerate(examples):
        if ex.choices:
            offered[i] = False
            offered[i, list(ex.choices)] = True
    return scores.masked_fill(~offered.to(scores.device), float("-inf"))


class Scorer:
    """Scores one task's examples with a model, caching the tokenised label sets and their tries.

    With ``lockstep`` (each rank of a distributed job scores its own rows with a model that may be
    sharded, where every forward pass is a collective), every rank runs the same number of batches
    of the same size, padded with repeated prompts whose results are dropped, and the same number of
    forward passes per batch.

    With ``share_prefix`` (the default) each call computes the cache of the prefix its prompts share once and
    starts every batch from it (multitune.scoring.prefix_cache), except for prompt/prefix tuning, which put their
    own virtual tokens in front: under ``lockstep`` the ranks agree to use it, since it is one more pass.
    """

    # up to this many trie nodes (5 one-letter choices: 5), one pass over prompt + trie beats a search
    ONE_PASS_NODES = 64

    def __init__(self, model, formatter: Formatter, batch_size: int = 16, lockstep: bool = False, share_prefix: bool = True):
        self.model = model
        self.formatter = formatter
        self.batch_size = batch_size
        self._cands: dict[tuple[str, ...], list[list[int]]] = {}
        self._tries: dict[tuple[str, ...], LabelTrie] = {}
        tok = formatter.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.schedule = Schedule(model, batch_size, self.pad_id, lockstep, share_prefix)

    @property
    def lockstep(self) -> bool:
        return self.schedule.lockstep

    def candidates(self, labels: Sequence[str]) -> list[list[int]]:
        key = tuple(labels)
        if key not in self._cands:
            self._cands[key] = self.formatter.completion_ids(list(labels))
        return self._cands[key]

    def trie(self, labels: Sequence[str]) -> LabelTrie:
        key = tuple(labels)
        if key not in self._tries:
            self._tries[key] = LabelTrie(self.candidates(labels))
        return self._tries[key]

    @with_sdpa
    def best_labels(self, examples: list[Example], labels: Sequence[str], desc: str = "scoring") -> tuple[list[int], list[float]]:
        """The likelihood argmax and its log-prob: a search for large label sets, one trie pass for small ones."""
        trie = self.trie(labels)
        if (len(trie) <= self.ONE_PASS_NODES or uses_prompt_learning(self.model) or not supports_tree_mask(self.model)
                or self._own_choices(examples)):  # the search knows no per-row choices: score them all, masked
            best = self.likelihood(examples, labels, desc).max(-1)
            return best.indices.tolist(), best.values.tolist()
        prompts = self._prompts(examples, max(len(c) for c in trie.cands))
        self.rescored = 0
        prefix = self.schedule.shared_prefix(prompts)

        def search(batch: list[list[int]]) -> list[tuple[int, float]]:
            i, v, n = best_candidates(self.model, batch, trie, self.pad_id, len(batch), lockstep=self.lockstep, shared=prefix)
            self.rescored += n
            return list(zip(i, v, strict=True))

        found = self.schedule.run(prompts, search, desc)
        return [i for i, _ in found], [v for _, v in found]

    def _prompts(self, examples: list[Example], reserve: int) -> list[list[int]]:
        return self.formatter.prompt_ids(examples, reserve)

    @with_sdpa
    def likelihood(self, examples: list[Example], labels: Sequence[str], desc: str = "scoring") -> torch.Tensor:
        """[N, K] every label's summed log-prob, one pass over prompt + label trie per batch."""
        cands, trie = self.candidates(labels), self.trie(labels)
        prompts = self._prompts(examples, max(len(c) for c in cands))
        prefix = self.schedule.shared_prefix(prompts)
        rows = self.schedule.run(prompts, lambda b: candidate_logprobs(self.model, b, cands, self.pad_id, len(b), trie, prefix), desc)
        return own_choices_only(torch.stack(rows), examples) if rows else torch.empty(0, len(labels))

    def _own_choices(self, examples: list[Example]) -> bool:
        """Whether some row offers only some of the labels (multiple choice); agreed by all ranks under lockstep."""
        mine = any(ex.choices for ex in examples)
        return any_rank(mine) if self.lockstep else mine

    @with_sdpa
    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generating") -> list[str]:
        tok = self.formatter.tokenizer
        eot_ids = tok(self.formatter.eot, add_special_tokens=False)["input_ids"]
        prompts = self._prompts(examples, max_new_tokens)
        dev = model_device(self.model)
        prefix = self.schedule.shared_prefix(prompts)

        def greedy(batch: list[list[int]]) -> list[str]:
            ids, mask = left_pad(prefix.suffixes(batch) if prefix else batch, self.pad_id, dev)
            cache = None
            if prefix:  # the full rows (prefix, padding, own tokens) and the prefix's cache: generate feeds the rest
                ids = torch.cat([torch.tensor(prefix.tokens, device=dev).expand(len(batch), -1), ids], dim=1)
                mask, cache = prefix.attention_mask(mask), prefix.cache(len(batch))
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=[eot_ids[-1], tok.eos_token_id], pad_token_id=self.pad_id,
                synced_gpus=self.lockstep,  # a rank that is done keeps stepping until all are (transformers' own)
            )
            return tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

        return [t.strip() for t in self.schedule.run(prompts, greedy, desc)]

    @with_sdpa
    def constrained(self, examples: list[Example], labels: Sequence[str], desc: str = "constrained") -> tuple[list[int], list[float]]:
        """Greedy decoding restricted to the label trie: the label reached and its summed log-prob."""
        if self._own_choices(examples):
            raise UserError("constrained decoding walks one label set for every row, but these rows each offer their own "
                            "choices (multiple choice with varying choices): use eval.mode likelihood or generate")
        trie = self.trie(labels)
        prompts = self._prompts(examples, max(len(c) for c in trie.cands))
        dev = model_device(self.model)

        def decode(batch: list[list[int]]) -> list[tuple[int, float]]:
            if uses_prompt_learning(self.model):  # one unpadded row at a time, no cache (see multitune.scoring.constrained)
                steps = max(len(c) for c in trie.cands) if self.lockstep else None
                return [constrained_greedy_uncached(self.model, p, trie, lambda ids: input_logits(self.model, input_ids=ids), steps)
                        for p in batch]
            ids, mask = left_pad(batch, self.pad_id, dev)
            return list(zip(*constrained_greedy(self.model, ids, mask, trie, self.pad_id, synced_gpus=self.lockstep), strict=True))

        found = self.schedule.run(prompts, decode, desc)
        return [i for i, _ in found], [v for _, v in found]

    @with_sdpa
    def predict_labels(self, examples: list[Example], labels: Sequence[str], mode: str = "likelihood") -> tuple[list[int], list[float]]:
        """Predicted label indices and their scores (log-prob for likelihood and constrained decoding,
        1/0 parse success for free generation)."""
        if mode == "likelihood":
            return self.best_labels(examples, labels)
        if mode == "constrained":
            return self.constrained(examples, labels)
        lookup = {normalize_label(x): i for i, x in enumerate(labels)}
        width = max(len(c) for c in self.candidates(labels)) + 2
        preds = [lookup.get(normalize_label(t), -1) for t in self.generate(examples, width)]
        # a key the row does not offer is no answer to it (multiple choice with varying choices)
        preds = [p if not ex.choices or p in ex.choices else -1 for p, ex in zip(preds, examples, strict=True)]
        return preds, [float(p >= 0) for p in preds]

    @with_sdpa
    @torch.no_grad()
    def loss(self, examples: list[Example]) -> dict[str, float]:
        """Mean completion-token loss and perplexity (chat tasks)."""
        total, count = self.nll(examples)
        loss = total / max(count, 1)
        return {"n": len(examples), "loss": loss, "perplexity": math.exp(min(loss, 50))}

    def nll(self, examples: list[Example]) -> tuple[float, int]:
        """The summed negative log-likelihood of the completion tokens and their count, batched by the scheduler
        (under lockstep, as many batches on every rank)."""
        enc = self.formatter.encode(examples)
        rows = list(zip(enc["input_ids"], enc["labels"], strict=True))
        per_row = self.schedule.run(rows, self._row_nll, "chat loss", length=lambda r: len(r[0]), filler=([self.pad_id], [IGNORE]))
        return sum(t for t, _ in per_row), sum(n for _, n in per_row)

    def _row_nll(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """Per batch: each row's summed completion-token loss and token count."""
        dev = model_device(self.model)
        ids = right_pad([i for i, _ in batch], self.pad_id, dev)
        labels = right_pad([lab for _, lab in batch], IGNORE, dev)
        mask = right_pad([[1] * len(i) for i, _ in batch], 0, dev)
        logits = input_logits(self.model, input_ids=ids, attention_mask=mask).float()
        shift = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), shift, ignore_index=IGNORE, reduction="none").sum(-1)
        return list(zip(nll.tolist(), (shift != IGNORE).sum(-1).tolist(), strict=True))
