"""TEST HELPER: evaluate a trained run on 1 process or on each rank of a torchrun job, and record what each rank did.

    python tests/distributed/eval_ranks.py OUT_DIR RUN_DIR --chat CHAT_DATASET
    torchrun --nproc_per_node 2 tests/distributed/eval_ranks.py OUT_DIR RUN_DIR --chat CHAT_DATASET

Under torchrun it evaluates twice: first with a full replica of the model on each rank (what evaluation
sees under DDP: Trainer.model is the unwrapped model), then with the model sharded by FSDP2
(`fully_shard` per decoder layer and at the root, as accelerate's FSDP2 config does), where every
forward pass is a collective. For each evaluation it writes OUT_DIR/<setting>-rank<R>.json: the
predictions evaluate_tasks scored (the gathered list each task's metrics are computed from), the rows
this rank scored itself, and how many forward passes it made.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from multitune.scoring import evaluate
from multitune.config import TaskConfig
from multitune.data.load import load_tasks
from multitune.data.formatting import Formatter
from multitune.modeling.load import load_for_inference, load_tokenizer
from multitune.rundir import RunDir
from multitune.tasks import resolve_tasks


def _instrument(model, data) -> dict:
    """Count forward passes (through the first decoder layer), rows given to the scorer, and predictions."""
    seen: dict = {"forwards": 0, "rows": {}, "predictions": {}}
    layer = model.get_base_model().model.layers[0]
    layer.register_forward_pre_hook(lambda *_: seen.__setitem__("forwards", seen["forwards"] + 1))
    for td in data:
        if td.task.kind == "chat":
            continue
        score = td.task.score

        def recorded(gold, pred, name=td.task.name, score=score):
            seen["predictions"].setdefault(name, []).append(list(pred))
            return score(gold, pred)

        td.task.score = recorded
    scorer_cls = evaluate.Scorer
    original_predict, original_loss = scorer_cls.predict_labels, scorer_cls.loss
    original_best = scorer_cls.best_labels
    scorer_cls.rescored_total = 0

    def best_labels(self, *a, **kw):
        out = original_best(self, *a, **kw)
        scorer_cls.rescored_total += getattr(self, "rescored", 0)
        return out

    scorer_cls.best_labels = best_labels

    def predict_labels(self, examples, labels, mode="likelihood"):
        seen["rows"].setdefault("labels", []).append(len(examples))
        return original_predict(self, examples, labels, mode)

    def loss(self, examples):
        seen["rows"].setdefault("chat", []).append(len(examples))
        return original_loss(self, examples)

    scorer_cls.predict_labels, scorer_cls.loss = predict_labels, loss
    return seen


def _evaluate(model, formatter, data, batch_size: int) -> dict:
    out = {
        "likelihood": evaluate.evaluate_tasks(model, formatter, data, mode="likelihood", batch_size=batch_size),
        "one_row": evaluate.evaluate_tasks(model, formatter, data[:2], mode="likelihood", batch_size=batch_size, max_rows=1),
        "generate": evaluate.evaluate_tasks(model, formatter, data[:1], mode="generate", batch_size=batch_size, max_rows=7),
        # 9 rows: 5 on rank 0 (2 batches of 4), 4 on rank 1 (1 batch, and 1 of repeats to keep pace). Constrained
        # decoding's steps depend on the rows; detail scores every label of every row
        "constrained": evaluate.evaluate_tasks(model, formatter, data[:2], mode="constrained", batch_size=batch_size, max_rows=9),
        "detail": evaluate.evaluate_tasks(model, formatter, data[:2], mode="likelihood", batch_size=batch_size, max_rows=9,
                                          detail=True),
    }
    # the label-trie search (best_candidates) for every label set, as 77 banking intents of a real tokenizer take:
    # its decoding steps and rescoring depend on the rows
    evaluate.Scorer.ONE_PASS_NODES = 0
    out["search"] = evaluate.evaluate_tasks(model, formatter, data[:2], mode="likelihood", batch_size=batch_size)
    out["search_rescored"] = evaluate.Scorer.rescored_total
    evaluate.Scorer.ONE_PASS_NODES = 64
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--chat", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    run = RunDir(args.run_dir)
    cfg = run.load_config()
    formatter = Formatter(load_tokenizer(cfg.model, None, source=str(run.final)), cfg.model.max_length)
    chat_cfg = resolve_tasks(cfg.model_copy(update={"tasks": [TaskConfig(name="chat", dataset=str(args.chat), max_rows=30)]}))
    data = load_tasks(cfg, run.splits, create=False) + load_tasks(chat_cfg, None, create=True)
    model = load_for_inference(cfg, run.final)
    settings = ["replica"] + (["fsdp2"] if world > 1 else [])
    args.out.mkdir(parents=True, exist_ok=True)
    seen = _instrument(model, data)
    for setting in settings:
        if setting == "fsdp2":
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            for layer in model.get_base_model().model.layers:
                fully_shard(layer)
            fully_shard(model)
            register_fsdp_forward_method(model, "generate")
        seen.update(forwards=0, rows={}, predictions={})
        evaluate.Scorer.rescored_total = 0
        results = _evaluate(model, formatter, data, args.batch_size)
        record = {**seen, "results": results, "world_size": world}
        (args.out / f"{setting}-rank{rank}.json").write_text(json.dumps(record, default=str))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
