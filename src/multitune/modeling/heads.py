"""Classification heads on the base model (`head: classifier`): one score layer, a slice of rows per task.

``AutoModelForSequenceClassification`` puts a linear ``score`` layer on the hidden state of each
sequence's last real token. Several tasks share one such layer of sum(K_t) outputs, task t owning the
rows ``offset_t .. offset_t + K_t``. The rows of a linear layer are independent (output j depends on
row j only), so a slice *is* a separate K_t-way head: the loss and the prediction of a task read its
slice only, and its loss sends no gradient to the other tasks' rows (tests/unit/test_heads.py checks).

The input is the same chat-formatted prompt the LM path sees (``Formatter.prompt_ids``), so the two
heads are compared on the same text; the head replaces writing the label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from multitune.config import Config
from multitune.distributed import main_print
from multitune.errors import UserError
from multitune.files import atomic_write
from multitune.data.formatting import Formatter
from multitune.modeling.load import device, load_model, peft_config, prepare_4bit
from multitune.tasks import Example

HEADS_FILE = "heads.json"


@dataclass(frozen=True)
class Heads:
    """Which rows of the score layer belong to which task: {task: its label names, in row order}."""

    labels: dict[str, list[str]]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.labels.values())

    def rows(self, task: str) -> slice:
        start = 0
        for name, names in self.labels.items():
            if name == task:
                return slice(start, start + len(names))
            start += len(names)
        raise UserError(f"no classification head for task {task!r}; heads: {list(self.labels)}")

    def task_of(self, row: int) -> str:
        """The task whose slice holds global row ``row``."""
        for name in self.labels:
            if row < self.rows(name).stop:
                return name
        raise IndexError(row)

    def global_label(self, task: str, label: int) -> int:
        return self.rows(task).start + label

    def same_task(self) -> torch.Tensor:
        """[size, size] bool: row i and row j belong to the same task (indexed by a global label: its slice)."""
        owner = torch.cat([torch.full((len(v),), i) for i, v in enumerate(self.labels.values())])
        return owner[:, None] == owner[None, :]

    def id2label(self) -> dict[int, str]:
        one = len(self.labels) == 1
        return {i: n if one else f"{t}:{n}" for i, (t, n) in enumerate((t, n) for t, v in self.labels.items() for n in v)}

    def save(self, folder: Path) -> None:
        atomic_write(folder / HEADS_FILE, json.dumps({"labels": self.labels}, indent=1))  # whole or none: it marks the heads trained

    @classmethod
    def load(cls, folder: Path) -> Heads:
        path = folder / HEADS_FILE
        if not path.exists():
            raise UserError(f"{folder} holds no classification heads ({HEADS_FILE} is missing); was training finished?")
        return cls(json.loads(path.read_text())["labels"])


class SlicedLoss:
    """Cross-entropy of each row over its own task's slice of the logits (Trainer's ``compute_loss_func``).

    Labels are global row indices; the other tasks' logits are masked to -inf, which is the softmax
    over the slice alone and sends them no gradient. Summed and divided by ``num_items_in_batch`` (the
    rows of the whole accumulated batch, counted by Trainer) so gradient accumulation averages exactly.
    """

    def __init__(self, heads: Heads):
        self.same_task = heads.same_task()

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        own = self.same_task.to(logits.device)[labels]
        masked = logits.float().masked_fill(~own, float("-inf"))
        loss = F.cross_entropy(masked, labels, reduction="sum")
        return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


def prompt_ids(formatter: Formatter, examples: list[Example]) -> list[list[int]]:
    """The LM path's prompt tokens (input text cut in the middle to fit max_length); the head reads the last one.

    The sequence classifier pools the rightmost token that is not the pad token (transformers 5.24,
    GenericForSequenceClassification), so a prompt ending in the pad token would be pooled one token
    early; chat templates end prompts with the assistant header, and this refuses any that does not.
    """
    ids = formatter.prompt_ids(examples)
    pad = formatter.tokenizer.pad_token_id
    if any(p and p[-1] == pad for p in ids):
        raise UserError(
            f"a prompt ends with the pad token {formatter.tokenizer.pad_token!r}, so the classifier head cannot find its "
            "last token; give the tokenizer a pad token that the chat template never ends a prompt with"
        )
    return ids


def build_model(cfg: Config, heads: Heads, tokenizer):
    """The base model with a fresh score layer, wrapped for training: LoRA-family or (IA)^3 adapters with the
    score layer fully trained (PEFT's SEQ_CLS task adds it to ``modules_to_save``), or everything (full).
    Call ``set_seed`` first: the head and the adapter are initialised randomly."""
    import peft
    from transformers import AutoModelForSequenceClassification

    model = _load_base(cfg, heads, tokenizer, AutoModelForSequenceClassification, for_training=True)
    init_at_logit_scale(model)
    if cfg.peft.method == "qlora":
        model = prepare_4bit(model, cfg.train.gradient_checkpointing)
    pc = peft_config(cfg.peft, model)
    if pc is None:
        return model
    pc.task_type = "SEQ_CLS"
    return peft.get_peft_model(model, pc)


START_LOGIT_STD = 3.5  # the head's logits at the start, in nats (README, "A classification head": measured)


@torch.no_grad()
def init_at_logit_scale(model) -> None:
    """Draw the score layer's rows at random so that the head's logits start with std ``START_LOGIT_STD``.

    At the start the hidden state the head pools hardly differs from row to row (on the tiny banking77 model,
    0.7% of its variance), so the trunk has to learn to carry the text into that token. Under Adam a trunk
    step moves that hidden state by about a set amount and the logits by that times the rows' norm, so the
    logits' scale sets how fast the head learns. A logit is a row times the final norm's output, whose length
    is that of the norm applied to a flat vector (its weights times sqrt(hidden)); the rows' std is the wanted
    logit std over that length. transformers' start (std ``initializer_range`` = 0.02) gives a 4096-wide model with
    unit norm weights logits of std 1.3 but a 128-wide one 0.22, and the LM's label words (the start this
    replaced) picked one label for every row. Under FSDP's RAM-efficient loading only the ranks that load the
    checkpoint (local rank 0 of each node) hold weights, the others sit on the meta device and draw nothing, and
    global rank 0's rows are broadcast (``sync_module_states``).

    The norm's output length is measured on a Gaussian vector from a private generator (the global RNG is
    untouched): a flat vector would be zero after a mean-subtracting LayerNorm. A model without a findable final
    norm is taken to have a unit-weight one (length sqrt(hidden)), said once.
    """
    score = model.score.weight
    if score.is_meta:
        return
    hidden = score.shape[1]
    norm = getattr(model.base_model, "norm", None)
    length = 0.0
    if norm is not None and getattr(norm, "weight", None) is not None and not norm.weight.is_meta:
        probe = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0))
        length = norm(probe.to(norm.weight.device, norm.weight.dtype)).float().norm().item()
    if not length > 1e-3:
        main_print("note: the base model's final norm was not found; the classifier head assumes a unit-weight one")
        length = hidden**0.5
    score.normal_(0.0, START_LOGIT_STD / length)


def _load_base(cfg: Config, heads: Heads, tokenizer, loader, *, for_training: bool = False):
    id2label = heads.id2label()
    model = load_model(cfg, for_training=for_training, loader=loader, num_labels=heads.size, id2label=id2label,
                       label2id={v: k for k, v in id2label.items()})
    # Llama checkpoints set no pad token; the head finds each row's last real token by it
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # one forward pass per prompt: no cache in the outputs
    return model


def load_trained(cfg: Config, weights_dir: Path, tokenizer):
    """A trained classifier from ``weights_dir`` (adapter + head, or full weights), in eval mode on the device."""
    from transformers import AutoModelForSequenceClassification

    heads = Heads.load(weights_dir)
    if cfg.peft.method == "full":
        full = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(weights_dir)})})
        model = _load_base(full, heads, tokenizer, AutoModelForSequenceClassification)
    else:
        import peft

        base = _load_base(cfg, heads, tokenizer, AutoModelForSequenceClassification)
        model = peft.PeftModel.from_pretrained(base, str(weights_dir))
    if cfg.peft.method != "qlora":
        model.to(device())
    return model.eval(), heads


@torch.no_grad()
def probabilities(model, tokenizer, ids: list[list[int]], rows: slice, batch_size: int) -> torch.Tensor:
    """[N, K] softmax over one task's slice of the head, in input order (right-padded, as in training)."""
    was_training = model.training
    model.eval()
    dev = next(p for p in model.parameters()).device
    out = []
    starts = range(0, len(ids), batch_size)
    for start in tqdm(starts, desc="classifying", unit="batch", leave=False, disable=len(starts) < 4):
        chunk = {"input_ids": ids[start : start + batch_size]}
        batch = tokenizer.pad(chunk, padding=True, padding_side="right", return_tensors="pt")
        logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        out.append(logits[:, rows].float().softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, rows.stop - rows.start)
