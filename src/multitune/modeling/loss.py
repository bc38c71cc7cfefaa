"""The training loss on supervised positions only (`train.loss_positions: supervised`).

A classification example is a prompt of 60-300 tokens and an answer of 2-6, and only the answer
carries loss. The full path runs every position through the LM head (Llama 3: 128,256 x 4,096) and
the cross-entropy. Here the decoder's last hidden states are gathered at the positions whose next
token is supervised, and only those rows reach the head: the logits are [supervised tokens x vocab]
instead of [batch x length x vocab].

Why a forward hook on the decoder rather than calling `lm_head` ourselves: the head still runs inside
the root module's forward, so FSDP2's root pre-forward has unsharded it (calling a submodule from
outside would read a sharded DTensor), DDP sees an ordinary forward, and PEFT, gradient
checkpointing and Liger's layer kernels are untouched. Gathering was chosen over left-padding with
an integer `logits_to_keep` by measurement (benchmarks/loss_positions.py, RESULTS.md): it computes
exactly the supervised rows, needs no collator change, and works on packed (padding-free) rows,
where answers sit anywhere in the row.

Written by hand because neither Trainer nor TRL offers it on every device: TRL 1.16's fused LM head
compacts to supervised positions only on Triton devices and scores every position elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer stack whose `last_hidden_state` feeds the LM head, under DDP/PEFT/compile wrappers."""
    m = model
    for attr in ("_orig_mod", "module"):  # torch.compile, DDP
        while hasattr(m, attr) and isinstance(getattr(m, attr), torch.nn.Module):
            m = getattr(m, attr)
    if hasattr(m, "get_base_model"):  # PEFT
        m = m.get_base_model()
    return m.get_decoder()


def supervised_index(labels: torch.Tensor, hidden_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into the [batch * hidden_len] hidden states whose next token is supervised, and those targets.

    Prompt tuning prepends `hidden_len - labels.size(1)` virtual positions to the hidden states; PEFT
    pads the labels with -100 there, and so does this (the result is PEFT's own alignment).
    """
    offset = hidden_len - labels.size(1)
    if offset < 0:
        raise ValueError(f"hidden states ({hidden_len}) are shorter than the labels ({labels.size(1)})")
    if offset:
        labels = F.pad(labels, (offset, 0), value=IGNORE)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # hidden state t predicts label t + 1
    flat = shifted.reshape(-1)
    index = (flat != IGNORE).nonzero().squeeze(1)
    return index, flat[index]


@dataclass
class _Gather:
    """Forward hook state: the rows to keep of the next forward's last hidden state (None: keep all)."""

    labels: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def __call__(self, module, args, output):
        if self.labels is None:
            return output
        hidden = output.last_hidden_state
        index, self.targets = supervised_index(self.labels.to(hidden.device), hidden.size(1))
        output.last_hidden_state = hidden.reshape(-1, hidden.size(-1)).index_select(0, index).unsqueeze(0)
        self.labels = None  # one forward only: generation and scoring calls see the full states
        return output


def _hook(model: torch.nn.Module) -> _Gather:
    """The gather hook of this model's decoder, registered once (re-registering each step would make
    torch.compile's guards on the module's hooks fail every step)."""
    decoder = decoder_of(model)
    hook = getattr(decoder, "_multitune_gather", None)
    if hook is None:
        hook = _Gather()
        decoder.register_forward_hook(hook)
        decoder._multitune_gather = hook
    return hook


def supervised_forward(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, vocab], targets [N]) for the N supervised positions of the batch, through the root forward."""
    hook = _hook(model)
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
    hook.labels = inputs["labels"]
    try:
        out = model(**model_inputs, use_cache=False)
    finally:
        hook.labels = None
    return out.logits.reshape(-1, out.logits.size(-1)), hook.targets


def supervised_loss(
    model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed token NLL over the supervised positions / `num_items_in_batch` (their count when not given).

    The same value as the model's own loss with labels (mean over supervised tokens), computed from
    the supervised rows only. Returns (loss, logits, targets); logits in the model's dtype.
    """
    logits, targets = supervised_forward(model, inputs)
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    denom = targets.numel() if num_items_in_batch is None else num_items_in_batch
    return nll / torch.as_tensor(denom, device=nll.device).clamp(min=1), logits, targets


@torch.no_grad()
def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy sum, correct top-1 count, token count) of the supervised positions, for TRL's log metrics."""
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).sum()
    correct = (logits.argmax(-1) == targets).sum()
    return entropy, correct, torch.tensor(targets.numel(), device=logits.device)


