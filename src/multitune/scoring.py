"""Scoring a model on labelled examples: label likelihood (default), greedy generation, and chat loss.

Label likelihood: each candidate completion (label text + end-of-turn, exactly as trained) gets the
summed log-probability of its tokens given the prompt; the prediction is the argmax. The prompt runs
once per example; its KV cache is then repeated across the candidates, so a 77-way label set costs one
prompt pass plus one short pass over the candidates' tokens instead of 77 full passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from multitune.formatting import IGNORE, Formatter
from multitune.tasks import Example
from multitune.tasks.base import normalize_label


def _uses_prompt_learning(model) -> bool:
    # Prompt/prefix tuning put virtual tokens in front of the input or in the KV cache themselves,
    # which does not compose with a cache we build; those models take the full-sequence path.
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


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
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for j, (i, k, seq, plen) in enumerate(chunk):
            pos = torch.arange(plen - 1, len(seq) - 1, device=dev)
            out[i, k] = logp[j, pos, ids[j, pos + 1]].sum().double().cpu()
    return out


@torch.no_grad()
def candidate_logprobs(model, prompts: list[list[int]], cands: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """[N, K] summed log-probs of each candidate after each prompt, running each prompt once."""
    if _uses_prompt_learning(model):
        return candidate_logprobs_reference(model, prompts, cands, pad_id, batch_size)
    dev = _model_device(model)
    K = len(cands)
    first = torch.tensor([c[0] for c in cands], device=dev)
    # the candidates' tokens after the first: fed after the prompt cache, right-padded
    tails = [c[:-1] for c in cands]
    tail_len = max(len(t) for t in tails)
    tail_ids = _right_pad(tails, pad_id, dev) if tail_len else None
    tail_mask = _right_pad([[1] * len(t) for t in tails], 0, dev) if tail_len else None
    targets = _right_pad([c[1:] for c in cands], 0, dev) if tail_len else None
    out = torch.empty(len(prompts), K, dtype=torch.float64)
    # keep rows (prompts x candidates) of the candidate pass near batch_size * 8
    per_chunk = max(1, min(K, (batch_size * 8) // max(1, min(batch_size, len(prompts)))))
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        B = len(batch)
        ids, mask = _left_pad(batch, pad_id, dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        scores = F.log_softmax(res.logits[:, -1].float(), dim=-1)[:, first].double()  # [B, K]
        if tail_len:
            layers = [(layer.keys, layer.values) for layer in res.cache.layers]
            plen = mask.sum(-1)  # [B]
            for k0 in range(0, K, per_chunk):
                k1 = min(K, k0 + per_chunk)
                kc = k1 - k0
                cache = DynamicCache(ddp_cache_data=[(k.repeat_interleave(kc, 0), v.repeat_interleave(kc, 0)) for k, v in layers])
                t_ids = tail_ids[k0:k1].repeat(B, 1)  # row = b * kc + k
                t_mask = tail_mask[k0:k1].repeat(B, 1)
                t_pos = plen.repeat_interleave(kc)[:, None] + torch.arange(tail_len, device=dev)[None]
                full_mask = torch.cat([mask.repeat_interleave(kc, 0), t_mask], dim=1)
                logits = model(input_ids=t_ids, attention_mask=full_mask, position_ids=t_pos, cache=cache).logits
                logp = F.log_softmax(logits.float(), dim=-1)
                tgt = targets[k0:k1].repeat(B, 1)
                tok = logp.gather(-1, tgt[..., None]).squeeze(-1) * t_mask
                scores[:, k0:k1] += tok.sum(-1).double().view(B, kc)
        out[start : start + B] = scores.cpu()
    return out


class Scorer:
    """Scores one task's examples with a model, caching the tokenised label set."""

    def __init__(self, model, formatter: Formatter, batch_size: int = 16):
        self.model = model
        self.formatter = formatter
        self.batch_size = batch_size
        self._cands: dict[tuple[str, ...], list[list[int]]] = {}
        tok = formatter.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def candidates(self, labels: Sequence[str]) -> list[list[int]]:
        key = tuple(labels)
        if key not in self._cands:
            self._cands[key] = self.formatter.completion_ids(list(labels))
        return self._cands[key]

    def _prompts(self, examples: list[Example], reserve: int) -> list[list[int]]:
        raw = self.formatter._ids(self.formatter.prompt_texts(examples))
        return [self.formatter.fit_prompt(p, reserve) for p in raw]

    def likelihood(self, examples: list[Example], labels: Sequence[str], desc: str = "scoring") -> torch.Tensor:
        cands = self.candidates(labels)
        prompts = self._prompts(examples, max(len(c) for c in cands))
        chunks = []
        step = self.batch_size * 4
        for s in tqdm(range(0, len(prompts), step), desc=desc, unit="batch", leave=False):
            chunks.append(candidate_logprobs(self.model, prompts[s : s + step], cands, self.pad_id, self.batch_size))
        return torch.cat(chunks) if chunks else torch.empty(0, len(labels))

    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generating") -> list[str]:
        tok = self.formatter.tokenizer
        eot_ids = tok(self.formatter.eot, add_special_tokens=False)["input_ids"]
        prompts = self._prompts(examples, max_new_tokens)
        dev = _model_device(self.model)
        texts: list[str] = []
        for s in tqdm(range(0, len(prompts), self.batch_size), desc=desc, unit="batch", leave=False):
            ids, mask = _left_pad(prompts[s : s + self.batch_size], self.pad_id, dev)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=[eot_ids[-1], tok.eos_token_id], pad_token_id=self.pad_id,
            )
            texts += tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def predict_labels(self, examples: list[Example], labels: Sequence[str], mode: str = "likelihood") -> tuple[list[int], list[float]]:
        """Predicted label indices and their scores (log-prob for likelihood, 1/0 parse success for generation)."""
        if mode == "likelihood":
            scores = self.likelihood(examples, labels)
            best = scores.max(-1)
            return best.indices.tolist(), best.values.tolist()
        lookup = {normalize_label(x): i for i, x in enumerate(labels)}
        width = max(len(c) for c in self.candidates(labels)) + 2
        preds = [lookup.get(normalize_label(t), -1) for t in self.generate(examples, width)]
        return preds, [float(p >= 0) for p in preds]

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
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            shift = labels[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), shift, ignore_index=IGNORE, reduction="sum")
            total += nll.item()
            count += int((shift != IGNORE).sum())
        loss = total / max(count, 1)
        return {"n": len(examples), "loss": loss, "perplexity": math.exp(min(loss, 50))}
