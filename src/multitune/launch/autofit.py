"""`train.batch_size: auto` and `eval.batch_size: auto` at launch: the micro-batch the card holds, before step 1.

Every rank, after the data is prepared (multitune.launch.runner):

1. the card: the smallest of the launch (each rank's free GPU memory before the model loads, agreed by one all-reduce), or the simulated budget
   ``MULTITUNE_GPU_MEMORY_GIB`` (tests, and `plan`-like dry runs on a CPU; without either, the host's memory);
2. the choice: :func:`multitune.launch.plan.fit_on`, the function `multitune plan` prints, on this model's exact
   counts, the kernels every rank loads (``auto`` attention and Liger as agreed by the node checks,
   multitune.training.stages.agreed_kernels) and the prepared data's longest answer: the largest micro-batch dividing
   the examples per process that fits the card less the margin (10% allocator slack, 1 GiB CUDA context),
   checkpointing only when none fits without; then agreed (:func:`agreed`): the smallest micro-batch of any rank,
   checkpointing if any rank needs it, so every rank runs the same accumulation (the same collectives);
   ``grad_accum`` follows from ``train.global_batch_size`` (global = micro-batch x grad_accum x processes);
3. once the trainer is built (:func:`confirm_on`): the probe (multitune.training.autofit.confirm) steps down from the
   choice while a worst-case micro-batch (as many supervised tokens as the memory model charges) runs out of memory
   on any rank, and the first steps are watched for out-of-memory (both agreed across ranks).

``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (:func:`expandable_segments`) is set by `multitune train` before
anything touches CUDA, unless the user set it (or ``PYTORCH_ALLOC_CONF``): freed blocks are reused across the varying
shapes of padded batches instead of fragmenting the cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from multitune.config import Config
from multitune.distributed import any_rank, checked, main_print, max_over_ranks
from multitune.errors import UserError
from multitune.launch.plan import (
    STATIC_PARTS, DataStats, GiB, Gpu, Layout, count, fit_advice, fit_on, memory, step_for, total_with_overhead,
)
from multitune.modeling.load import Kernels, for_kernels
from multitune.training.args import fsdp_launch
from multitune.training.autofit import OomBackoff, confirm
from multitune.training.checkpoints import saved_layout, saved_oom_split

BUDGET_ENV = "MULTITUNE_GPU_MEMORY_GIB"  # a simulated card: its memory in GiB
WATCH_STEPS = 10  # optimizer steps in which an out-of-memory backs off (multitune.training.autofit.OomBackoff)
EVAL_ROWS = (64, 32, 16, 8, 4, 2, 1)  # eval.batch_size: auto chooses among these


def expandable_segments() -> None:
    """Let the CUDA caching allocator grow segments in place (read when CUDA first allocates), unless the user chose."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


@dataclass(frozen=True)
class AutoFit:
    """What the launch chose: the trainer's micro-batch and checkpointing, and the probe's ladder from there down."""

    micro_batch: int
    checkpointing: bool
    per_rank: int  # examples per process per optimizer step
    ladder: tuple[tuple[int, bool], ...]  # (micro-batch, checkpointing) from the choice down, in the order tried
    # micro-batch -> the supervised tokens the memory model charges for it (launch.plan.step_for): the probe's worst case
    supervised: dict[int, int]


def this_card() -> tuple[int, str]:
    """This rank's card: the memory free on it (taken before the model loads; the CUDA context this process created is
    then counted twice, the margin's 1 GiB included: on the safe side), and its name (a UserError for a simulated budget that is not a number)."""
    if os.environ.get(BUDGET_ENV):
        try:
            mem = int(float(os.environ[BUDGET_ENV]) * GiB)
        except ValueError:
            raise UserError(f"{BUDGET_ENV}={os.environ[BUDGET_ENV]!r} is not a number of GiB: set it to the card's "
                            "memory, e.g. 80, or unset it") from None
        return mem, f"a simulated {mem / GiB:.1f} GiB card"
    if torch.cuda.is_available():  # before the model loads: what another process holds is not ours to use
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        free = torch.cuda.mem_get_info(torch.cuda.current_device())[0]
        return min(free, props.total_memory), f"{props.name} ({free / GiB:.1f} GiB free of {props.total_memory / GiB:.1f} GiB)"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host's memory (no GPU)"


def card() -> Gpu:
    """The smallest card of the launch: every rank calls it, and makes the same two collectives (the agreed reading of
    its own card, which may refuse, then one all-reduce), so a refusal on one rank is one error on every rank."""
    mem, name = checked(this_card)
    smallest = -max_over_ranks(-mem)
    return Gpu(name if smallest == mem else "the smallest card of the launch", smallest, 0.0)


def data_of(prepared) -> DataStats:
    """The prepared training rows: how many, their mean length, and the most supervised tokens of one."""
    labels = prepared.train["labels"]
    lengths = [len(lab) for lab in labels]
    answers = max(sum(t != -100 for t in lab) for lab in labels)
    return DataStats(len(labels), sum(lengths) / len(lengths), "the prepared training rows", answers)


