"""How to compute the loss on supervised positions only: a measured choice (issue 10, item 1).

One training step (forward + backward, fp32, CPU or the GPU if there is one) on batches shaped like
classification fine-tuning (prompts of 60-200 tokens, answers of 2-6), for each way of computing the
loss:

- all, full logits: the model's own loss with labels (every position through the head, [B, T, V] logits);
- all, TRL fused head: TRL 1.16's chunked head as SFTTrainer calls it (every position on CPU; only
  supervised ones on Triton devices);
- left-pad + logits_to_keep: rows padded on the left so every answer ends the batch, the head on the
  last K positions of every row ([B, K, V]);
- gather (multitune's choice): hidden states gathered at the supervised positions, the head on those
  rows only ([N, V]).

    python -m benchmarks.loss_positions                 # the bench's tiny shape and a wider one
    python -m benchmarks.loss_positions --shapes tiny --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # hidden, layers, vocab: the bench's tiny model, and a wider one where the head weighs more
    "tiny": (128, 4, 4096),
    "wide": (512, 4, 32000),
}


def _model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, vocab = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).train()


def batch(vocab: int, rows: int = 16, seed: int = 0, side: str = "right") -> dict[str, torch.Tensor]:
    """Rows of a 60-200-token prompt (-100) and a 2-6-token answer; padded on `side`."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(60, 200, (rows,), generator=g).tolist()
    answers = torch.randint(2, 7, (rows,), generator=g).tolist()
    T = max(lengths)
    ids = torch.zeros(rows, T, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (n, a) in enumerate(zip(lengths, answers, strict=True)):
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, cols] = torch.randint(10, vocab, (n,), generator=g)
        mask[i, cols] = 1
        labels[i, cols.start + n - a : cols.start + n] = ids[i, cols.start + n - a : cols.start + n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _all_full(model, b):
    return model(**b, use_cache=False).loss


def _left_pad_keep(model, b):
    k = int((b["labels"] != -100).sum(1).max()) + 1  # every row's answer lies in the last k positions
    pos = (b["attention_mask"].cumsum(1) - 1).clamp(min=0)  # positions from each row's first real token
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=pos,
                   logits_to_keep=k, use_cache=False).logits
    targets = b["labels"][:, -k + 1 :]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def _gather(model, b):
    from multitune.modeling.loss import supervised_loss

    return supervised_loss(model, b)[0]


def _trl_fused(model, b):
    return model(**b, use_cache=False, fused_lm_head=True).loss


def measure(shape: str, steps: int, device: str) -> list[dict]:
    from trl.trainer.utils import add_fused_lm_head

    model = _model(shape).to(device)
    vocab = model.config.vocab_size
    right = [{k: v.to(device) for k, v in batch(vocab, seed=s).items()} for s in range(steps + 1)]
    left = [{k: v.to(device) for k, v in batch(vocab, seed=s, side="left").items()} for s in range(steps + 1)]
    fused = _model(shape).to(device)
    add_fused_lm_head(fused)
    methods = [("all, full logits", model, _all_full, right), ("all, TRL fused head", fused, _trl_fused, right),
               ("left-pad + logits_to_keep", model, _left_pad_keep, left), ("gather (multitune)", model, _gather, right)]
    # round robin, one step of each method in turn: a busy machine slows every method alike
    times: dict[str, list[float]] = {name: [] for name, *_ in methods}
    losses: dict[str, float] = {}
    for i in range(steps + 1):
        for name, m, fn, batches in methods:
            m.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = fn(m, batches[i])
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step warms up
                times[name].append(time.perf_counter() - t0)
            else:
                losses[name] = loss.item()
    rows = [{"shape": shape, "method": name, "step_ms": 1000 * statistics.median(times[name]), "loss_step0": losses[name]}
            for name in times]
    base = rows[0]["step_ms"]
    for r in rows:
        r["speedup_vs_all"] = base / r["step_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [r for s in args.shapes for r in measure(s, args.steps, device)]
    print(f"{'shape':6s} {'method':28s} {'step ms':>8s} {'vs all':>7s} {'loss':>8s}")
    for r in rows:
        print(f"{r['shape']:6s} {r['method']:28s} {r['step_ms']:8.1f} {r['speedup_vs_all']:6.2f}x {r['loss_step0']:8.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
