"""`multitune plan`'s printout: the shape, the memory at its peak, the launch, the schedule, time and cost
(multitune.launch.plan computes them)."""

from __future__ import annotations

import math

from multitune.config import Config
from multitune.launch.memory import coefficients_for
from multitune.launch.plan import (
    CUDA_CONTEXT,
    FRAGMENTATION,
    GiB,
    Plan,
    checkpointing_options,
    fit_advice,
    flops_per_token,
    total_with_overhead,
)


def _gib(n: float) -> str:
    return f"{n / GiB:7.2f} GiB"


def report(cfg: Config, plan: Plan, price: float | None, config_name: str) -> str:
    p = plan
    out = [f"plan for {config_name} on {p.nodes} node(s) x {p.gpus} {p.gpu.name} ({p.gpu.memory / GiB:.1f} GiB each)"]
    out += _shape(cfg, p) + _memory(cfg, p) + _launch(cfg, p)
    if p.data.examples is None:
        out.append(f"data: {p.data.source}")
    else:
        out += _schedule(cfg, p, price)
    return "\n".join(out) + "\n"


def _shape(cfg: Config, p: Plan) -> list[str]:
    c, seq = p.counts, cfg.model.max_length
    out = [f"note: {n}" for n in c.notes]
    method = cfg.peft.method + (f" r={cfg.peft.r}" if cfg.peft.method in ("lora", "qlora", "dora", "rslora") else "")
    out.append(f"model: {cfg.model.name_or_path}, {c.params / 1e9:.2f}B parameters; {method}: {c.trainable / 1e6:.1f}M trainable "
               f"({100 * c.trainable / c.params:.2f}%)")
    ckpt = "on" if p.checkpointing else "off"
    margin = f"{FRAGMENTATION:.0%} allocator slack and {CUDA_CONTEXT / GiB:.0f} GiB CUDA context"
    out.append(f"auto-fit: micro-batch {p.micro_batch} x {seq} tokens, gradient checkpointing {ckpt} (the largest micro-batch "
               f"dividing {p.micro_batch * p.grad_accum} examples per GPU that fits with {margin}; " + (
                   "train.gradient_checkpointing: true keeps checkpointing on)" if checkpointing_options(cfg) == (True,)
                   and cfg.train.batch_size == "auto" else "checkpointing only when none fits without)"))
    return out


def _memory(cfg: Config, p: Plan) -> list[str]:
    from multitune.modeling.load import attention

    seq = cfg.model.max_length
    rows = f"one padding-free row of {p.micro_batch} x {seq}" if cfg.train.packing else f"{p.micro_batch} row(s) of {seq}"
    answers = (f"{p.data.answer_tokens:.0f} answer tokens an example (the longest seen)" if p.data.answer_tokens
               and cfg.train.loss_positions == "supervised" else "every position")
    attn = attention(cfg, for_training=True, cuda=True)
    out = [f"\nper-GPU memory at its peak, {rows} tokens (model.max_length), attention {attn}, loss on {answers}:"]
    out += [f"  {name:24s}{_gib(value)}" for name, value in p.parts.items()]
    _, note = coefficients_for(cfg.peft.method, cfg.peft.dropout)
    out += [f"  ({note})"] if note else []
    total = total_with_overhead(p.parts)
    out.append(f"  {'total':24s}{_gib(total)}  (+{FRAGMENTATION:.0%} allocator slack, +{CUDA_CONTEXT / GiB:.0f} GiB CUDA context) "
               f"of {p.gpu.memory / GiB:.1f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}")
    if not p.fits:
        out.append(f"  to fit: {fit_advice(cfg)}")
    if p.checkpointing != cfg.train.gradient_checkpointing and cfg.train.batch_size != "auto":
        out.append(f"  set train.gradient_checkpointing={str(p.checkpointing).lower()} (or train.batch_size=auto)")
    return out


def _launch(cfg: Config, p: Plan) -> list[str]:
    if p.world == 1:
        why = "one process"
    elif p.layout.shards == 1:
        why = "replicated: only the trainable parameters' gradients are exchanged"
    else:
        why = f"weights, gradients and optimizer sharded over the {p.layout.shards} GPUs of a node"
    global_batch = p.micro_batch * p.grad_accum * p.world
    # plan's choice is on a 200-row sample a task and the card's total memory; the launch's on every prepared row and the free memory
    keys = (f"train.batch_size=auto chooses it at launch (train.global_batch_size={global_batch}) from every training row and "
            "the card's free memory, so it can differ from this" if cfg.train.batch_size == "auto"
            else f"train.batch_size={p.micro_batch} train.grad_accum={p.grad_accum}")
    batch = f"batch: global {global_batch} = micro-batch {p.micro_batch} x {p.grad_accum} accumulation x {p.world} GPU(s)  ->  {keys}"
    return [f"\nlaunch: configs/accelerate/{p.layout.accelerate_config} ({why})", batch]


def _schedule(cfg: Config, p: Plan, price: float | None) -> list[str]:
    global_batch = p.micro_batch * p.grad_accum * p.world
    steps = math.ceil(math.ceil(p.data.examples / (p.micro_batch * p.world)) / p.grad_accum) * cfg.train.epochs
    data = (f"data: {p.data.examples:,} training examples x {cfg.train.epochs:g} epochs, {p.data.tokens:.0f} tokens each "
            f"on average ({p.data.source})")
    out = [data]
    fires = []
    for what, every in (("evaluation", cfg.train.eval_steps), ("checkpoint", cfg.train.save_steps)):
        if every:
            n = int(steps // every)
            fires.append(f"{what} every {every} steps -> {n}" + ("  (NEVER: lower it)" if n == 0 else ""))
    out.append(f"schedule: ~{steps:.0f} optimizer steps of {global_batch} examples; " + "; ".join(fires))
    flops = flops_per_token(p.counts, cfg, round(p.data.tokens))
    tps = p.mfu * p.world * p.gpu.bf16_flops / flops
    tokens = p.data.examples * cfg.train.epochs * p.data.tokens
    hours = tokens / tps / 3600
    out.append(f"speed: {flops:.2e} FLOPs a token; at MFU {p.mfu:.2f} (assumed; --mfu) on {p.world} x "
               f"{p.gpu.bf16_flops / 1e12:.0f} TFLOP/s: {tps:,.0f} tokens/s")
    out.append(f"time: {tokens / 1e6:.1f}M tokens -> {hours * 60:.0f} min of training steps (loading, evaluation and "
               "checkpoints not included; padding adds more)")
    if price is not None:
        out.append(f"cost: {p.world} GPU(s) x {hours:.2f} h x ${price:.2f}/GPU-hour = ${p.world * hours * price:.2f}")
    else:
        out.append("cost: pass --price DOLLARS_PER_GPU_HOUR")
    return out
