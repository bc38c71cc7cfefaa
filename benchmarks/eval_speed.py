"""Evaluation throughput on a trained run, side by side in one process: label likelihood with the
prompt's KV cache shared across candidates (what `multitune eval` does), the same likelihood with one
full pass per candidate (the naive reference), and greedy generate-and-parse.

    python benchmarks/eval_speed.py runs/mirror-tiny --rows 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from multitune.data import load_tasks, subsample
from multitune.formatting import Formatter
from multitune.model import load_for_inference, load_tokenizer
from multitune.run import RunDir
from multitune.scoring import Scorer, candidate_logprobs_reference


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--rows", type=int, default=200, help="validation rows per task")
    ap.add_argument("--tasks", nargs="*", default=["banking77", "commonsense_qa"])
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = RunDir(args.run_dir)
    run.require_finished()
    cfg = run.load_config()
    formatter = Formatter(load_tokenizer(cfg.model, None, source=str(run.final)), cfg.model.max_length)
    scorer = Scorer(load_for_inference(cfg, run.final), formatter, cfg.eval.batch_size)
    print(f"{'task':16s} {'method':28s} {'ex/s':>8s} {'accuracy':>9s} {'vs generate':>12s}")
    for td in load_tasks(cfg, run.splits, create=False):
        if td.task.name not in args.tasks:
            continue
        rows = subsample(td.val, args.rows, cfg.seed)
        gold = [ex.label for ex in rows]
        labels = td.task.label_names
        (gen, _), t_gen = _timed(lambda: scorer.predict_labels(rows, labels, "generate"))
        (lik, _), t_lik = _timed(lambda: scorer.predict_labels(rows, labels, "likelihood"))
        cands = scorer.candidates(labels)
        prompts = scorer._prompts(rows, max(len(c) for c in cands))
        ref, t_ref = _timed(lambda: candidate_logprobs_reference(scorer.model, prompts, cands, scorer.pad_id, cfg.eval.batch_size * 8))
        ref = ref.argmax(-1).tolist()
        for name, pred, secs in (("generate + parse", gen, t_gen), ("likelihood, shared KV cache", lik, t_lik),
                                 ("likelihood, pass per label", ref, t_ref)):
            acc = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
            print(f"{td.task.name:16s} {name:28s} {len(rows) / secs:8.1f} {acc:9.3f} {t_gen / secs:11.2f}x")
        same = sum(a == b for a, b in zip(lik, ref, strict=True)) / len(ref)
        print(f"{td.task.name:16s} shared-cache and per-label likelihood agree on {same:.1%} of rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
