"""Per-task validation metrics, and the files and table they are reported in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multitune.data import TaskData, subsample
from multitune.formatting import Formatter
from multitune.scoring import Scorer


def evaluate_tasks(
    model, formatter: Formatter, data: list[TaskData], *, mode: str, batch_size: int, max_rows: int | None = None, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Score every task's validation rows: labels by likelihood (or generation), chat by loss/perplexity."""
    was_training = model.training
    model.eval()
    scorer = Scorer(model, formatter, batch_size)
    results: dict[str, dict[str, Any]] = {}
    for td in data:
        rows = subsample(td.val, max_rows or td.task.cfg.max_eval_rows, seed)
        if td.task.kind == "chat":
            results[td.task.name] = {"kind": "chat", **scorer.loss(rows)}
            continue
        pred, _ = scorer.predict_labels(rows, td.task.label_names, mode)
        gold = [ex.label for ex in rows]
        results[td.task.name] = {"kind": td.task.kind, "mode": mode, **td.task.score(gold, pred)}
    model.train(was_training)
    return results


def summary_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = [["task", "kind", "n", "accuracy", "macro-F1", "chance", "loss", "ppl"]]
    for name, r in results.items():
        if r["kind"] == "chat":
            rows.append([name, "chat", str(r["n"]), "-", "-", "-", f"{r['loss']:.3f}", f"{r['perplexity']:.2f}"])
        else:
            rows.append([name, r["kind"], str(r["n"]), f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}", f"{r['chance']:.3f}", "-", "-"])
    return rows


def format_table(results: dict[str, dict[str, Any]]) -> str:
    rows = summary_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(run_root: Path, results: dict[str, dict[str, Any]], header: str, variant: str = "") -> None:
    """metrics.json and report.md; with a ``variant``, metrics-<variant>.json and report-<variant>.md beside
    them (a partial or other-mode evaluation, which must not replace the run's own results)."""
    suffix = f"-{variant}" if variant else ""
    (run_root / f"metrics{suffix}.json").write_text(json.dumps(results, indent=2))
    rows = summary_rows(results)
    md = [f"# {header}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    for name, r in results.items():
        if r["kind"] == "chat":
            continue
        md += ["", f"## {name}", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for cls, m in r["per_class"].items():
            if isinstance(m, dict) and cls not in ("macro avg", "weighted avg"):
                md.append(f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1-score']:.3f} | {int(m['support'])} |")
    (run_root / f"report{suffix}.md").write_text("\n".join(md) + "\n")
