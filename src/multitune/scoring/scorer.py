"""Scoring a model on labelled examples: label likelihood (default), greedy generation, and chat loss.

Label likelihood: each candidate completion (label text + end-of-turn, exactly as trained) gets the
summed log-probability of its tokens given the prompt; the prediction is the argmax. One forward pass
per batch scores every candidate: the prompt followed by the prefix trie of the tokenised labels, under
a tree attention mask (LabelTrie). A 77-way label set costs one pass over the prompt plus the labels'
distinct prefixes instead of 77 full passes; 5 one-letter choices cost the prompt plus 5 tokens.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from multitune.distributed import any_rank, max_over_ranks
from multitune.errors import UserError
from multitune.data.formatting import IGNORE, Formatter
from multitune.scoring.prefix_cache import SharedPrefix, shared_length
from multitune.tasks import Example
from multitune.tasks.base import normalize_label

# how a label is chosen: likelihood ranks every label; constrained decodes greedily inside the label trie;
# generate decodes freely and parses the text (README: "Choosing an evaluation mode")
MODES = ("likelihood", "constrained", "generate")


def _uses_prompt_learning(model) -> bool:
    # Prompt/prefix tuning put virtual tokens in front of the input or in the KV cache themselves,
    # which does not compose with a cache we build; those models take the full-sequence path.
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def _virtual_positions(model) -> int:
    """Positions a prompt-tuning model puts in front of the input, and so in front of its logits.

    PEFT prepends ``num_virtual_tokens`` soft-prompt embeddings (and -100 labels) to every sequence;
    prefix tuning puts them in the attention cache instead, leaving the logits aligned with the input.
    """
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning or str(cfg.peft_type).endswith("PREFIX_TUNING"):
        return 0
    return cfg.num_virtual_tokens


def _input_logits(model, **inputs) -> torch.Tensor:
    """The logits of a forward pass, one position per input token (virtual tokens dropped)."""
    return model(**inputs).logits[:, _virtual_positions(model) :]


@contextlib.contextmanager
def sdpa_attention(model):
    """Score with SDPA whatever attention the model trains with, then put the training choice back.

    The tree attention mask needs an attention that takes an arbitrary mask (SDPA, eager);
    flash_attention_2 does not, and scoring would fall back to one full forward per label (77 per
    banking77 row). SDPA reads the same weights, so only the kernel changes.
    """
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation_internal")}
    before = {k: c._attn_implementation_internal for k, c in configs.items()}
    switch = any(v not in ("sdpa", None) for v in before.values()) and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:  # restored as it was, without re-checking an implementation that loaded fine
            for k, c in configs.items():
                c._attn_implementation_internal = before[k]


def _with_sdpa(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with sdpa_attention(self.model):
            return method(self, *args, **kwargs)

    return wrapper


def _left_pad(seqs: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _right_pad(seqs: Sequence[list[int]], pad: int, device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def _model_device(model) -> torch.device:
    return next(p for p in model.parameters()).device


@torch.no_grad()
def candidate_logprobs_reference(model, prompts: list[list[int]], cands: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """[N, K] summed log-probs, one full forward pass per (prompt, candidate): simple, slow, the reference."""
    dev = _model_device(model)
    rows = [(i, k, p + c, len(p)) for i, p in enumerate(prompts) for k, c in enumerate(cands)]
    out = torch.empty(len(prompts), len(cands), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = _right_pad([r[2] for r in chunk], pad_id, dev)
        mask = _right_pad([[1] * len(r[2]) for r in chunk], 0, dev)
        logp = F.log_softmax(_input_logits(model, input_ids=ids, attention_mask=mask).float(), dim=-1)
        for j, (i, k, seq, plen) in enumerate(chunk):
            pos = torch.arange(plen - 1, len(seq) - 1, device=dev)
            out[i, k] = logp[j, pos, ids[j, pos + 1]].sum().double().cpu()
    return out


class LabelTrie:
    """The candidates' shared prefixes, fed once after the prompt so that one pass scores every candidate.

    A candidate [t1, ..., tk] needs the next-token log-probs after the prompt (for t1) and after each
    of its proper prefixes [t1..tj] (for tj+1). Those prefixes are the trie's nodes; each node attends
    to the prompt and to its own ancestors only (a tree attention mask), at the position it would have
    in prompt + candidate, so its logits equal those of the full candidate sequence.
    """

    def __init__(self, cands: Sequence[list[int]]):
        index: dict[tuple[int, ...], int] = {}
        tokens, parents, depths = [], [], []
        for c in cands:
            for j in range(1, len(c)):
                key = tuple(c[:j])
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(c[j - 1])
                    parents.append(index.get(key[:-1], -1))
                    depths.append(j)
        # where each token leads from each state (-1 = right after the prompt): (node or -1, candidate or -1)
        self.moves: dict[int, dict[int, tuple[int, int]]] = {}
        for k, c in enumerate(cands):
            for i, t in enumerate(c):
                state = -1 if i == 0 else index[tuple(c[:i])]
                node, cand = self.moves.setdefault(state, {}).get(t, (-1, -1))
                if i == len(c) - 1:
                    cand = k if cand < 0 else cand  # identical candidates: the first wins, as argmax does
                else:
                    node = index[tuple(c[: i + 1])]
                self.moves[state][t] = (node, cand)
        self.cands = [list(c) for c in cands]
        self.under: dict[tuple[int, int], list[int]] = {}  # (state, token) -> the candidates through that move
        for k, c in enumerate(cands):
            for i, t in enumerate(c):
                self.under.setdefault((-1 if i == 0 else index[tuple(c[:i])], t), []).append(k)
        n = len(tokens)
        self.tokens, self.depths = torch.tensor(tokens, dtype=torch.long), torch.tensor(depths, dtype=torch.long)
        self.ancestors = torch.eye(n, dtype=torch.bool)  # [node, key]: key is the node or one of its ancestors
        for i, p in enumerate(parents):
            if p >= 0:
                self.ancestors[i] |= self.ancestors[p]  # parents come first, so their rows are complete
        # slot 0 is the prompt's last position; slot 1 + i is node i
        width = max(len(c) for c in cands)
        self.slots = torch.zeros(len(cands), width, dtype=torch.long)
        self.targets = torch.zeros(len(cands), width, dtype=torch.long)
        self.valid = torch.zeros(len(cands), width, dtype=torch.bool)
        for k, c in enumerate(cands):
            for i, t in enumerate(c):
                self.slots[k, i] = 0 if i == 0 else 1 + index[tuple(c[:i])]
                self.targets[k, i], self.valid[k, i] = t, True

    def __len__(self) -> int:
        return len(self.tokens)

    def inputs(self, ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, past: int = 0) -> dict[str, torch.Tensor]:
        """Model inputs for left-padded prompts [B, L] followed by the trie's nodes; with ``past``, the prompts
        continue a cached prefix of that many tokens, which every position sees."""
        B, L = ids.shape
        N, dev = len(self), ids.device
        plen = mask.sum(-1)
        keys = mask.bool()[:, None, :]
        allowed = torch.zeros(B, L + N, L + N, dtype=torch.bool, device=dev)
        allowed[:, :L, :L] = torch.ones(L, L, dtype=torch.bool, device=dev).tril() & keys
        allowed[:, L:, :L] = keys
        allowed[:, L:, L:] = self.ancestors.to(dev)
        allowed |= torch.eye(L + N, dtype=torch.bool, device=dev)  # left-pad rows must see something
        allowed = torch.cat([torch.ones(B, L + N, past, dtype=torch.bool, device=dev), allowed], dim=-1)
        return {
            "input_ids": torch.cat([ids, self.tokens.to(dev).expand(B, N)], dim=1),
            "position_ids": past + torch.cat([(mask.cumsum(-1) - 1).clamp(min=0), plen[:, None] + self.depths.to(dev) - 1], dim=1),
            # an additive float mask works for both the sdpa and the eager attention
            "attention_mask": torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)[:, None],
            "logits_to_keep": torch.arange(L - 1, L + N, device=dev),  # no vocabulary projection for the prompt
        }

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, K] summed log-probs from logits [B, 1 + N, V] at the prompt's last position and the nodes."""
        dev = logits.device
        logz = torch.logsumexp(logits.float(), dim=-1)  # [B, 1 + N]; avoids a [B, 1 + N, V] float copy
        slots, targets, valid = self.slots.to(dev), self.targets.to(dev), self.valid.to(dev)
        picked = logits[:, slots, targets].float() - logz[:, slots]  # [B, K, width]
        return (picked * valid).sum(-1)


