"""TF-IDF + logistic regression on a run's own recorded train/validation split, printed next to the
run's likelihood-scored accuracy, so the fine-tuned model is judged against a classical baseline on
exactly the same rows.

    python benchmarks/tfidf_baseline.py runs/mirror-tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline

from multitune.data.load import load_tasks
from multitune.rundir import RunDir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    run = RunDir(args.run_dir)
    cfg = run.load_config()
    model_metrics = json.loads(run.metrics.read_text()) if run.metrics.exists() else {}
    print(f"{'task':16s} {'n_val':>6s} {'chance':>7s} {'tfidf+LR acc':>13s} {'macro-F1':>9s} {'model acc':>10s} {'macro-F1':>9s}")
    for td in load_tasks(cfg, run.splits, create=False):
        if td.task.kind == "chat":
            continue
        text = lambda ex: " ".join(m["content"] for m in ex.messages if m["role"] == "user")  # noqa: E731
        t0 = time.time()
        clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1), LogisticRegression(max_iter=2000, C=10))
        clf.fit([text(ex) for ex in td.train], [ex.label for ex in td.train])
        pred = clf.predict([text(ex) for ex in td.val])
        gold = [ex.label for ex in td.val]
        m = model_metrics.get(td.task.name, {})
        print(f"{td.task.name:16s} {len(gold):6d} {1 / len(td.task.label_names):7.3f} {accuracy_score(gold, pred):13.3f} "
              f"{f1_score(gold, pred, average='macro'):9.3f} {m.get('accuracy', float('nan')):10.3f} {m.get('macro_f1', float('nan')):9.3f}"
              f"   ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
