"""Per-task validation metrics, and the files and table they are reported in."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from multitune.scoring.calibration import calibration_metrics
from multitune.data.load import TaskData, subsample
from multitune.distributed import all_gather, is_distributed, max_over_ranks, rank, world_size
from multitune.rundir import strict_json
from multitune.data.formatting import IGNORE, Formatter
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
    if world_size() == 1:
        return scorer.loss(rows)
    # Scorer.loss makes one forward pass per batch: each rank scores its share in batches, as many as the
    # rank with the most (a spare batch repeats a row and is not counted), and the summed losses are gathered.
    mine = rows[rank()::world_size()]
    chunks = [mine[s : s + scorer.batch_size] for s in range(0, len(mine), scorer.batch_size)]
    total, tokens = 0.0, 0
    for i in range(max_over_ranks(len(chunks))):
        chunk = chunks[i] if i < len(chunks) else rows[:1]
        r = scorer.loss(chunk)
        if i < len(chunks):
            n = supervised_tokens(scorer.formatter, chunk)
            total, tokens = total + r["loss"] * n, tokens + n
    summed = all_gather((total, tokens))
    loss = sum(t for t, _ in summed) / max(sum(n for _, n in summed), 1)
    return {"n": len(rows), "loss": loss, "perplexity": math.exp(min(loss, 50))}


def supervised_tokens(formatter: Formatter, rows: list) -> int:
    """The completion tokens a chat loss averages over (labels past the first position)."""
    return sum(sum(t != IGNORE for t in labels[1:]) for labels in formatter.encode(rows)["labels"])


def summary_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = [["task", "kind", "n", "accuracy", "macro-F1", "chance", "ECE", "loss", "ppl"]]
    for name, r in results.items():
        if r["kind"] == "chat":
            rows.append([name, "chat", str(r["n"]), "-", "-", "-", "-", f"{r['loss']:.3f}", f"{r['perplexity']:.2f}"])
        else:
            ece = f"{r['ece']:.3f}" if "ece" in r else "-"
            rows.append([name, r["kind"], str(r["n"]), f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}", f"{r['chance']:.3f}", ece, "-", "-"])
    return rows


def format_table(results: dict[str, dict[str, Any]]) -> str:
    rows = summary_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(run_root: Path, results: dict[str, dict[str, Any]], header: str, variant: str = "",
                  log_history: list[dict[str, Any]] | None = None) -> dict[str, list[Path]]:
    """metrics.json, the plots (plots/*.png: per labelled task a confusion matrix and per-class F1; training
    curves from ``log_history``) and report.md, which links them. With a ``variant``: metrics-<variant>.json,
    report-<variant>.md and plots/<task>-*-<variant>.png beside them (a partial or other-mode evaluation,
    which must not replace the run's own results). Returns the plots written, per task."""
    from multitune.results.plots import write_plots

    suffix = f"-{variant}" if variant else ""
    metrics = {name: {k: v for k, v in r.items() if k != "predictions"} for name, r in results.items()}
    (run_root / f"metrics{suffix}.json").write_text(strict_json(metrics))  # NaN/inf as null
    plots = write_plots(run_root, results, log_history, suffix)
    rows = summary_rows(results)
    md = [f"# {header}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if "_training" in plots:
        md += ["", "## Training", "", _image("loss and per-task validation accuracy over steps", run_root, plots["_training"][0])]
    for name, r in results.items():
        if r["kind"] == "chat":
            continue
        md += ["", f"## {name}", ""]
        md += [_image(f"{name}: {what}", run_root, png) for what, png in zip(("confusion matrix", "F1 per class"), plots.get(name, []), strict=False)]
        if "ece" in r:
            md += ["", f"Expected calibration error {r['ece']:.3f}: mean confidence {r['mean_confidence']:.3f} "
                   f"against accuracy {r['accuracy']:.3f} ({'over' if r['mean_confidence'] > r['accuracy'] else 'under'}confident)."]
        md += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for cls, m in r["per_class"].items():
            if isinstance(m, dict) and cls not in ("macro avg", "weighted avg"):
                md.append(f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1-score']:.3f} | {int(m['support'])} |")
    (run_root / f"report{suffix}.md").write_text("\n".join(md) + "\n")
    return plots


def _image(alt: str, root: Path, png: Path) -> str:
    return f"![{alt}]({png.relative_to(root).as_posix()})"
