"""Label likelihood, per batch of prompts: every candidate's summed log-probability in one pass over prompt +
label trie, the exact argmax by a search of the trie, and the one-pass-per-candidate reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from multitune.distributed import any_rank
from multitune.scoring.inputs import input_logits, left_pad, model_device, right_pad, supports_tree_mask, uses_prompt_learning
from multitune.scoring.prefix_cache import SharedPrefix
from multitune.scoring.trie import LabelTrie


@torch.no_grad()
def candidate_logprobs_reference(model, prompts: list[list[int]], cands: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """[N, K] summed log-probs, one full forward pass per (prompt, candidate): simple, slow, the reference."""
    dev = model_device(model)
    rows = [(i, k, p + c, len(p)) for i, p in enumerate(prompts) for k, c in enumerate(cands)]
    out = torch.empty(len(prompts), len(cands), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = right_pad([r[2] for r in chunk], pad_id, dev)
        mask = right_pad([[1] * len(r[2]) for r in chunk], 0, dev)
        logp = F.log_softmax(input_logits(model, input_ids=ids, attention_mask=mask).float(), dim=-1)
        for j, (i, k, seq, plen) in enumerate(chunk):
            pos = torch.arange(plen - 1, len(seq) - 1, device=dev)
            out[i, k] = logp[j, pos, ids[j, pos + 1]].sum().double().cpu()
    return out


@torch.no_grad()
def candidate_logprobs(model, prompts: list[list[int]], cands: list[list[int]], pad_id: int, batch_size: int = 16,
                       trie: LabelTrie | None = None, shared: SharedPrefix | None = None) -> torch.Tensor:
    """[N, K] summed log-probs of each candidate after each prompt: one forward pass per batch of prompts
    (with ``shared``, over the prompts' own tokens only, from the cache of the prefix they all share)."""
    if uses_prompt_learning(model) or not supports_tree_mask(model):
        return candidate_logprobs_reference(model, prompts, cands, pad_id, batch_size)
    trie = trie or LabelTrie(cands)
    dev = model_device(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out = torch.empty(len(prompts), len(cands), dtype=torch.float64)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids, mask = left_pad(shared.suffixes(batch) if shared else batch, pad_id, dev)
        inputs = trie.inputs(ids, mask, dtype, past=len(shared) if shared else 0)
        logits = model(**inputs, cache=shared.cache(len(batch)) if shared else None, use_cache=False).logits
        out[start : start + len(ids)] = trie.score(logits).double().cpu()
    return out


@torch.no_grad()
def best_candidates(model, prompts: list[list[int]], trie: LabelTrie, pad_id: int, batch_size: int = 16,
                    margin: float = 1e-4, lockstep: bool = False, shared: SharedPrefix | None = None) -> tuple[list[int], list[float], int]:
    """The likelihood argmax without scoring every candidate: exact, and usually as cheap as greedy decoding.

    Follow the highest-scoring branch of the label trie token by token, like greedy decoding restricted
    to the labels, to a complete candidate with score s. A candidate's score is a sum of log-probs
    (each <= 0), so any branch left behind at a prefix scoring below s cannot win: when every branch
    left behind scores below s - margin, the candidate reached is the argmax. Rows where one might win
    are rescored in full (one trie pass). Returns the indices, their scores, and how many rows were
    rescored.

    With ``lockstep`` (every rank of a sharded model calls this on its own rows) the number of forward
    passes must not depend on the rows, since under FSDP each one is a collective: each batch decodes
    as many steps as the longest label needs (rows already done feed a filler token), and rescores
    when any rank has a row to rescore (a rank with none makes one small pass).

    With ``shared`` (the cache of a prefix every prompt starts with) each batch feeds the prompts' own tokens only.
    """
    best, scores, rescored = [], [], 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        walk = _TrieWalk(len(batch))
        _greedy_walk(model, batch, trie, pad_id, walk, lockstep, shared)
        rescored += _rescore_rivals(model, batch, trie, pad_id, batch_size, walk, margin, lockstep, shared)
        best += walk.done
        scores += walk.prefix
    return best, scores, rescored


class _TrieWalk:
    """Each row's walk down the label trie: its state, the score of its path, the candidate it reached,
    and the branches it left behind as (upper bound on their score, state, token)."""

    def __init__(self, rows: int):
        self.state, self.prefix, self.done = [-1] * rows, [0.0] * rows, [None] * rows
        self.left_behind: list[list[tuple[float, int, int]]] = [[] for _ in range(rows)]

    def step(self, b: int, trie: LabelTrie, logp: torch.Tensor) -> int:
        """Row ``b`` takes its best move from the next-token log-probs; returns the token to feed next (0 when done)."""
        moves = trie.moves[self.state[b]]
        toks = list(moves)
        lp = logp[toks]
        order = lp.argsort(descending=True)
        pick = toks[int(order[0])]
        for j in order[1:].tolist():
            self.left_behind[b].append((self.prefix[b] + float(lp[j]), self.state[b], toks[j]))
        node, cand = moves[pick]
        if node >= 0 and cand >= 0:  # a label that is also the prefix of a longer one: rescore
            self.left_behind[b].append((math.inf, self.state[b], pick))
        self.prefix[b] += float(lp[order[0]])
        if node < 0:
            self.done[b] = cand
            return 0
        self.state[b] = node
        return pick


def _greedy_walk(model, batch: list[list[int]], trie: LabelTrie, pad_id: int, walk: _TrieWalk, lockstep: bool,
                 shared: SharedPrefix | None) -> None:
    """Greedy decoding restricted to the trie, every row of the batch at once, from one pass over the prompts
    and then one single-token pass per step (a candidate of n tokens is reached after n - 1 of them)."""
    dev, B = model_device(model), len(batch)
    longest = max(len(c) for c in trie.cands)
    ids, mask = left_pad(shared.suffixes(batch) if shared else batch, pad_id, dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0) + (len(shared) if shared else 0)
    if shared:
        mask = shared.attention_mask(mask)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=shared.cache(B) if shared else None,
                use_cache=True, logits_to_keep=1)
    next_pos = pos[:, -1] + 1
    for depth in range(longest):
        logp = F.log_softmax(res.logits[:, -1].float(), dim=-1).cpu()
        feed = [walk.step(b, trie, logp[b]) if walk.done[b] is None else 0 for b in range(B)]
        finished = all(d is not None for d in walk.done)
        if depth == longest - 1 or (finished and not lockstep):  # lockstep: as many passes on every rank
            return
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
        step = torch.tensor(feed, device=dev)[:, None]
        res = model(input_ids=step, attention_mask=mask, position_ids=next_pos[:, None], cache=res.cache, use_cache=True)
        next_pos = next_pos + 1


def _rescore_rivals(model, batch: list[list[int]], trie: LabelTrie, pad_id: int, batch_size: int, walk: _TrieWalk,
                    margin: float, lockstep: bool, shared: SharedPrefix | None) -> int:
    """Rows where a branch left behind might still win: score, in one pass, the candidates under such branches
    (for any of these rows) and the ones reached; the others cannot win. Returns how many rows were rescored."""
    B = len(batch)
    rivals = {b: [(s, t) for bound, s, t in walk.left_behind[b] if bound > walk.prefix[b] - margin] for b in range(B)}
    unsure = [b for b in range(B) if rivals[b]]
    if lockstep and any_rank(bool(unsure)) and not unsure:
        candidate_logprobs(model, batch[:1], trie.cands[:1], pad_id, batch_size, shared=shared)  # another rank rescores: keep pace
    if unsure:
        keep = sorted({k for b in unsure for st in rivals[b] for k in trie.under[st]} | {walk.done[b] for b in unsure})
        sub = [trie.cands[k] for k in keep]
        full = candidate_logprobs(model, [batch[b] for b in unsure], sub, pad_id, batch_size, shared=shared).max(-1)
        for j, b in enumerate(unsure):
            walk.done[b], walk.prefix[b] = keep[int(full.indices[j])], float(full.values[j])
    return len(unsure)
