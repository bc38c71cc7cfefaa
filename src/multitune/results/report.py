"""The files and the table a run's metrics are reported in: metrics.json, report.md and its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitune.files import atomic_write, strict_json
from multitune.results.plots import write_plots


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
                  log_history: list[dict[str, Any]] | None = None, note: str = "") -> dict[str, list[Path]]:
    """metrics.json, the plots (plots/*.png: per labelled task a confusion matrix and per-class F1; training
    curves from ``log_history``) and report.md, which links them. With a ``variant``: metrics-<variant>.json,
    report-<variant>.md and plots/<task>-*-<variant>.png beside them (a partial or other-mode evaluation,
    which must not replace the run's own results). ``note``: a line under the title (the kept checkpoint).
    Returns the plots written, per task."""
    suffix = f"-{variant}" if variant else ""
    metrics = {name: {k: v for k, v in r.items() if k != "predictions"} for name, r in results.items()}
    atomic_write(run_root / f"metrics{suffix}.json", strict_json(metrics))  # NaN/inf as null; a full disk leaves the old file
    plots = write_plots(run_root, results, log_history, suffix)
    rows = summary_rows(results)
    md = [f"# {header}", "", *([note, ""] if note else []), "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
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
    atomic_write(run_root / f"report{suffix}.md", "\n".join(md) + "\n")
    return plots


def _image(alt: str, root: Path, png: Path) -> str:
    return f"![{alt}]({png.relative_to(root).as_posix()})"
