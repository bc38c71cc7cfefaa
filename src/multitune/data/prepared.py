"""Training data ready for the Trainer (split, formatted, tokenised), cached on disk between runs.

The cache key covers everything that can change the result: the task and data config, the seeds,
`max_length`, the raw datasets' fingerprints (datasets derives them from the source files' metadata
or the Hub revision), a recorded split when resuming, the tokenizer and its chat template, the
source code of the modules that build examples, and the library versions. A change to any of
them is a miss, never a stale hit. Written by hand because datasets' own cache covers `map` over a
loaded dataset, not the multi-task split and mix built here.

An entry holds no pickle (JSON and Arrow only): the cache often sits on a pod's shared volume, and what is
read back from there must not be able to run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import datasets

from multitune.config import Config
from multitune.data.load import TaskData, load_tasks, training_dataset, validation_datasets
from multitune.data.formatting import Formatter
from multitune.hub import mirror_root
from multitune.tasks import Example, build_task

CACHE_ENV = "MULTITUNE_CACHE"
_CODE = ("data/load.py", "data/formatting.py", "data/prepared.py", "tasks")


@dataclass
class Prepared:
    data: list[TaskData]
    train: datasets.Dataset
    eval: dict[str, datasets.Dataset]
    cached: bool  # read back from the cache


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multitune"
    return Path(base) / "prepared"


def _code_hash() -> str:
    root = Path(__file__).parents[1]
    h = hashlib.sha256()
    for name in _CODE:
        for f in sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]:
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _tokenizer_hash(formatter: Formatter) -> str:
    tok = formatter.tokenizer
    if hasattr(tok, "backend_tokenizer"):
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec.pop("truncation", None), spec.pop("padding", None)  # call-time state, not the tokenizer itself
        backend = json.dumps(spec, sort_keys=True)
    else:
        backend = repr(sorted(tok.get_vocab().items()))
    parts = [backend, str(tok.chat_template), formatter.eot, str(tok.pad_token_id), str(tok.eos_token_id)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(cfg: Config, formatter: Formatter, fingerprints: list[str], split_dir: Path | None) -> str:
    recorded = sorted((p.name, p.read_text()) for p in split_dir.glob("*.json")) if split_dir and split_dir.is_dir() else []
    inputs = {
        "tasks": [t.model_dump(mode="json") for t in cfg.tasks],
        "data": cfg.data.model_dump(mode="json", exclude={"cache"}),
        "seed": cfg.seed,
        "max_length": cfg.model.max_length,
        "eval_rows": cfg.train.eval_rows_during_training,
        "fingerprints": fingerprints,
        "recorded_splits": recorded,
        "tokenizer": _tokenizer_hash(formatter),
        "code": _code_hash(),
        "versions": {p: metadata.version(p) for p in ("datasets", "transformers", "tokenizers")},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def prepare(cfg: Config, formatter: Formatter, split_dir: Path | None) -> Prepared:
    """Tasks with their splits, the mixed training set and the per-task validation sets."""
    if not cfg.data.cache:
        return _build(cfg, formatter, split_dir, cached=False)
    mirror = mirror_root(cfg.hub_mirror)
    tasks = [build_task(t) for t in cfg.tasks]
    fingerprints = [t.load(mirror, cfg.data.drop_unlabelled)._fingerprint for t in tasks]  # binds each task (labels, columns) too
    entry = cache_root() / cache_key(cfg, formatter, fingerprints, split_dir)
    if (entry / "DONE").exists():
        try:
            return _read(entry, tasks)
        except Exception as e:  # a damaged entry is rebuilt, never trusted
            print(f"notice: ignoring unreadable data cache {entry} ({type(e).__name__})")
    prepared = _build(cfg, formatter, split_dir, cached=False)
    _write(entry, prepared)
    return prepared


def _build(cfg: Config, formatter: Formatter, split_dir: Path | None, cached: bool) -> Prepared:
    data = load_tasks(cfg, split_dir, create=True)
    train = training_dataset(data, formatter, cfg.seed)
    evals = validation_datasets(data, formatter, cfg.train.eval_rows_during_training or None, cfg.seed)
    return Prepared(data, train, evals, cached)


def _example(row: dict) -> Example:
    """An Example back from its JSON (which made its tuples lists)."""
    return Example(row["messages"], row["target"], row["label"], cuttable=tuple((i, text) for i, text in row["cuttable"]),
                   supervised=tuple(row["supervised"]), choices=tuple(row["choices"]))


def _read(entry: Path, tasks) -> Prepared:
    splits = json.loads((entry / "tasks.json").read_text())
    data = [TaskData(task, [_example(r) for r in s["train"]], [_example(r) for r in s["val"]], s["split"], s["truncated"])
            for task, s in zip(tasks, splits, strict=True)]
    evals = {name: datasets.load_from_disk(str(entry / f"eval-{i}")) for i, name in enumerate(json.loads((entry / "eval.json").read_text()))}
    return Prepared(data, datasets.load_from_disk(str(entry / "train")), evals, cached=True)


def _write(entry: Path, prepared: Prepared) -> None:
    """Write to a private folder, then rename: concurrent ranks or runs never see half an entry."""
    tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        (tmp / "tasks.json").write_text(json.dumps([{"train": [asdict(ex) for ex in td.train], "val": [asdict(ex) for ex in td.val],
                                                      "split": td.split, "truncated": td.truncated} for td in prepared.data]))
        prepared.train.save_to_disk(str(tmp / "train"))
        for i, ds in enumerate(prepared.eval.values()):
            ds.save_to_disk(str(tmp / f"eval-{i}"))
        (tmp / "eval.json").write_text(json.dumps(list(prepared.eval)))
        (tmp / "DONE").touch()
        os.replace(tmp, entry)
    except OSError as e:  # another process got there first, or the cache is not writable: the data is in memory anyway
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
