"""Training throughput: multitune's recipe against TRL SFTTrainer with its defaults, and the recipe's options.

Each side runs in its own process (so peak RSS is its own) on the same model, the same train split
of the same tasks, the same batch size, learning rate, schedule and number of optimizer steps. Then
both trained models are scored with the same function on the same validation rows: the mean loss of
the answer tokens (the baseline trains on every token, multitune on the answers only, so their
training losses measure different things; this one compares what they learnt).

    python -m benchmarks.train_speed --side baseline --config CONFIG.yaml --steps 60 --out side.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# what each side changes on top of the benchmark config (multitune sides) -- the baseline is TRL's defaults
SIDES: dict[str, dict[str, Any]] = {
    "baseline": {},
    "padded": {"train.packing": False},  # multitune's default on CPU: the winner below
    "padded+grouped": {"train.packing": False, "train.group_by_length": True},
    "packed": {"train.packing": True},
    "padded+eager": {"train.packing": False, "model.attn_implementation": "eager"},
    "padded+ckpt": {"train.packing": False, "train.gradient_checkpointing": True},
    "padded+bf16": {"train.packing": False, "train.bf16": True},
    "padded+workers2": {"train.packing": False, "train.dataloader_workers": 2},
    "padded+compile": {"train.packing": False, "train.compile": True},  # not in `make bench`: compiling takes minutes
}
DEFAULT_SIDES = [s for s in SIDES if s != "padded+compile"]
EVAL_ROWS = 100  # per task, for the common answer-token validation loss


def _val_loss(model, formatter, data) -> float:
    from multitune.data import subsample
    from multitune.scoring import Scorer

    scorer = Scorer(model.eval(), formatter, batch_size=32)
    losses = [scorer.loss(subsample(td.val, EVAL_ROWS, 0)) for td in data]
    return sum(r["loss"] * r["n"] for r in losses) / sum(r["n"] for r in losses)


def _history(log_history: list[dict]) -> dict[str, float]:
    steps = [e for e in log_history if "loss" in e]
    end = next(e for e in log_history if "train_loss" in e)  # the summary row (per-step rows carry a train_runtime too)
    # Trainer's train_runtime includes the validation-loss pass at the end of training: not training
    evals = sum(v for e in log_history for k, v in e.items() if k.startswith("eval_") and k.endswith("_runtime"))
    return {"train_loss_last": steps[-1]["loss"], "tokens": steps[-1]["num_tokens"], "train_s": end["train_runtime"] - evals,
            "eval_s": evals, "steps": end.get("step", steps[-1]["step"])}


def run_ours(cfg_path: Path, steps: int, overrides: dict[str, Any]) -> dict[str, Any]:
    from multitune.config import load_config
    from multitune.formatting import Formatter
    from multitune.model import load_for_inference, load_tokenizer
    from multitune.prepared import prepare
    from multitune.run import RunDir
    from multitune.train import train

    cfg = load_config(cfg_path, [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()]
                      + [f"train.max_steps={steps}"])
    if cfg.train.packing:
        # a packed row holds several examples: keep about as many examples per optimizer step as the other sides
        tok = load_tokenizer(cfg.model, None)
        lengths = [len(x) for x in prepare(cfg, Formatter(tok, cfg.model.max_length), None).train["input_ids"]]
        rows = max(1, round(cfg.train.batch_size * sum(lengths) / len(lengths) / cfg.model.max_length))
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": rows})})
    train(cfg, resume=False, overwrite=True)
    peak_gpu = _peak_gpu_gib()
    run = RunDir(Path(cfg.run_dir))
    state = json.loads((run.root / "trainer_state.json").read_text())
    formatter = Formatter(load_tokenizer(cfg.model, None, source=str(run.final)), cfg.model.max_length)
    data = prepare(cfg, formatter, run.splits).data
    model = load_for_inference(cfg, run.final)
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) if cfg.peft.method != "full" else None
    return {**_history(state["log_history"]), "val_answer_loss": _val_loss(model, formatter, data),
            "adapter_params": adapter, "peak_gpu_gib": peak_gpu}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peak_gpu_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_baseline(cfg_path: Path, steps: int, lora: bool = False) -> dict[str, Any]:
    """TRL SFTTrainer as its docs show: a conversational dataset, default collator, no packing (and,
    with `lora`, the config's LoRA settings passed as `peft_config`)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from multitune.config import load_config
    from multitune.formatting import Formatter
    from multitune.prepared import prepare
    from multitune.tasks import resolve_tasks

    cfg = resolve_tasks(load_config(cfg_path))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    formatter = Formatter(tokenizer, cfg.model.max_length)
    data = prepare(cfg, formatter, None).data  # the same split as multitune's sides
    rows = [{"messages": ex.messages + [{"role": "assistant", "content": ex.target}]} for td in data for ex in td.train]
    train_ds = datasets.Dataset.from_list(rows)
    t = cfg.train
    args = SFTConfig(output_dir=str(Path(cfg.run_dir) / "baseline"), max_steps=steps, per_device_train_batch_size=t.batch_size,
                     learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
                     logging_steps=t.logging_steps, save_strategy="no", report_to=[], seed=cfg.seed, use_cpu=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    peft_config = None
    if lora:
        from peft import LoraConfig

        p = cfg.peft
        peft_config = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return {**_history(trainer.state.log_history), "val_answer_loss": _val_loss(trainer.model, formatter, data),
            "adapter_params": _trainable(trainer.model) if lora else None, "peak_gpu_gib": _peak_gpu_gib()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=list(SIDES), required=True)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--overrides", type=json.loads, default={}, help="JSON {key: value} on top of the side's")
    ap.add_argument("--lora-baseline", action="store_true", help="give the baseline the config's LoRA as peft_config")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.side == "baseline":
        result = run_baseline(args.config, args.steps, lora=args.lora_baseline)
    else:
        raw = yaml.safe_load(args.config.read_text())
        side_cfg = args.out.with_suffix(".yaml")
        raw["run_dir"] = str(args.out.parent / f"train-{args.out.stem}")
        side_cfg.write_text(yaml.safe_dump(raw))
        result = run_ours(side_cfg, args.steps, {**SIDES[args.side], **args.overrides})
    result |= {"side": args.side, "wall_s": time.perf_counter() - t0,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "tokens_per_s": result["tokens"] / result["train_s"]}
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