TAGS = "task_tags"  # the batch key of each token's task index (-1: padding), popped before the forward


class TaskLosses:
    """Each task's training loss in a joint run: the mean NLL of its supervised tokens over the logging window.

    The collator tags every token with its example's task (the training set's ``task`` column); the loss path
    adds each supervised token's NLL to its task's sum (its logits are already there: no extra forward). At
    each training log row the sums of every rank are added up (one all_reduce) and logged as ``loss/<task>``.
    """

    def __init__(self, names: list[str], padding_free: bool):
        self.names, self.padding_free = names, padding_free
        self.sums: torch.Tensor | None = None  # [2, tasks]: NLL, tokens

    def collator(self, collate):
        index = {n: i for i, n in enumerate(self.names)}

        def tagged(examples: list[dict[str, Any]]) -> dict[str, Any]:
            tasks = [ex.pop("task", None) for ex in examples]
            batch = collate(examples)
            if any(t is None for t in tasks):  # not the training set (evaluation): nothing to tag
                return batch
            tags = torch.full_like(batch["labels"], -1)
            start = 0
            for i, (ex, t) in enumerate(zip(examples, tasks, strict=True)):
                n = len(ex["input_ids"])
                if self.padding_free:  # one row, the examples one after another
                    tags[0, start : start + n], start = index[t], start + n
                else:
                    tags[i, :n] = index[t]
            batch[TAGS] = tags
            return batch

        return tagged

    def recorder(self, labels: torch.Tensor, tags: torch.Tensor):
        """What the loss path calls with (logits, targets) of the supervised tokens, in row-major order."""
        sup = tags[:, 1:][labels[:, 1:] != IGNORE]  # the order supervised_index gathers them in

        @torch.no_grad()
        def record(logits: torch.Tensor, targets: torch.Tensor) -> None:
            nll = F.cross_entropy(logits.float(), targets, reduction="none")
            if self.sums is None:
                self.sums = torch.zeros(2, len(self.names), device=nll.device)
            t = sup.to(nll.device)
            keep = t >= 0
            self.sums[0].index_add_(0, t[keep], nll[keep])
            self.sums[1].index_add_(0, t[keep], torch.ones_like(nll[keep]))

        return record

    def window(self, accelerator) -> dict[str, float]:
        """``loss/<task>`` over the window since the last row, every rank's tokens; the sums start again."""
        if self.sums is None:
            self.sums = torch.zeros(2, len(self.names), device=accelerator.device)
        total = accelerator.reduce(self.sums.clone(), reduction="sum")  # a collective: every rank logs this row
        self.sums.zero_()
        return {f"loss/{n}": round(float(total[0, i] / total[1, i]), 4) for i, n in enumerate(self.names) if total[1, i] > 0}


def local_loss(model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None, record=None):
    """What :func:`trainer_loss` computes on this rank before its gathers (auto-fit's probe runs it alone, with every
    temporary of a training step's loss): the loss, each task's (``record``), and the log statistics."""
    loss, logits, targets = supervised_loss(model, inputs, num_items_in_batch)
    if record is not None and model.training:
        record(logits.detach(), targets)  # loss/<task> (TaskLosses)
    return loss, token_stats(logits, targets)


def trainer_loss(trainer, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None, record=None) -> torch.Tensor:
    """`SFTTrainer.compute_loss` on the supervised positions: the same scaling and the same logged metrics.

    ``record``: called with the supervised tokens' logits and targets (each task's loss, TaskLosses).
    TRL's own scaling rule: `num_items_in_batch` counts the supervised tokens of every accumulated
    micro-batch (and, with `average_tokens_across_devices`, every rank), and DDP/FSDP average the
    gradients over ranks, so the loss is multiplied back by the number of processes.
    """
    loss, stats = local_loss(model, inputs, num_items_in_batch, record)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    mode = "train" if model.training else "eval"
    acc = trainer.accelerator
    entropy, correct, count = (acc.gather_for_metrics(x).sum() for x in stats)
    metrics = trainer._metrics[mode]
    metrics["entropy"].append((entropy / count).item() if count > 0 else 0.0)
    metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
    if mode == "train":
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:  # padding-free rows: every position is a token
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        trainer._total_train_tokens += acc.gather_for_metrics(local).sum().item()
    metrics["num_tokens"] = [trainer._total_train_tokens]
    return loss
