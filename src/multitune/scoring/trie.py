"""The label trie: the candidates' shared prefixes, fed once after the prompt under a tree attention mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
