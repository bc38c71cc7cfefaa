"""Training throughput: multitune's recipe against TRL's SFTTrainer with its defaults and as an expert tunes it.

Each side runs in its own process (so peak RSS is its own) on the same model, the same train split
of the same tasks, the same batch size, learning rate, schedule, seed and number of optimizer steps.
Sides:

- `trl-defaults`: SFTTrainer as its docs show (conversational dataset, default collator, every setting
  default: bf16 and activation checkpointing on, loss on every token).
- `trl-expert`: SFTTrainer tuned by someone who knows it, on the same tokenised examples and masks as
  multitune (completion-only loss). On CPU: no bf16 (no bf16 instructions), no checkpointing. On a
  GPU: bf16, packing (padding-free rows), checkpointing off; Liger only when asked (the +liger side).
- `multitune` and its variants: `multitune train` with the benchmark config (+ the side's overrides).

Timing covers optimizer steps k+1..N only (k = --warmup steps: allocator warm-up, first-batch and
compile costs stay out), read with `torch.cuda.synchronize()` on a GPU, by a callback on the trainer;
tokens are the non-padding tokens of those steps. GPU peak memory (allocated and reserved) is reset
when training starts and read after the last step, before any evaluation or saving. Afterwards every
trained model is scored by the same function on the same validation rows: the mean loss of the answer
tokens (training losses are not comparable: the defaults train on every token).

    python -m benchmarks.train_speed --side trl-defaults --config CONFIG.yaml --steps 60 --out side.json
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

# what each multitune side changes on top of the benchmark config
SIDES: dict[str, dict[str, Any]] = {
    "trl-defaults": {},
    "trl-expert": {},
    "multitune": {"train.packing": False},  # the default recipe on CPU
    "multitune+loss-all": {"train.packing": False, "train.loss_positions": "all"},  # item 1 off: every position
    "multitune+grouped": {"train.packing": False, "train.group_by_length": True},
    "multitune+packed": {"train.packing": True},
    "multitune+eager": {"train.packing": False, "model.attn_implementation": "eager"},
    "multitune+ckpt": {"train.packing": False, "train.gradient_checkpointing": True},
    "multitune+bf16": {"train.packing": False, "train.bf16": True},
    "multitune+compile": {"train.packing": False, "train.compile": True},  # not in `make bench`: compiling takes minutes
}
TRL_SIDES = ("trl-defaults", "trl-expert")
DEFAULT_SIDES = ["trl-defaults", "trl-expert", "multitune", "multitune+loss-all"]
EVAL_ROWS = 100  # per task, for the common answer-token validation loss


class StepWindow:
    """A TrainerCallback timing optimizer steps warmup+1..N and the tokens they saw; GPU peak memory.

    `trainer` is set after the trainer exists (SFTTrainer counts non-padding tokens in `_total_train_tokens`).
    """

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        self.warmup, self.trainer, self.t0, self.tok0 = warmup, None, None, None
        self.result: dict[str, float] = {}
        self.micro_batches: list[dict[str, int]] = []  # each micro-batch's shape as trained (the memory model's input)
        cb = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                cb._mark(0, state.max_steps)

            def on_step_end(self, args, state, control, **kw):
                cb._mark(state.global_step, state.max_steps)

        self.callback = _Callback()

    def watch(self, trainer) -> None:
        """Join ``trainer``: its token count times the window, and each micro-batch's shape is recorded."""
        self.trainer = trainer
        step = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            self.micro_batches.append(batch_shape(inputs))
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    def _mark(self, step: int, last: int) -> None:
        import torch

        if step not in (self.warmup, last) or self.trainer is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now, tokens = time.perf_counter(), self.trainer._total_train_tokens
        if step == self.warmup:
            self.t0, self.tok0 = now, tokens
        if step == last:
            self.result = {"train_s": now - self.t0, "tokens": tokens - self.tok0, "timed_steps": last - self.warmup,
                           "tokens_all_steps": tokens}
            if torch.cuda.is_available():
                self.result |= {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
            # in the log at once: the side's speed and peak survive a kill during its evaluation (`make gpu-check`);
            # on a line of its own (a progress bar's carriage returns may precede it)
            print(f"\ntrained: {json.dumps(self.result)}", flush=True)


def batch_shape(inputs: dict) -> dict[str, int]:
    """rows x length as trained, real tokens, supervised positions (next token labelled), sequences in a padding-free row."""
    ids = inputs["input_ids"]
    shape = {"rows": ids.size(0), "length": ids.size(1), "tokens": int(inputs["attention_mask"].sum()) if "attention_mask" in inputs
             else ids.numel()}
    if inputs.get("labels") is not None:
        shape["supervised"] = int((inputs["labels"][:, 1:] != -100).sum())
    if "position_ids" in inputs and "attention_mask" not in inputs:
        shape["sequences"] = int((inputs["position_ids"] == 0).sum())
    return shape


def memory_shape(window: StepWindow, loss: str) -> dict[str, Any]:
    """What the memory model needs of a side, as it ran (benchmarks/gpu.py adds the model and adapter)."""
    args, model = window.trainer.args, window.trainer.model
    base = getattr(model, "get_base_model", lambda: model)()
    return {"grad_accum": args.gradient_accumulation_steps, "checkpointing": bool(args.gradient_checkpointing),
            "attention": getattr(base.config, "_attn_implementation", None), "liger": bool(getattr(base, "_multitune_liger", False)
                                                                                             or args.use_liger_kernel),
            "loss": loss, "steps": window.micro_batches}


def _val_loss(model, formatter, data, rows: int = EVAL_ROWS) -> float:
    from multitune.data.load import subsample
    from multitune.scoring.scorer import Scorer

    scorer = Scorer(model.eval(), formatter, batch_size=32)
    losses = [scorer.loss(subsample(td.val, rows, 0)) for td in data]
    return sum(r["loss"] * r["n"] for r in losses) / sum(r["n"] for r in losses)


def _last_loss(log_history: list[dict]) -> float:
    return [e for e in log_history if "loss" in e][-1]["loss"]


def run_ours(cfg_path: Path, steps: int, overrides: dict[str, Any], window: StepWindow, eval_rows: int = EVAL_ROWS) -> dict[str, Any]:
    from multitune.launch.runner import train as run_training
    from multitune.training.lm import MultitaskTrainer
    from multitune.config import load_config
    from multitune.data.formatting import Formatter
    from multitune.modeling.load import load_tokenizer
    from multitune.data.prepared import prepare
    from multitune.rundir import RunDir

    cfg = load_config(cfg_path, [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()]
                      + [f"train.max_steps={steps}"])
    # train.batch_size is examples per optimizer step here, split into train.grad_accum micro-batches
    per_step = packed_rows(cfg, cfg.train.grad_accum) if cfg.train.packing else cfg.train.batch_size
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": micro_batch(per_step, cfg.train.grad_accum)})})
    # the benchmark's timing callback joins the trainer that `multitune train` builds (the harness, not the product)
    trainer_cls, init = MultitaskTrainer, MultitaskTrainer.__init__

    def timed_init(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), window.callback]
        init(self, *args, **kwargs)
        window.watch(self)

    trainer_cls.__init__ = timed_init
    try:
        run_training(cfg, resume=False, overwrite=True)
    finally:
        trainer_cls.__init__ = init
    run = RunDir(Path(cfg.run_dir))
    state = json.loads((run.root / "trainer_state.json").read_text())
    formatter = Formatter(load_tokenizer(cfg.model, None, source=str(run.final)), cfg.model.max_length)
    data = prepare(cfg, formatter, run.splits).data
    # the trained model in memory, scored as the TRL sides' are: what `multitune train` saved in final/ (its adapter
    # on the same base), without loading the base a second time (16 GB at 8B: ~15-20 s of section a's time)
    model = window.trainer.model
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) if cfg.peft.method != "full" else None
    liger = getattr(getattr(model, "get_base_model", lambda: model)(), "_multitune_liger", False)  # applied, not asked
    return {"train_loss_last": _last_loss(state["log_history"]), "val_answer_loss": _val_loss(model, formatter, data, eval_rows),
            "adapter_params": adapter, "batch_size": cfg.train.batch_size, "liger": liger,
            "memory_shape": memory_shape(window, cfg.train.loss_positions)}


