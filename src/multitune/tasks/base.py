"""What every task is: how it loads its rows (leaving out those without an answer), what one row becomes
(:class:`Example`), and how predictions are scored. The three kinds are in :mod:`multitune.tasks.kinds`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from multitune import hub
from multitune.config import TaskConfig
from multitune.distributed import main_print
from multitune.errors import UserError
from multitune.tasks import templates


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]  # the conversation before the answer: system, user (and earlier) turns
    target: str  # the assistant's answer text (a label name, a letter, or a free response)
    label: int  # index into Task.label_names, or -1 for chat
    # (message index, text in that message) that truncation may shorten: the row's input, never an answer
    cuttable: tuple[tuple[int, str], ...] = ()
    # indices of earlier assistant messages that carry loss as well as the target (multi-turn chat)
    supervised: tuple[int, ...] = ()
    # multiple choice: the label indices this row offers, in its order, when not the whole label space
    choices: tuple[int, ...] = ()


_REPORTED: set[tuple[str, int, int]] = set()  # (task, rows left out, rows) already printed


class Task:
    kind: str = ""
    STATE: tuple[str, ...] = ("label_names",)  # what bind() resolves; saved with the run for `predict`
    ANSWER = "label"  # what a row without one lacks, in the count of rows left out

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.template = templates.get(self.kind, cfg.template)
        self.label_names: list[str] = []

    # -- loading
    def load(self, mirror: Path | None, drop_unlabelled: bool = True) -> datasets.Dataset:
        if not self.cfg.dataset:
            raise UserError(f"task {self.name}: no dataset set (tasks.{self.name}.dataset=org/name or a path)")
        ds = hub.load_rows(self.cfg.dataset, subset=self.cfg.subset, split=self.cfg.split, mirror=mirror, revision=self.cfg.revision)
        self.bind(ds)
        return self._labelled(ds, drop_unlabelled)

    left_out = 0  # rows the last load left out for want of a label (answer)

    def has_answer(self, row: dict[str, Any]) -> bool:
        """Whether a row has its label (answer)."""
        return True

    def _labelled(self, ds: datasets.Dataset, drop: bool) -> datasets.Dataset:
        """The rows that have a label: an unlabelled row is no class and no training target. The same rows at every
        load, so a recorded split keeps pointing at the same ones."""
        missing = [i for i, row in enumerate(ds.select_columns(self.columns())) if not self.has_answer(row)]
        self.left_out = len(missing)  # recorded with the split: a split made on every row no longer fits (data.load)
        if not missing:
            return ds
        if not drop:
            raise UserError(f"task {self.name}: {len(missing)} of {len(ds)} rows have no {self.ANSWER} (the first is row {missing[0]}); "
                            "fill them in, or leave them out with data.drop_unlabelled: true (the default)")
        if (self.name, len(missing), len(ds)) not in _REPORTED:  # a launch loads a task more than once: said once
            _REPORTED.add((self.name, len(missing), len(ds)))
            main_print(f"task {self.name}: left out {len(missing)} of {len(ds)} rows without a {self.ANSWER} (the first is "
                       f"row {missing[0]}); data.drop_unlabelled: false refuses them instead")
        gone = set(missing)
        return ds.select([i for i in range(len(ds)) if i not in gone])

    def bind(self, ds: datasets.Dataset) -> None:
        """Resolve columns and the label space from the loaded data (raises UserError when impossible)."""

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.STATE}

    def restore(self, state: dict[str, Any]) -> None:
        """Rebind from a saved :meth:`state`, without loading the dataset (used by `predict`)."""
        for k in self.STATE:
            setattr(self, k, state[k])

    def _require(self, ds: datasets.Dataset, *columns: str | None) -> None:
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise UserError(
                f"task {self.name}: column(s) {missing} not in dataset {self.cfg.dataset}; "
                f"columns found: {ds.column_names}"
            )

    # -- formatting
    def system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []

    def example(self, row: dict[str, Any]) -> Example:
        raise NotImplementedError

    def stratify_key(self, ex: Example) -> Any:
        return ex.label

    def columns(self) -> list[str]:
        """The dataset columns this task reads (after :meth:`bind`): what a split's fingerprint covers."""
        raise NotImplementedError

    def input_columns(self) -> list[str]:
        """The columns a row needs for a prediction (no answer)."""
        raise NotImplementedError

    def example_from_input(self, value: str | dict[str, Any]) -> Example:
        """An example from user input for `predict`: a row in the dataset's schema, or plain text."""
        if isinstance(value, dict):
            missing = [c for c in self.input_columns() if c not in value]
            if missing:
                raise UserError(
                    f"task {self.name}: an input row has no {', '.join(map(repr, missing))} key (it has {sorted(value)}); "
                    f"give rows with the keys {self.input_columns()}, or plain strings"
                )
            return self.example(value)
        return self.example_from_text(value)

    def example_from_text(self, text: str) -> Example:
        raise UserError(f"task {self.name} ({self.kind}) needs JSON rows in its dataset's schema, not plain text")

    # -- scoring
    def score(self, gold: list[int], pred: list[int]) -> dict[str, Any]:
        """Accuracy, macro-F1, per-class report and confusion matrix over the label space (scikit-learn)."""
        if any(g < 0 for g in gold):  # index -1 would name the last class (load() leaves unlabelled rows out)
            raise ValueError(f"task {self.name}: unlabelled rows cannot be scored")
        ids = list(range(len(self.label_names)))
        present = sorted(set(gold) | set(p for p in pred if p >= 0))
        names = [self.label_names[i] for i in present]
        return {
            "n": len(gold),
            "accuracy": float(accuracy_score(gold, pred)),
            "macro_f1": float(f1_score(gold, pred, labels=present, average="macro", zero_division=0)),
            "chance": 1.0 / max(len(ids), 1),
            "per_class": classification_report(
                gold, pred, labels=present, target_names=names, output_dict=True, zero_division=0
            ),
            "confusion_matrix": {"labels": names, "matrix": confusion_matrix(gold, pred, labels=present).tolist()},
        }


def unlabelled(value: Any) -> bool:
    """No label: a missing or empty cell, or NaN."""
    return value is None or isinstance(value, float) and math.isnan(value) or isinstance(value, str) and not value.strip()


def normalize_label(value: Any) -> str:
    """Case-, space- and separator-insensitive form of a label, for matching data and generations."""
    return re.sub(r"[\s_\-]+", " ", str(value)).strip().lower()
