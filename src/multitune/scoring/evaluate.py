"""Per-task validation metrics: every task's rows scored (labels, calibration, chat loss), shared out over the ranks."""

from __future__ import annotations

import math
from typing import Any

from multitune.scoring.calibration import calibration_metrics
from multitune.data.load import TaskData, subsample
from multitune.distributed import all_gather, is_distributed, rank, world_size
from multitune.data.formatting import Formatter
from multitune.scoring.scorer import Scorer


def evaluate_tasks(
    model, formatter: Formatter, data: list[TaskData], *, mode: str, batch_size: int, max_rows: int | None = None, seed: int = 0,
    detail: bool = False,
) -> dict[str, dict[str, Any]]:
    """Score every task's validation rows: labels by likelihood (or constrained / free generation), chat by loss/perplexity.

    With ``detail`` (the run's final evaluation, `eval`, and evaluations logged to wandb) each labelled
    task also gets "predictions" (per row: text, gold, predicted, score), and in likelihood mode every
    label of every row is scored, so that the score is the prediction's probability among the labels
    (the softmax over their summed log-probs, as `predict` reports it) and the task gets its expected
    calibration error ("ece", "mean_confidence", "reliability"). Without it, likelihood mode may prune
    the labels it scores (the same argmax, faster).

    Under torchrun/accelerate every rank calls this: each scores every world_size-th row, in batches
    whose number (and size) all ranks agree on, since under FSDP each forward pass is a collective;
    the results are gathered, and every rank returns the same full results.
    """
    was_training = model.training
    model.eval()
    scorer = Scorer(model, formatter, batch_size, lockstep=is_distributed())
    results: dict[str, dict[str, Any]] = {}
    for td in data:
        rows = subsample(td.val, max_rows or td.task.cfg.max_eval_rows, seed)
        if td.task.kind == "chat":
            results[td.task.name] = {"kind": "chat", **_chat_loss(scorer, rows)}
            continue
        labels = td.task.label_names
        if detail:
            scored = _gathered(rows, lambda shard: _scored(scorer, shard, labels, mode))
            pred, score = [p for p, _ in scored], [s for _, s in scored]
        else:
            pred = _gathered(rows, lambda shard: scorer.predict_labels(shard, labels, mode)[0])
        gold = [ex.label for ex in rows]
        res = {"kind": td.task.kind, "mode": mode, **td.task.score(gold, pred)}
        if detail and mode == "likelihood":
            res |= calibration_metrics(score, [p == g for p, g in zip(pred, gold, strict=True)])
        if detail:
            res["predictions"] = prediction_rows(rows, labels, gold, pred, score)
        results[td.task.name] = res
    model.train(was_training)
    return results


TEXT_CHARS = 1000  # of a row's prompt kept in a predictions table


def prediction_rows(rows: list, labels: list[str], gold: list[int], pred: list[int], score: list[float]) -> list[dict[str, Any]]:
    """Each row's text, gold label, predicted label (None for an unparsable answer) and score: a predictions table."""
    return [{"text": ex.messages[-1]["content"][:TEXT_CHARS], "gold": labels[g], "predicted": labels[p] if p >= 0 else None,
             "score": round(s, 4)} for ex, g, p, s in zip(rows, gold, pred, score, strict=True)]


def _scored(scorer: Scorer, rows: list, labels: list[str], mode: str) -> list[tuple[int, float]]:
    """Each row's predicted label and its score: the probability among the labels (likelihood), the
    probability of the label decoded (constrained), or 1/0 for a parsed answer (generate)."""
    if mode == "likelihood":
        best = scorer.likelihood(rows, labels).softmax(-1).max(-1)
        return list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    pred, score = scorer.predict_labels(rows, labels, mode)
    return list(zip(pred, [math.exp(s) for s in score] if mode == "constrained" else score, strict=True))


def _gathered(rows: list, fn) -> list:
    """``fn`` over this rank's share of ``rows`` (every world_size-th), gathered back into row order."""
    size, me = world_size(), rank()
    if size == 1:
        return list(fn(rows))
    out: list = [None] * len(rows)
    for r, values in enumerate(all_gather(list(fn(rows[me::size])))):
        out[r::size] = values
    return out


def _chat_loss(scorer: Scorer, rows: list) -> dict[str, float]:
    """Each rank scores every world_size-th row (the scheduler keeps the ranks' forward passes in step); the
    summed losses and token counts are gathered."""
    summed = all_gather(scorer.nll(rows[rank()::world_size()])) if world_size() > 1 else [scorer.nll(rows)]
    loss = sum(t for t, _ in summed) / max(sum(n for _, n in summed), 1)
    return {"n": len(rows), "loss": loss, "perplexity": math.exp(min(loss, 50))}
