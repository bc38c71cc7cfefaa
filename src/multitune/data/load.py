"""Per-task data: load, turn rows into examples, split 80/20 (stratified, recorded), and mix for training."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
from sklearn.model_selection import train_test_split

from multitune.config import Config
from multitune.errors import UserError
from multitune.data.formatting import Formatter, TooLong, check_supervision
from multitune.hub import mirror_root
from multitune.files import atomic_write
from multitune.tasks import Example, Task, build_task

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    val: list[Example]
    split: dict  # row indices of train and val in the loaded dataset, the task's bound state, a content fingerprint
    truncated: int = 0  # training rows whose input text was cut to fit model.max_length


def _examples(task: Task, ds: datasets.Dataset) -> list[Example]:
    if len(ds) == 0:
        raise UserError(f"task {task.name}: the dataset is empty")
    return [task.example(row) for row in ds]


def _dedupe(examples: list[Example]) -> list[int]:
    """Indices of the first occurrence of each distinct prompt, so no prompt lands in both splits."""
    seen: set[str] = set()
    keep = []
    for i, ex in enumerate(examples):
        key = json.dumps(ex.messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def _stratified_take(idx: list[int], keys: list, n: int, seed: int) -> list[int]:
    if n >= len(idx):
        return idx
    counts = Counter(keys)
    stratified = all(k is not None for k in keys) and min(counts.values()) >= 2 and n >= len(counts)
    taken, _ = train_test_split(idx, train_size=n, random_state=seed, stratify=keys if stratified else None)
    return sorted(taken)


def make_split(task: Task, examples: list[Example], val_fraction: float, seed: int, max_rows: int | None) -> dict:
    """A stratified train/validation split over row indices of the loaded dataset."""
    idx = _dedupe(examples)
    keys = [task.stratify_key(examples[i]) for i in idx]
    if max_rows:
        idx = _stratified_take(idx, keys, max_rows, seed)
        keys = [task.stratify_key(examples[i]) for i in idx]
    if len(idx) < 2:
        raise UserError(f"task {task.name}: only {len(idx)} usable row(s); need at least 2 to split")
    stratify = keys if all(k is not None for k in keys) else None
    if stratify is not None:
        counts = Counter(stratify)
        n_val = math.ceil(len(idx) * val_fraction)
        rare = [task.label_names[k] for k, c in counts.items() if c < 2]
        if rare or n_val < len(counts):
            detail = f"class(es) {rare[:5]} have a single row" if rare else f"{len(counts)} classes but {n_val} validation rows"
            raise UserError(
                f"task {task.name}: the {val_fraction:.0%} split leaves a class without validation rows ({detail}); "
                f"raise tasks.{task.name}.max_rows or data.val_fraction, or drop those rows"
            )
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=stratify)
    return {"n_rows": len(examples), "train": sorted(train_idx), "val": sorted(val_idx)}


def fingerprint(task: Task, ds: datasets.Dataset) -> str:
    """A hash of the content of the columns the task reads, row by row in order.

    A recorded split is a list of row indices: if the rows behind them changed (a Hub dataset updated
    with the same row count), the indices would silently pick other rows. Columns the task ignores
    are left out, so a dataset that only gained a column keeps its fingerprint.
    """
    cols = task.columns()
    h = hashlib.sha256(json.dumps({c: str(ds.features[c]) for c in cols}, sort_keys=True).encode())
    for batch in ds.select_columns(cols).iter(batch_size=1000):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def check_split(name: str, split: dict, n_rows: int) -> None:
    """Refuse a recorded split that cannot be right: indices out of range, repeated, or on both sides."""
    train, val = split.get("train"), split.get("val")
    problem = None
    if not isinstance(train, list) or not isinstance(val, list) or not train or not val:
        problem = "its train or val row list is missing or empty"
    elif not all(isinstance(i, int) and 0 <= i < n_rows for i in train + val):
        problem = f"it names rows outside the dataset's {n_rows}"
    elif len(set(train + val)) != len(train) + len(val):
        overlap = sorted(set(train) & set(val))
        problem = f"train and validation share rows {overlap[:5]}" if overlap else "it lists a row twice"
    if problem:
        raise UserError(f"task {name}: the recorded split is damaged ({problem}); restore splits/{name}.json or train a new run")


def _check_recorded(task: Task, split: dict, examples: list[Example], ds: datasets.Dataset) -> None:
    name = task.name
    if split["n_rows"] != len(examples):
        if "unlabelled_left_out" not in split and split["n_rows"] == len(examples) + task.left_out:
            raise UserError(
                f"task {name}: this run's split was made by an earlier multitune on all {split['n_rows']} rows, "
                f"{task.left_out} of them without a {task.ANSWER}, which this version leaves out (no {task.ANSWER} is "
                "no class), so its recorded row indices no longer fit; start the run over with --no-resume, or train "
                "and evaluate it with the multitune version that started it"
            )
        raise UserError(
            f"task {name}: the dataset now has {len(examples)} rows but the recorded split was made on "
            f"{split['n_rows']}; the data changed since this run started"
        )
    check_split(name, split, len(examples))
    if "fingerprint" in split and split["fingerprint"] != fingerprint(task, ds):  # runs recorded before fingerprints: count only
        raise UserError(
            f"task {name}: the dataset's content changed since the split was recorded ({len(examples)} rows, as before, "
            f"but not the same ones), so its row indices would now pick other rows; " + (
                f"pin tasks.{name}.revision={split['revision']} (the revision this run recorded)" if split.get("revision") else
                f"this run recorded no revision (it read the latest): pin tasks.{name}.revision to the dataset commit "
                f"it trained on (the dataset's history on the Hub lists them by date)") + " or train a new run"
        )


def load_tasks(cfg: Config, split_dir: Path | None, *, create: bool) -> list[TaskData]:
    """Load every task and its split: read back from ``split_dir`` when recorded there, else (with
    ``create``) made in memory; :func:`save_splits` records it once the run directory is ready."""
    mirror = mirror_root(cfg.hub_mirror)
    out = []
    for tcfg in cfg.tasks:
        task = build_task(tcfg)
        ds = task.load(mirror, cfg.data.drop_unlabelled)
        examples = _examples(task, ds)
        path = split_dir / f"{task.name}.json" if split_dir else None
        if path is not None and path.exists():
            split = json.loads(path.read_text())
            _check_recorded(task, split, examples, ds)
        elif create:
            split = make_split(task, examples, cfg.data.val_fraction, cfg.data.split_seed, task.cfg.max_rows)
            split |= {"task_state": task.state(), "fingerprint": fingerprint(task, ds), "revision": task.cfg.revision,
                      "unlabelled_left_out": task.left_out}
        else:
            raise UserError(f"no recorded split for task {task.name} in {split_dir}")
        out.append(TaskData(task, [examples[i] for i in split["train"]], [examples[i] for i in split["val"]], split))
        log.info("task %s: %d train / %d validation rows", task.name, len(out[-1].train), len(out[-1].val))
    return out


def save_splits(data: list[TaskData], split_dir: Path) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    for td in data:
        path = split_dir / f"{td.task.name}.json"
        if not path.exists():  # kept by every relaunch: never left half written
            atomic_write(path, json.dumps(td.split))


def _weighted(rows: list, weight: float, seed: int) -> list:
    if weight == 1.0:
        return rows
    n = max(1, round(len(rows) * weight))
    rng = random.Random(seed)
    whole, part = divmod(n, len(rows))
    return rows * whole + rng.sample(rows, part)


def encode(td: TaskData, formatter: Formatter, rows: list[Example]) -> dict[str, list]:
    """The task's rows tokenised for training or validation loss (see Formatter.encode), errors named."""
    try:
        return formatter.encode(rows)
    except TooLong as e:
        raise UserError(f"task {td.task.name}: {e}") from None