def own_choices_only(scores: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    """[N, K] scores with -inf for the labels a row does not offer (Example.choices; empty: it offers all)."""
    offered = torch.ones(scores.shape, dtype=torch.bool)
    for i, ex in enumerate(examples):
        if ex.choices:
            offered[i] = False
            offered[i, list(ex.choices)] = True
    return scores.masked_fill(~offered.to(scores.device), float("-inf"))


def _supports_tree_mask(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") in ("sdpa", "eager")


@torch.no_grad()
def candidate_logprobs(model, prompts: list[list[int]], cands: list[list[int]], pad_id: int, batch_size: int = 16,
                       trie: LabelTrie | None = None, shared: SharedPrefix | None = None) -> torch.Tensor:
    """[N, K] summed log-probs of each candidate after each prompt: one forward pass per batch of prompts
    (with ``shared``, over the prompts' own tokens only, from the cache of the prefix they all share)."""
    if _uses_prompt_learning(model) or not _supports_tree_mask(model):
        return candidate_logprobs_reference(model, prompts, cands, pad_id, batch_size)
    trie = trie or LabelTrie(cands)
    dev = _model_device(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out = torch.empty(len(prompts), len(cands), dtype=torch.float64)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids, mask = _left_pad(shared.suffixes(batch) if shared else batch, pad_id, dev)
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
    dev = _model_device(model)
    longest = max(len(c) for c in trie.cands)
    best, scores, rescored = [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids, mask = _left_pad(shared.suffixes(batch) if shared else batch, pad_id, dev)
        B = len(batch)
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + (len(shared) if shared else 0)
        if shared:
            mask = shared.attention_mask(mask)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=shared.cache(B) if shared else None,
                    use_cache=True, logits_to_keep=1)
        logp = F.log_softmax(res.logits[:, -1].float(), dim=-1).cpu()
        state, prefix, done = [-1] * B, [0.0] * B, [None] * B
        left_behind: list[list[tuple[float, int, int]]] = [[] for _ in range(B)]  # (bound, state, token)
        next_pos = pos[:, -1] + 1
        for depth in range(longest):  # a candidate of n tokens is reached after n - 1 single-token passes
            feed = [0] * B
            for b in range(B):
                if done[b] is not None:
                    continue
                moves = trie.moves[state[b]]
                toks = list(moves)
                lp = logp[b, toks]
                order = lp.argsort(descending=True)
                pick = toks[int(order[0])]
                for j in order[1:].tolist():
                    left_behind[b].append((prefix[b] + float(lp[j]), state[b], toks[j]))
                node, cand = moves[pick]
                if node >= 0 and cand >= 0:  # a label that is also the prefix of a longer one: rescore
                    left_behind[b].append((math.inf, state[b], pick))
                prefix[b] += float(lp[order[0]])
                if node < 0:
                    done[b] = cand
                else:
                    state[b], feed[b] = node, pick
            finished = all(d is not None for d in done)
            if depth == longest - 1 or (finished and not lockstep):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
            step = torch.tensor(feed, device=dev)[:, None]
            res = model(input_ids=step, attention_mask=mask, position_ids=next_pos[:, None], cache=res.cache, use_cache=True)
            logp = F.log_softmax(res.logits[:, -1].float(), dim=-1).cpu()
            next_pos = next_pos + 1
        # rows where a branch left behind might still win: score, in one pass, the candidates under such
        # branches (for any of these rows) and the ones reached; the others cannot win
        rivals = {b: [(s, t) for bound, s, t in left_behind[b] if bound > prefix[b] - margin] for b in range(B)}
        unsure = [b for b in range(B) if rivals[b]]
        if lockstep and any_rank(bool(unsure)) and not unsure:
            candidate_logprobs(model, batch[:1], trie.cands[:1], pad_id, batch_size, shared=shared)  # another rank rescores: keep pace
        if unsure:
            keep = sorted({k for b in unsure for st in rivals[b] for k in trie.under[st]} | {done[b] for b in unsure})
            sub = [trie.cands[k] for k in keep]
            full = candidate_logprobs(model, [batch[b] for b in unsure], sub, pad_id, batch_size, shared=shared).max(-1)
            for j, b in enumerate(unsure):
                done[b], prefix[b] = keep[int(full.indices[j])], float(full.values[j])
        best += done
        scores += prefix
        rescored.append(len(unsure))
    return best, scores, sum(rescored)


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
        self.lockstep = lockstep
        self.share_prefix = share_prefix
        self._cands: dict[tuple[str, ...], list[list[int]]] = {}
        self._tries: dict[tuple[str, ...], LabelTrie] = {}
        tok = formatter.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

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

    @_with_sdpa
    def best_labels(self, examples: list[Example], labels: Sequence[str], desc: str = "scoring") -> tuple[list[int], list[float]]:
        """The likelihood argmax and its log-prob: a search for large label sets, one trie pass for small ones."""
        trie = self.trie(labels)
        if (len(trie) <= self.ONE_PASS_NODES or _uses_prompt_learning(self.model) or not _supports_tree_mask(self.model)
                or self._own_choices(examples)):  # the search knows no per-row choices: score them all, masked
            best = self.likelihood(examples, labels, desc).max(-1)
            return best.indices.tolist(), best.values.tolist()
        prompts = self._prompts(examples, max(len(c) for c in trie.cands))
        self.rescored = 0
        prefix = self._shared_prefix(prompts)

        def search(batch: list[list[int]]) -> list[tuple[int, float]]:
            i, v, n = best_candidates(self.model, batch, trie, self.pad_id, len(batch), lockstep=self.lockstep, shared=prefix)
            self.rescored += n
            return list(zip(i, v, strict=True))

        found = self._in_length_order(prompts, search, desc)
        return [i for i, _ in found], [v for _, v in found]

    def _prompts(self, examples: list[Example], reserve: int) -> list[list[int]]:
        return self.formatter.prompt_ids(examples, reserve)

    def _shared_prefix(self, prompts: list[list[int]]) -> SharedPrefix | None:
        """The cache of the prefix every prompt starts with, when it is long enough to be worth its pass."""
        if not self.share_prefix or _uses_prompt_learning(self.model) or not _supports_tree_mask(self.model):
            return None  # the same on every rank: the model and the setting are
        n = shared_length(prompts)
        use = n >= SharedPrefix.MIN_TOKENS
        if self.lockstep:  # one more forward pass (a collective under FSDP): on every rank or on none
            use = not any_rank(not use)
        return SharedPrefix(self.model, prompts[0][:n]) if use else None

    @_with_sdpa
    def likelihood(self, examples: list[Example], labels: Sequence[str], desc: str = "scoring") -> torch.Tensor:
        """[N, K] every label's summed log-prob, one pass over prompt + label trie per batch."""
        cands, trie = self.candidates(labels), self.trie(labels)
        prompts = self._prompts(examples, max(len(c) for c in cands))
        prefix = self._shared_prefix(prompts)
        rows = self._in_length_order(prompts, lambda b: candidate_logprobs(self.model, b, cands, self.pad_id, len(b), trie, prefix), desc)
        return own_choices_only(torch.stack(rows), examples) if rows else torch.empty(0, len(labels))

    def _own_choices(self, examples: list[Example]) -> bool:
        """Whether some row offers only some of the labels (multiple choice); agreed by all ranks under lockstep."""
        mine = any(ex.choices for ex in examples)
        return any_rank(mine) if self.lockstep else mine

    def _in_length_order(self, prompts: list[list[int]], fn, desc: str) -> list:
        """fn over batches of prompts of similar length (less padding); results in the input order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        n_batches = max_over_ranks(len(batches)) if self.lockstep else len(batches)
        out: list = [None] * len(prompts)
        for b in tqdm(range(n_batches), desc=desc, unit="batch", leave=False):
            idx = batches[b] if b < len(batches) else []
            batch = [prompts[i] for i in idx]
            if self.lockstep:  # full batches only; a rank out of rows repeats a prompt (or a pad token)
                batch += [batch[0] if batch else (prompts[0] if prompts else [self.pad_id])] * (self.batch_size - len(batch))
            for i, r in zip(idx, fn(batch)[: len(idx)], strict=True):  # results for repeated prompts are dropped
                out[i] = r
        return out

    @_with_sdpa
    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generating") -> list[str]:
        tok = self.formatter.tokenizer
        eot_ids = tok(self.formatter.eot, add_special_tokens=False)["input_ids"]
        prompts = self._prompts(examples, max_new_tokens)
        dev = _model_device(self.model)
        prefix = self._shared_prefix(prompts)

        def greedy(batch: list[list[int]]) -> list[str]:
            ids, mask = _left_pad(prefix.suffixes(batch) if prefix else batch, self.pad_id, dev)
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

        return [t.strip() for t in self._in_length_order(prompts, greedy, desc)]

    @_with_sdpa
    def constrained(self, examples: list[Example], labels: Sequence[str], desc: str = "constrained") -> tuple[list[int], list[float]]:
        """Greedy decoding restricted to the label trie: the label reached and its summed log-prob."""
        from multitune.scoring.constrained import constrained_greedy, constrained_greedy_uncached

        if self._own_choices(examples):
            raise UserError("constrained decoding walks one label set for every row, but these rows each offer their own "
                            "choices (multiple choice with varying choices): use eval.mode likelihood or generate")
        trie = self.trie(labels)
        prompts = self._prompts(examples, max(len(c) for c in trie.cands))
        dev = _model_device(self.model)

        def decode(batch: list[list[int]]) -> list[tuple[int, float]]:
            if _uses_prompt_learning(self.model):  # one unpadded row at a time, no cache (see multitune.scoring.constrained)
                steps = max(len(c) for c in trie.cands) if self.lockstep else None
                return [constrained_greedy_uncached(self.model, p, trie, lambda ids: _input_logits(self.model, input_ids=ids), steps)
                        for p in batch]
            ids, mask = _left_pad(batch, self.pad_id, dev)
            return list(zip(*constrained_greedy(self.model, ids, mask, trie, self.pad_id, synced_gpus=self.lockstep), strict=True))

        found = self._in_length_order(prompts, decode, desc)
        return [i for i, _ in found], [v for _, v in found]

    @_with_sdpa
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

    @_with_sdpa
    @torch.no_grad()
    def loss(self, examples: list[Example]) -> dict[str, float]:
        """Mean completion-token loss and perplexity (chat tasks)."""
        import math

        enc = self.formatter.encode(examples)
        dev = _model_device(self.model)
        total, count = 0.0, 0
        for s in tqdm(range(0, len(examples), self.batch_size), desc="chat loss", unit="batch", leave=False):
            ids = _right_pad(enc["input_ids"][s : s + self.batch_size], self.pad_id, dev)
            labels = _right_pad(enc["labels"][s : s + self.batch_size], IGNORE, dev)
            mask = _right_pad([[1] * len(x) for x in enc["input_ids"][s : s + self.batch_size]], 0, dev)
            logits = _input_logits(self.model, input_ids=ids, attention_mask=mask).float()
            shift = labels[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), shift, ignore_index=IGNORE, reduction="sum")
            total += nll.item()
            count += int((shift != IGNORE).sum())
        loss = total / max(count, 1)
        return {"n": len(examples), "loss": loss, "perplexity": math.exp(min(loss, 50))}
