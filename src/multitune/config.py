"""Typed configuration: one YAML file, validated by pydantic, plus dotted ``key=value`` overrides.

The validated :class:`Config` object is what every other layer receives; nothing downstream
looks at raw dicts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from multitune.errors import UserError

PeftMethod = Literal["lora", "qlora", "dora", "rslora", "prompt_tuning", "prefix_tuning", "ia3", "full"]
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")
# a file name in run_dir/splits, never a path: no separator, no leading dot, no `..` (dots inside: runs recorded
# before names were checked, e.g. `sst2.v1`, must still load)
TASK_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")



def _positive_or_auto(n: int | str, what: str) -> int | str:
    """A batch size: a positive number of ``what``, or ``auto`` (chosen at launch)."""
    if isinstance(n, int) and n < 1:
        raise ValueError(f"must be a positive number of {what} or auto")
    return n

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name_or_path: str = Field(description="Hub id or local directory of a causal LM with a chat template")
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="auto: bf16 on GPUs that compute it natively (not V100/T4), else fp32; full fine-tuning loads "
        "fp32 weights and trains under bf16 autocast (an fp32 master copy for AdamW)",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="training attention. auto: packed rows (train.packing / padding_free) on a GPU take "
        "flash_attention_2 where flash-attn is installed, else flex_attention (both follow the sequence boundaries, "
        "no T x T mask); everything else takes sdpa. Scoring always runs SDPA (it needs a tree mask)",
    )
    max_length: int = Field(
        512, gt=8, description="prompt + completion tokens; a longer example's input text is cut in the middle, never its answer"
    )
    trust_remote_code: bool = False


class PeftConfig(_Strict):
    method: PeftMethod = "lora"
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["attention", "mlp", "all-linear"] | list[str] = "all-linear"
    layers: list[int] | None = Field(None, description="adapt only these decoder layers")
    last_n_layers: int | None = Field(None, gt=0, description="adapt only the last N decoder layers")
    num_virtual_tokens: int = Field(20, gt=0, description="prompt/prefix tuning length")
    prompt_init_text: str | None = Field(None, description="initialise a soft prompt from this text")

    @model_validator(mode="after")
    def _one_layer_selector(self) -> PeftConfig:
        if self.layers is not None and self.last_n_layers is not None:
            raise ValueError("set either peft.layers or peft.last_n_layers, not both")
        return self


class TaskConfig(_Strict):
    """A task in the mixture. Built-in tasks need only ``name``; any field overrides their default.

    A task declared from YAML alone sets ``type`` and ``dataset`` plus the columns it needs.
    """

    name: str = Field(description="letters, digits, _ and - (it names the task's files in run_dir and its metrics)")
    type: Literal["classification", "multiple_choice", "chat"] | None = None
    dataset: str | None = Field(None, description="Hub id or local path (dir, .csv, .json(l), .parquet)")
    subset: str | None = None
    split: str = "train"
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit) to pin; default: the latest")
    # classification
    text_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = Field(None, description="label names; default: the ClassLabel names or sorted values")
    # multiple choice
    question_column: str | None = None
    choices_column: str | None = None
    answer_column: str | None = None
    # chat
    messages_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    context_column: str | None = Field(
        None, description="chat: a column of reference text folded into the prompt when a row has it (default: 'context')"
    )
    max_answer_chars: int | None = Field(
        None, gt=0, description="chat: leave out rows whose answer is longer (an answer is never cut, so it must fit max_length)"
    )
    assistant_turns: Literal["all", "last"] = Field(
        "all", description="chat: which assistant turns of a conversation carry loss (every one, or the last only)"
    )
    # prompt wording ("hard prompts")
    template: str = "default"
    system_prompt: str | None = None
    instruction: str | None = None
    # mixture
    weight: float = Field(1.0, gt=0, description="multiplies this task's share of the training stream")
    max_rows: int | None = Field(None, gt=0, description="stratified cap on rows used before the split")
    max_eval_rows: int | None = Field(None, gt=0, description="cap on validation rows scored by `eval`")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not TASK_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a task name multitune can use: 1 to 64 letters, digits, _, - or . (not "
                             "two dots in a row), starting with a letter, digit or _ (it names files in run_dir)")
        return name


class DataConfig(_Strict):
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 6
    # reuse tokenised data prepared by an earlier run with the same inputs ($MULTITUNE_CACHE, ~/.cache/multitune)
    cache: bool = True
    drop_unlabelled: bool = Field(
        True, description="leave out rows without a label (classification), answer (multiple choice) or response "
        "(chat), counted per task; false: refuse such data instead"
    )


class WandbConfig(_Strict):
    project: str = "multitune"
    run_name: str | None = None
    tags: list[str] = []
    entity: str | None = None


class TrainConfig(_Strict):
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "cosine_with_min_lr",
        "polynomial", "inverse_sqrt", "warmup_stable_decay",
    ] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int | Literal["auto"] = Field(
        8, description="examples per process per forward (the micro-batch); auto: the largest that fits the card (the "
        "smallest card of the launch), with gradient checkpointing only when needed; needs train.global_batch_size",
    )
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step; follows from global_batch_size when set")
    global_batch_size: int | None = Field(
        None, gt=0, description="examples per optimizer step over every process: micro-batch x grad_accum x processes; "
        "required with batch_size: auto (a relaunch on other cards resumes when it is unchanged)",
    )
    max_grad_norm: float = 1.0
    max_steps: int = Field(-1, description="-1: run the epochs")
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="None: evaluate at each epoch end")
    eval_rows_during_training: int = Field(200, ge=0, description="validation rows scored per task per eval")
    keep_best: str = Field(
        "none", description="none: final/ is the last step; mean: the checkpoint with the best mean accuracy over the "
        "labelled tasks scored during training; task:<name>: the best accuracy of that task. The rows scored during "
        "training choose; the final metrics are on the other validation rows",
    )
    save_steps: int = Field(100, gt=0)
    save_minutes: float | None = Field(30, gt=0, description="also checkpoint when this many minutes passed")
    save_total_limit: int = Field(3, ge=2, description="the newest complete checkpoint is never the only one")
    save_on_each_node: bool = Field(False, description="nodes without shared storage: each keeps a full copy")
    hub_checkpoints: bool = Field(False, description="also upload each complete checkpoint to the private Hub repo "
                                  "<hub.repo_id>-checkpoints; a fresh pod with an empty run_dir resumes from there")
    bf16: Literal["auto", True, False] = "auto"
    compile: bool = Field(False, description="torch.compile the model; batches padded to a multiple of 64, dynamic shapes")
    loss_positions: Literal["supervised", "all"] = Field(
        "supervised", description="run the LM head and loss only where a label is supervised (all: every position)"
    )
    liger: Literal["auto", True, False] = Field(
        False, description="Liger kernels (RMSNorm, RoPE, SwiGLU); auto: on with CUDA and liger-kernel installed. "
        "Off by default: on an H100 they made a 2-layer 8B-width LoRA model 2.9x slower (benchmarks/RESULTS.md, 2026-11-27)"
    )
    gradient_checkpointing: bool = False
    packing: bool = False
    padding_free: bool = False
    group_by_length: bool = Field(False, description="batches of similar length (less padding); ignored with packing")
    dataloader_workers: int = Field(0, ge=0)
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    wandb: WandbConfig = WandbConfig()

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, n: int | str) -> int | str:
        return _positive_or_auto(n, "examples")

    @model_validator(mode="after")
    def _global_batch(self) -> TrainConfig:
        """With global_batch_size named, grad_accum follows from it (global = micro-batch x grad_accum x processes)."""
        g = self.global_batch_size
        if self.batch_size == "auto" and g is None:
            raise ValueError("train.batch_size=auto needs the global batch: set train.global_batch_size (examples per "
                             "optimizer step over all processes, e.g. 192)")
        if g is not None and self.grad_accum != 1:
            raise ValueError("set train.grad_accum or train.global_batch_size, not both (grad_accum follows from the global "
                             "batch: global = batch_size x grad_accum x processes)")
        if g is not None and self.batch_size != "auto" and g % self.batch_size:
            raise ValueError(f"train.global_batch_size={g} is not a multiple of train.batch_size={self.batch_size}")
        return self

    @model_validator(mode="after")
    def _keep_best_spelling(self) -> TrainConfig:
        kind, _, name = self.keep_best.partition(":")
        if not (self.keep_best in ("none", "mean") or (kind == "task" and name)):
            raise ValueError(f"train.keep_best must be none, mean or task:<name>, not {self.keep_best!r}")
        return self

    @property
    def keep_best_task(self) -> str | None:
        """The task named by ``keep_best: task:<name>``, else None."""
        return self.keep_best.partition(":")[2] if self.keep_best.startswith("task:") else None


class EvalConfig(_Strict):
    mode: Literal["likelihood", "constrained", "generate"] = Field(
        "likelihood", description="likelihood: the label with the highest summed log-prob; constrained: greedy decoding "
        "restricted to the labels; generate: free greedy generation, parsed (an unparsable answer is wrong)",
    )
    batch_size: int | Literal["auto"] = Field(
        16, description="rows per scoring batch; auto: during `multitune train`, the largest the card holds (from the "
        "memory model, at most 64), elsewhere 16",
    )

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, n: int | str) -> int | str:
        return _positive_or_auto(n, "rows")

    @property
    def rows(self) -> int:
        """The scoring batch: the number, or (auto not resolved by a launch) the default 16."""
        return EVAL_AUTO_FALLBACK if self.batch_size == "auto" else self.batch_size


EVAL_AUTO_FALLBACK = 16


class HubConfig(_Strict):
    push: bool = False
    repo_id: str | None = None
    private: bool = True

    @model_validator(mode="after")
    def _repo_when_pushing(self) -> HubConfig:
        if self.push and not self.repo_id:
            raise ValueError("hub.push needs hub.repo_id (e.g. hub.repo_id=me/llama3-multitask)")
        return self


class Config(_Strict):
    run_dir: Path = Path("runs/default")
    seed: int = 6
    head: Literal["lm", "classifier"] = Field(
        "lm", description="lm: the model writes the label; classifier: a sequence-classification head per task"
    )
    strategy: Literal["joint", "per_task"] = Field(
        "joint", description="joint: one adapter trained on all tasks; per_task: one adapter (and head) per task"
    )
    hub_mirror: Path | None = Field(None, description="local Hub-shaped mirror; also MULTITUNE_HUB_MIRROR")
    model: ModelConfig
    peft: PeftConfig = PeftConfig()
    tasks: list[TaskConfig] = Field(min_length=1)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    hub: HubConfig = HubConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique, repeated: {dupes}")
        if self.peft.method in PROMPT_LEARNING and (self.train.packing or self.train.padding_free):
            raise ValueError(f"peft.method={self.peft.method} cannot be combined with packing or padding_free")
        if self.train.hub_checkpoints and not self.hub.repo_id:
            raise ValueError("train.hub_checkpoints needs hub.repo_id (checkpoints go to the private repo <repo_id>-checkpoints)")
        if self.train.padding_free and not self.train.packing and self.model.attn_implementation not in ("flash_attention_2", "flex_attention"):
            raise ValueError("train.padding_free without packing needs model.attn_implementation=flash_attention_2 (or flex_attention)")
        if self.strategy == "per_task":
            if self.head == "lm" and self.peft.method == "full":
                raise ValueError("strategy: per_task trains one adapter per task on one base; peft.method=full would "
                                 "train a whole model per task: choose an adapter method (lora, qlora, ...) or strategy: joint")
            if self.hub.push or self.train.hub_checkpoints:
                raise ValueError("strategy: per_task cannot use hub.push or train.hub_checkpoints yet; upload "
                                 "run_dir/final/<task> with `hf upload`, or use strategy: joint")
        self._keep_best_possible(names)
        if self.head == "classifier":
            if self.peft.method in PROMPT_LEARNING:
                raise ValueError(f"head: classifier cannot use peft.method={self.peft.method} (the head reads the last "
                                 "real token, which virtual tokens shift); use lora, qlora, dora, rslora, ia3 or full")
            if self.train.packing or self.train.padding_free:
                raise ValueError("head: classifier classifies one prompt per row: set train.packing and train.padding_free to false")
        return self

    def _keep_best_possible(self, names: list[str]) -> None:
        """train.keep_best chooses on the rows scored during training: refused where nothing is scored or chosen."""
        t = self.train
        if t.keep_best == "none":
            return
        if t.keep_best_task is not None and t.keep_best_task not in names:
            raise ValueError(f"train.keep_best={t.keep_best}: no task named {t.keep_best_task!r} (tasks: {', '.join(names)})")
        if t.eval_rows_during_training == 0:
            raise ValueError(f"train.keep_best={t.keep_best} chooses on the rows scored during training, and "
                             "train.eval_rows_during_training=0 scores none: set it above 0 (e.g. 200) or keep_best=none")
        if self.head == "classifier" or self.strategy == "per_task":
            raise ValueError(f"train.keep_best={t.keep_best} supports head: lm with strategy: joint only (this run is head: "
                             f"{self.head}, strategy: {self.strategy}); set train.keep_best=none")
        if t.hub_checkpoints:
            raise ValueError(f"train.keep_best={t.keep_best} cannot be combined with train.hub_checkpoints yet (the Hub keeps "
                             "and a fresh pod fetches only the newest checkpoints, not the kept one); set one of them off")


# ---------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `multitune validate` prints every valid key)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid config at {where}: {msg}{more}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    parts = dotted.split(".")
    for i, key in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"override {dotted!r}: {'.'.join(parts[:i])} has no item {key}")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"override {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override {dotted!r}: no list item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def _task_by_name(tree: dict[str, Any], key: str, item: str) -> str:
    """``tasks.<name>.rest`` as ``tasks.<index>.rest``; a name may hold dots (``sst2.v1``): the longest that fits."""
    rest = key.removeprefix("tasks.")
    named = [(i, t.get("name")) for i, t in enumerate(tree.get("tasks") or []) if isinstance(t, dict) and isinstance(t.get("name"), str)]
    fits = [(i, n) for i, n in named if rest == n or rest.startswith(n + ".")]
    if not fits:
        raise UserError(f"override {item!r}: no task named {rest.split('.')[0]!r} in the config")
    i, name = max(fits, key=lambda f: len(f[1]))
    return ".".join(["tasks", str(i), *rest[len(name):].split(".")[1:]])


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings; values are parsed as YAML (so ``1e-4``, ``true``, ``[a, b]`` work).

    A task can be addressed by name: ``tasks.banking77.max_rows=500``.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. train.epochs=1)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if key.startswith("tasks.") and not key.split(".")[1].isdigit():
            key = _task_by_name(tree, key, item)
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return config_from_dict(apply_overrides(tree, overrides or []))


def config_from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_validation_error(e)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