def micro_batch(per_step: int, accum: int) -> int:
    """Rows per micro-batch that keep ``per_step`` rows per optimizer step over ``accum`` micro-batches."""
    if per_step % accum:
        raise SystemExit(f"error: {per_step} examples per optimizer step do not split into {accum} equal micro-batches; "
                         "choose --grad-accum dividing --examples")
    return per_step // accum


def packed_rows(cfg, multiple: int = 1) -> int:
    """Packed rows per step holding about as many tokens as `batch_size` padded examples: equal tokens per step
    (rounded to a ``multiple``: the micro-batches must split it evenly)."""
    from multitune.data.formatting import Formatter
    from multitune.modeling.load import load_tokenizer
    from multitune.data.prepared import prepare

    tok = load_tokenizer(cfg.model, None)
    lengths = [len(x) for x in prepare(cfg, Formatter(tok, cfg.model.max_length), None).train["input_ids"]]
    rows = cfg.train.batch_size * sum(lengths) / len(lengths) / cfg.model.max_length
    return max(multiple, round(rows / multiple) * multiple)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_trl(side: str, cfg_path: Path, steps: int, window: StepWindow, lora: bool = False,
            eval_rows: int = EVAL_ROWS, liger: bool = False) -> dict[str, Any]:
    """`trl-defaults` (docs usage) or `trl-expert` (tuned), with the config's LoRA as `peft_config` when `lora`.

    The expert turns Liger on only when asked (`liger`): on an H100 (2026-11-27) Liger's layer kernels made
    the 2-layer 8B-width model 2.9x slower, so the faster setting is the expert's default.
    """
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from multitune.config import load_config
    from multitune.data.formatting import Formatter
    from multitune.data.prepared import prepare
    from multitune.modeling.speed import liger_available
    from multitune.tasks import resolve_tasks

    cfg = resolve_tasks(load_config(cfg_path))
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    formatter = Formatter(tokenizer, cfg.model.max_length)
    prepared = prepare(cfg, formatter, None)  # the same split (and, for the expert, the same tokens and masks)
    data, t = prepared.data, cfg.train
    common = dict(output_dir=str(Path(cfg.run_dir) / side), max_steps=steps, per_device_train_batch_size=micro_batch(t.batch_size, t.grad_accum),
                  gradient_accumulation_steps=t.grad_accum,
                  learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
                  logging_steps=t.logging_steps, save_strategy="no", report_to=[], seed=cfg.seed, use_cpu=not cuda)
    model_kwargs: dict[str, Any] = {}
    if side == "trl-defaults":
        rows = [{"messages": ex.messages + [{"role": "assistant", "content": ex.target}]} for td in data for ex in td.train]
        train_ds = datasets.Dataset.from_list(rows)
        args = SFTConfig(**common)
    else:
        train_ds = prepared.train.remove_columns([c for c in prepared.train.column_names if c not in ("input_ids", "labels")])
        expert = dict(bf16=False, gradient_checkpointing=False, max_length=cfg.model.max_length)
        if cuda:  # bf16, padding-free packed rows (as many tokens per step as the padded sides), Liger when asked
            expert.update(bf16=True, packing=True, use_liger_kernel=liger and liger_available(),
                          per_device_train_batch_size=micro_batch(packed_rows(cfg, t.grad_accum), t.grad_accum))
            model_kwargs["dtype"] = torch.bfloat16
        args = SFTConfig(**{**common, **expert})
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, **model_kwargs)
    peft_config = None
    if lora:
        from peft import LoraConfig

        p = cfg.peft
        peft_config = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[window.callback])
    window.watch(trainer)
    trainer.train()
    return {"train_loss_last": _last_loss(trainer.state.log_history), "val_answer_loss": _val_loss(trainer.model, formatter, data, eval_rows),
            "adapter_params": _trainable(trainer.model) if lora else None, "batch_size": args.per_device_train_batch_size,
            "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "packing": args.packing,
            "liger": bool(args.use_liger_kernel),
            # TRL's loss: its chunked LM head, on labelled positions only where Triton runs (trl.trainer.utils.add_fused_lm_head)
            "memory_shape": memory_shape(window, "trl-fused" if cuda else "trl-fused-all")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=list(SIDES), required=True)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5, help="optimizer steps left out of the timed window")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--overrides", type=json.loads, default={}, help="JSON {key: value} on top of the side's")
    ap.add_argument("--lora", action="store_true", help="TRL sides: give SFTTrainer the config's LoRA as peft_config")
    ap.add_argument("--eval-rows", type=int, default=EVAL_ROWS, help="validation rows per task for the answer loss")
    args = ap.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup must be in [0, --steps): {args.warmup}")
    t0 = time.perf_counter()
    window = StepWindow(args.warmup)
    if args.side in TRL_SIDES:
        result = run_trl(args.side, args.config, args.steps, window, lora=args.lora, eval_rows=args.eval_rows,
                         liger=args.overrides.get("train.liger") is True)
    else:
        raw = yaml.safe_load(args.config.read_text())
        side_cfg = args.out.with_suffix(".yaml")
        raw["run_dir"] = str(args.out.parent / f"train-{args.out.stem}")
        side_cfg.write_text(yaml.safe_dump(raw))
        result = run_ours(side_cfg, args.steps, {**SIDES[args.side], **args.overrides}, window, args.eval_rows)
    result |= window.result | {"side": args.side, "steps": args.steps, "wall_s": time.perf_counter() - t0,
                               "grad_accum": window.trainer.args.gradient_accumulation_steps,
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    result["tokens_per_s"] = result["tokens"] / result["train_s"]
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nresult: {json.dumps({k: v for k, v in result.items() if k != 'memory_shape'})}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