def ladder(per_rank: int) -> list[tuple[int, bool]]:
    """Every (micro-batch, checkpointing) in the order auto-fit prefers them: no checkpointing first, larger first."""
    divisors = sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True)
    return [(m, False) for m in divisors] + [(m, True) for m in divisors]


def check_global_batch(cfg: Config, world: int) -> None:
    """train.global_batch_size against the processes and a fixed micro-batch: from the config alone (every rank
    refuses alike), before the data is prepared."""
    t, g = cfg.train, cfg.train.global_batch_size
    if g is None:
        return
    if g % world:
        raise UserError(f"train.global_batch_size={g} does not split over {world} processes: set a multiple of {world}")
    if t.batch_size != "auto" and (g // world) % t.batch_size:
        raise UserError(f"train.global_batch_size={g} on {world} processes is {g // world} examples each, not a multiple "
                        f"of train.batch_size={t.batch_size}: choose a batch_size dividing {g // world}, or batch_size=auto")


def at_launch(cfg: Config, prepared, world: int, bf16: bool, kernels: Kernels | None = None) -> tuple[Config, AutoFit | None]:
    """The config the trainers run with (every rank alike): batch sizes resolved, grad_accum from the global batch;
    and the choice to confirm when train.batch_size is auto. Every rank makes the same collectives: what can refuse
    (the model's config read from this node's disk, the data, the card) is agreed (``checked``), and so is the
    choice. ``kernels``: what every rank loads for ``auto`` (None: this machine's own, as `plan` models)."""
    t, g = cfg.train, cfg.train.global_batch_size
    if t.batch_size != "auto" and g is None and cfg.eval.batch_size != "auto":
        return cfg, None
    check_global_batch(cfg, world)
    if t.batch_size != "auto" and cfg.eval.batch_size != "auto":
        return cfg.model_copy(update={"train": t.model_copy(update={"grad_accum": g // world // t.batch_size})}), None
    gpu = card()  # its collectives outside the part that can refuse
    train, evals, fit = checked(lambda: _resolve(cfg, prepared, world, bf16, gpu, kernels))
    if fit is not None:  # decided by the same config on every rank: every rank or none makes these collectives
        fit = agreed(fit)
        train = {"batch_size": fit.micro_batch, "grad_accum": fit.per_rank // fit.micro_batch,
                 "gradient_checkpointing": fit.checkpointing}
    return cfg.model_copy(update={"train": t.model_copy(update=train), "eval": cfg.eval.model_copy(update=evals)}), fit


def agreed(fit: AutoFit) -> AutoFit:
    """Every rank's choice made one: the smallest micro-batch of any rank, gradient checkpointing if any rank needs it
    (two all-reduces, every rank). Each rank's own choice fits its card by its model, and a smaller micro-batch or
    checkpointing only lowers the peak, so the common one fits every rank; different choices would run different
    accumulation counts, so different numbers of collectives (gradient all-reduces, agreements): a hang."""
    micro = -max_over_ranks(-fit.micro_batch)
    checkpointing = any_rank(fit.checkpointing)
    if (micro, checkpointing) == (fit.micro_batch, fit.checkpointing):
        return fit
    main_print(f"train.batch_size=auto agreed across ranks: micro-batch {micro} x {fit.per_rank // micro} accumulation, "
               f"gradient checkpointing {'on' if checkpointing else 'off'} (the smallest choice of any rank)")
    # at or below this rank's own choice on its ladder (a smaller divisor, or the checkpointing half of the ladder)
    start = fit.ladder.index((micro, checkpointing))
    return replace(fit, micro_batch=micro, checkpointing=checkpointing, ladder=fit.ladder[start:])


def _resolve(cfg: Config, prepared, world: int, bf16: bool, gpu: Gpu, kernels: Kernels | None):
    """This rank's (train update, eval update, choice); the model's kernels as every rank loads them."""
    t, g = cfg.train, cfg.train.global_batch_size
    per_rank = g // world if g is not None else None
    train, evals, fit = ({"grad_accum": per_rank // t.batch_size} if t.batch_size != "auto" and g else {}), {}, None
    modelled = for_kernels(cfg, kernels)
    data = data_of(prepared)
    counts = count(modelled, torch.bfloat16 if bf16 else torch.float32)
    layout = Layout("this launch", int(os.environ.get("LOCAL_WORLD_SIZE", world)) if fsdp_launch() else 1)
    if t.batch_size == "auto":
        fit = _choose(modelled, counts, gpu, world, per_rank, data, layout)
    if cfg.eval.batch_size == "auto":
        evals = {"batch_size": eval_rows(modelled, counts, gpu, world, layout, bf16)}
        main_print(f"eval.batch_size=auto: {evals['batch_size']} rows a scoring batch on {gpu.name}")
    return train, evals, fit


def _choose(cfg: Config, counts, gpu: Gpu, world: int, per_rank: int, data: DataStats, layout) -> AutoFit:
    _, micro, checkpointing, parts, fits = fit_on(counts, cfg, gpu, world, 1, per_rank, data, layout)
    total = total_with_overhead(parts)
    unchecked = "under FSDP" if fsdp_launch() else "with head: classifier" if cfg.head == "classifier" else None
    if not fits and unchecked:  # no probe or back-off would catch it: refused before the model loads
        raise UserError(f"train.batch_size=auto: the training step does not fit {gpu.name} ({gpu.memory / GiB:.1f} GiB) "
                        f"even at micro-batch 1 with gradient checkpointing (the memory model: {total / GiB:.1f} GiB with "
                        f"slack and CUDA context), and {unchecked} no probe checks it on the card; to fit: {fit_advice(cfg)}")
    main_print(f"train.batch_size=auto on {gpu.name} ({gpu.memory / GiB:.1f} GiB): micro-batch {micro} x "
               f"{per_rank // micro} accumulation x {world} process(es) = {per_rank * world} examples a step, gradient "
               f"checkpointing {'on' if checkpointing else 'off'}; the memory model's peak {total / GiB:.1f} GiB "
               f"(+10% slack, CUDA context) {'fits' if fits else 'DOES NOT FIT: the probe decides'}")
    rungs = ladder(per_rank)
    rungs = [r for r in rungs if r[1] or not cfg.train.gradient_checkpointing]
    start = rungs.index((micro, checkpointing))
    supervised = {m: step_for(counts, cfg, m, cfg.model.max_length, False, data.answer_tokens, data.tokens).supervised
                  for m, _ in rungs}
    return AutoFit(micro, checkpointing, per_rank, tuple(rungs[start:]), supervised)


def scoring_bytes(c, cfg: Config, rows: int, seq: int, bf16: bool) -> int:
    """The peak of one scoring batch (multitune.scoring.scorer: a forward without gradients, logits at every position):
    at the loss, the logits in the weights' dtype, their fp32 copy (``.float()``; none when already fp32) and
    cross-entropy's fp32 log-softmax; earlier, a layer's MLP temporaries (gate, up and their product). Modelled, not
    measured on a GPU; the layers' other transients are smaller than either."""
    fp32 = not bf16 or cfg.model.dtype == "float32" or (cfg.peft.method == "full" and cfg.model.dtype == "auto")
    size = 4 if fp32 else 2
    per_token = max(c.vocab * (size + (0 if fp32 else 4) + 4), 3 * c.intermediate * size)
    return rows * seq * per_token


def eval_rows(cfg: Config, counts, gpu: Gpu, world: int, layout, bf16: bool) -> int:
    """The largest scoring batch of model.max_length tokens a row that fits beside the training state (scoring runs
    during training too: weights, trainable parameters, gradients, AdamW's moments, DDP's buckets)."""
    static = sum(v for k, v in memory(counts, cfg, layout, 1, cfg.model.max_length, world, True).items() if k in STATIC_PARTS)
    for rows in EVAL_ROWS:
        need = static + scoring_bytes(counts, cfg, rows, cfg.model.max_length, bf16)
        if total_with_overhead({"scoring": need}) <= gpu.memory:
            return rows
    return 1


def confirm_on(trainer, fit: AutoFit | None, cfg: Config, checkpoint: Path | None = None) -> None:
    """Before step 1: the probe steps down from the choice until a worst-case micro-batch fits on every rank; the
    launch's first WATCH_STEPS steps then back off once from out-of-memory (multitune.training.autofit). Resuming a
    ``checkpoint`` trained after a back-off keeps it while the micro-batch is at least the one that ran out of memory."""
    if fit is None:
        return
    if not isinstance(trainer, OomBackoff):  # head: classifier: the choice counts an LM head's logits it never makes
        return
    if fsdp_launch():
        main_print("note: under FSDP every forward is a collective, so auto-fit's probe and out-of-memory back-off are off: "
                   "the memory model's choice stands")
        return
    micro, checkpointing = confirm(trainer, list(fit.ladder), fit.per_rank, cfg.model.max_length, fit.supervised,
                                   cfg.train.packing)
    if (micro, checkpointing) != (fit.micro_batch, fit.checkpointing):
        main_print(f"auto-fit probe: micro-batch {micro} x {fit.per_rank // micro} accumulation, gradient checkpointing "
                   f"{'on' if checkpointing else 'off'} (stepped down from {fit.micro_batch})")
    trainer.watch_steps = WATCH_STEPS
    saved = saved_layout(checkpoint) if checkpoint else None
    # every rank the same number of pieces (watched micro-batches agree once per piece): the largest any rank read
    split = max_over_ranks(saved_oom_split(checkpoint) if saved and micro >= saved.batch_size else 1)
    if split > 1:
        trainer.split_micro_batches(split)
        main_print(f"resuming {checkpoint.name}: keeps the checkpoint's out-of-memory back-off: micro-batch "
                   f"{micro / split:g} x {fit.per_rank // micro * split} accumulation")
