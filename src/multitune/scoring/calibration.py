"""Calibration of label-likelihood scores: is a prediction made with probability p right p of the time?

The probability of a prediction is its label's share of the softmax over every label's summed
log-probability (what `predict` reports as `score`). The expected calibration error (ECE) bins
predictions by that confidence and averages |accuracy - confidence| over the bins, weighted by their
size (Guo et al., 2017). Written here because scikit-learn's `calibration_curve` gives the per-bin
means but not the bin sizes the weighted average needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BINS = 10


def reliability(confidence: Sequence[float], correct: Sequence[bool], bins: int = BINS) -> list[dict[str, float]]:
    """Per non-empty bin of equal width on [0, 1]: its range, size, accuracy and mean confidence."""
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.shape != hit.shape:
        raise ValueError(f"{conf.shape[0]} confidences but {hit.shape[0]} outcomes")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)  # (lo, hi]; 0 falls in the first bin
    out = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                        "accuracy": float(hit[sel].mean()), "confidence": float(conf[sel].mean())})
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = BINS) -> float:
    """Sum over bins of (bin size / N) * |accuracy - mean confidence|; 0 for a perfectly calibrated scorer."""
    table = reliability(confidence, correct, bins)
    total = sum(b["n"] for b in table)
    return float(sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in table)) if total else 0.0


def calibration_metrics(confidence: Sequence[float], correct: Sequence[bool], bins: int = BINS) -> dict[str, object]:
    """What a task's metrics carry: the ECE, the mean confidence (beside the accuracy: over- or under-confident?)
    and the reliability bins."""
    return {
        "ece": expected_calibration_error(confidence, correct, bins),
        "mean_confidence": float(np.mean(confidence)) if len(confidence) else 0.0,
        "reliability": reliability(confidence, correct, bins),
    }