def training_dataset(data: list[TaskData], formatter: Formatter, seed: int) -> datasets.Dataset:
    """One stream of tokenised training examples from all tasks, each task scaled by its weight."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "task": []}
    for td in data:
        enc = encode(td, formatter, td.train)
        td.truncated = sum(enc["truncated"])
        check_supervision(td.task.name, enc, formatter)
        rows = _weighted(list(zip(enc["input_ids"], enc["labels"], strict=True)), td.task.cfg.weight, seed)
        columns["input_ids"] += [r[0] for r in rows]
        columns["labels"] += [r[1] for r in rows]
        columns["task"] += [td.task.name] * len(rows)
    return datasets.Dataset.from_dict(columns)


def subsample(rows: list, n: int | None, seed: int) -> list:
    """A fixed random subset (rows are stored in dataset order, which is often sorted by label)."""
    if not n or n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)


def validation_datasets(data: list[TaskData], formatter: Formatter, max_rows: int | None, seed: int) -> dict[str, datasets.Dataset]:
    """Per-task tokenised validation sets, for the validation loss reported during training."""
    out = {}
    for td in data:
        rows = subsample(td.val, max_rows, seed)
        if rows:
            enc = encode(td, formatter, rows)
            out[td.task.name] = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "labels": enc["labels"]})
    return out


def training_summary(data: list[TaskData], n_examples: int, formatter: Formatter, cached: bool = False) -> str:
    """The line printed before training: the mixed stream's size, each task's rows, and the rows cut to fit."""
    parts = [f"{td.task.name}={len(td.train)}" + (f" ({td.truncated} cut to fit)" if td.truncated else "") for td in data]
    cut = f"; input text cut in the middle to fit model.max_length={formatter.max_length}" if any(td.truncated for td in data) else ""
    origin = " (tokenised data from the cache)" if cached else ""
    return f"training on {n_examples} examples from {len(data)} tasks{origin}: " + ", ".join(parts) + cut
