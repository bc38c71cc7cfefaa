"""Pictures of a run, written beside report.md: confusion matrices, per-class F1, training curves.

Every function takes plain data (a task's metrics as `evaluate_tasks` returns them, or the Trainer's
``log_history``) and writes one PNG with matplotlib's non-interactive backend, so it works on a
headless pod and in CI.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

TOP_CONFUSED = 15  # above this many classes a full matrix is noise: show the classes most often confused


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a pod; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def most_confused(matrix: np.ndarray, k: int) -> list[int]:
    """Indices of the k classes with the most off-diagonal counts (as gold or as prediction)."""
    off = matrix - np.diag(np.diag(matrix))
    weight = off.sum(axis=0) + off.sum(axis=1)
    order = np.argsort(-weight, kind="stable")
    return sorted(int(i) for i in order[:k])


def confusion_png(task: str, metrics: dict[str, Any], path: Path, top: int = TOP_CONFUSED) -> Path:
    """The confusion matrix; with more than ``top`` classes, the sub-matrix of the most confused ones."""
    plt = _pyplot()
    labels = metrics["confusion_matrix"]["labels"]
    matrix = np.asarray(metrics["confusion_matrix"]["matrix"])
    keep = list(range(len(labels))) if len(labels) <= top else most_confused(matrix, top)
    sub, names = matrix[np.ix_(keep, keep)], [labels[i] for i in keep]
    size = max(4.0, 0.45 * len(keep) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(sub, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for (i, j), v in np.ndenumerate(sub):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > sub.max() / 2 else "black")
    shown = "" if len(keep) == len(labels) else f" ({len(keep)} most confused of {len(labels)} classes)"
    ax.set_title(f"{task}: confusion matrix{shown}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_class_f1_png(task: str, metrics: dict[str, Any], path: Path) -> Path:
    """One horizontal bar per class, worst first, so the classes that need work are at the top."""
    plt = _pyplot()
    rows = [(name, m["f1-score"], int(m["support"])) for name, m in metrics["per_class"].items()
            if isinstance(m, dict) and name not in ("macro avg", "weighted avg", "micro avg")]
    rows.sort(key=lambda r: (r[1], r[0]), reverse=True)  # barh draws bottom-up: the worst ends on top
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(rows) + 1)))
    ax.barh(range(len(rows)), [r[1] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [f"{r[0]} ({r[2]})" for r in rows], fontsize=7)
    ax.set_xlim(0, 1)
    ax.axvline(metrics["macro_f1"], color="tab:red", linestyle="--", label=f"macro-F1 {metrics['macro_f1']:.3f}")
    ax.set_xlabel("F1 (support in brackets)")
    ax.set_title(f"{task}: F1 per class")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


NOT_A_TASK = {"eval_mean_token_accuracy"}  # TRL's token accuracy over every supervised token, not a task's label accuracy


def curves(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Series by name from the Trainer's log history: train loss, eval losses, per-task accuracy."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if step is None or not isinstance(value, (int, float)):
                continue
            if key in NOT_A_TASK:
                continue
            if _train_loss(key) or (key.startswith("eval_") and (key.endswith("loss") or key.endswith("_accuracy"))):
                out[key].append((int(step), float(value)))
    return dict(out)


def _train_loss(key: str) -> bool:
    """The training loss: ``loss``, or ``loss/<task>`` for one task's model of a per_task run."""
    return key == "loss" or key.startswith("loss/")


def panels(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[str, str, list[tuple[int, float]]]]]:
    """What the training plot draws: per panel, (legend label, line style, points) for each curve."""
    loss = [(name.replace("loss", "train", 1).replace("/", " ") if _train_loss(name) else name.removeprefix("eval_"),
             "-" if _train_loss(name) else "o--", points)
            for name, points in sorted(series.items()) if name.endswith("loss") or _train_loss(name)]
    accuracy = [(name.removeprefix("eval_").removesuffix("_accuracy"), "o-", points)
                for name, points in sorted(series.items()) if name.endswith("_accuracy")]
    return {"loss": loss, "validation accuracy per task": accuracy} if accuracy else {"loss": loss}


def training_png(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training and validation loss over steps, and each task's validation accuracy; None if nothing was logged."""
    series = curves(log_history)
    if not series:
        return None
    plt = _pyplot()
    drawn = panels(series)
    fig, axes = plt.subplots(1, len(drawn), figsize=(6 * len(drawn), 4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], drawn.items(), strict=True):
        for label, style, points in lines:
            ax.plot(*zip(*points, strict=True), style, label=label, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if title == "loss" else "accuracy")
        if title != "loss":
            ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(folder: Path, results: dict[str, dict[str, Any]], log_history: list[dict[str, Any]] | None = None,
                suffix: str = "") -> dict[str, list[Path]]:
    """Every plot of a run into ``folder/plots``; returns the files per task (and ``_training``)."""
    out_dir = Path(folder) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for task, metrics in results.items():
        if metrics.get("kind") == "chat" or "confusion_matrix" not in metrics:
            continue
        written[task] = [
            confusion_png(task, metrics, out_dir / f"{task}-confusion{suffix}.png"),
            per_class_f1_png(task, metrics, out_dir / f"{task}-f1{suffix}.png"),
        ]
    if log_history:
        png = training_png(log_history, out_dir / "training.png")
        if png is not None:
            written["_training"] = [png]
    return written
