"""Evaluation throughput on a trained run, side by side in one process: greedy generate-and-parse;
label likelihood as `multitune eval` computes it (the exact argmax: a pruned search over the label
trie, or one trie pass for small label sets); every label's score in one pass over prompt + label
trie (what `predict` uses for probabilities); and one full pass per label (the naive reference).

    python -m benchmarks.eval_speed runs/mirror-tiny --rows 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from multitune.data.load import load_tasks, subsample
from multitune.data.formatting import Formatter
from multitune.modeling.load import load_for_inference, load_tokenizer
from multitune.rundir import RunDir
from multitune.scoring.likelihood import candidate_logprobs_reference
from multitune.scoring.scorer import Scorer


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(run_dir: Path, rows: int = 200, tasks: tuple[str, ...] = ("banking77", "commonsense_qa"),
            reference_rows: int = 40) -> list[dict]:
    """Every method on the same rows of a finished run's validation split; prints a table, returns the rows."""
    run = RunDir(run_dir)
    run.require_finished()
    cfg = run.load_config()
    formatter = Formatter(load_tokenizer(cfg.model, None, source=str(run.final)), cfg.model.max_length)
    scorer = Scorer(load_for_inference(cfg, run.final), formatter, cfg.eval.batch_size)
    print(f"{'task':16s} {'method':34s} {'ex/s':>8s} {'accuracy':>9s} {'vs generate':>12s}")
    results: list[dict] = []
    for td in load_tasks(cfg, run.splits, create=False):
        if td.task.name not in tasks:
            continue
        rows_ = subsample(td.val, rows, cfg.seed)
        gold = [ex.label for ex in rows_]
        labels = td.task.label_names
        (gen, _), t_gen = _timed(lambda: scorer.predict_labels(rows_, labels, "generate"))
        (lik, _), t_lik = _timed(lambda: scorer.predict_labels(rows_, labels, "likelihood"))
        searched = len(scorer.trie(labels)) > scorer.ONE_PASS_NODES
        (full, t_full) = _timed(lambda: scorer.likelihood(rows_, labels).argmax(-1).tolist())
        # the naive reference is slow (one pass per label): timed on the first `reference_rows` rows only
        cands = scorer.candidates(labels)
        n_ref = min(len(rows_), reference_rows)
        prompts = scorer._prompts(rows_[:n_ref], max(len(c) for c in cands))
        ref, t_ref = _timed(lambda: candidate_logprobs_reference(scorer.model, prompts, cands, scorer.pad_id, cfg.eval.batch_size * 8))
        ref = ref.argmax(-1).tolist()
        t_ref *= len(rows_) / n_ref  # per-row rate scaled to the same row count as the others
        how = f"search, {scorer.rescored} rescored" if searched else "one trie pass"
        methods = [("generate + parse", gen, t_gen), (f"likelihood argmax ({how})", lik, t_lik),
                   ("likelihood, all labels, trie", full, t_full), (f"likelihood, pass per label ({n_ref} rows)", ref, t_ref)]
        for name, pred, secs in methods:
            acc = sum(p == g for p, g in zip(pred, gold[: len(pred)], strict=True)) / len(pred)
            print(f"{td.task.name:16s} {name:34s} {len(rows_) / secs:8.1f} {acc:9.3f} {t_gen / secs:11.2f}x")
            results.append({"task": td.task.name, "method": name, "examples_per_s": len(rows_) / secs, "accuracy": acc,
                            "vs_generate": t_gen / secs, "rows": len(pred)})
        same = sum(a == b == c for a, b, c in zip(lik, full, ref)) / len(ref)
        print(f"{td.task.name:16s} the three likelihood methods pick the same label on {same:.1%} of the {n_ref} rows all scored")
        results.append({"task": td.task.name, "likelihood_methods_agree": same})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--rows", type=int, default=200, help="validation rows per task")
    ap.add_argument("--tasks", nargs="*", default=["banking77", "commonsense_qa"])
    args = ap.parse_args(argv)
    measure(args.run_dir, args.rows, tuple(args.tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
