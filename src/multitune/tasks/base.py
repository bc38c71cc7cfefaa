"""The three kinds of task. A task says how to load its rows, how one row becomes a chat prompt plus a
target completion, what its label space is, and how predictions are scored.

Built-in tasks (one short module each) and tasks declared in YAML are both instances of these
classes, configured by a :class:`~multitune.config.TaskConfig`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
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


class ClassificationTask(Task):
    kind = "classification"
    STATE = ("label_names", "text_col", "label_col", "_ids_to_names")
    TEXT_NAMES = ("text", "sentence", "description", "claim_text", "content", "query", "utterance", "input")
    LABEL_NAMES = ("label", "labels", "category", "class", "intent", "target", "is_claim")

    def bind(self, ds: datasets.Dataset) -> None:
        cols = ds.column_names
        self.label_col = self.cfg.label_column or self._detect_label(ds)
        self.text_col = self.cfg.text_column or self._detect_text(ds, exclude=self.label_col)
        self._require(ds, self.text_col, self.label_col)
        feature = ds.features[self.label_col]
        if isinstance(feature, datasets.ClassLabel):
            self._ids_to_names = list(feature.names)
            self.label_names = list(self.cfg.labels or feature.names)
        else:
            self._ids_to_names = None
            values = sorted({str(v) for v in ds.unique(self.label_col) if not unlabelled(v)})
            self.label_names = list(self.cfg.labels or values)
        if len(self.label_names) < 2:
            raise UserError(f"task {self.name}: needs at least 2 labels, found {self.label_names} in {cols}")

    def columns(self) -> list[str]:
        return [self.text_col, self.label_col]

    def input_columns(self) -> list[str]:
        return [self.text_col]

    def example_from_text(self, text: str) -> Example:
        return self.example({self.text_col: text})

    def _detect_label(self, ds: datasets.Dataset) -> str:
        cols = ds.column_names
        for c in cols:
            if isinstance(ds.features[c], datasets.ClassLabel):
                return c
        if self.cfg.labels:  # the column whose values are all known labels
            wanted = {normalize_label(x) for x in self.cfg.labels}
            for c in cols:
                sample = {normalize_label(v) for v in ds.select(range(min(len(ds), 200)))[c]}
                if sample and sample <= wanted:
                    return c
        for c in cols:
            if c.lower() in self.LABEL_NAMES:
                return c
        raise UserError(
            f"task {self.name}: cannot detect the label column in {self.cfg.dataset}; columns found: {cols}; "
            f"set tasks.{self.name}.label_column"
        )

    def _detect_text(self, ds: datasets.Dataset, exclude: str) -> str:
        cols = [c for c in ds.column_names if c != exclude]
        for c in cols:
            if c.lower() in self.TEXT_NAMES:
                return c
        sample = ds.select(range(min(len(ds), 200)))
        strings = {c: np.mean([len(str(v)) for v in sample[c]]) for c in cols if ds.features[c].dtype in ("string", "large_string")}
        if strings and max(strings.values()) >= 15:
            return max(strings, key=strings.get)
        raise UserError(
            f"task {self.name}: cannot detect the text column in {self.cfg.dataset}; columns found: {ds.column_names}; "
            f"set tasks.{self.name}.text_column"
        )

    def label_index(self, raw: Any) -> int:
        name = self._ids_to_names[raw] if self._ids_to_names is not None and isinstance(raw, int) else raw
        if getattr(self, "_lookup_for", None) is not self.label_names:
            self._lookup = {normalize_label(n): i for i, n in enumerate(self.label_names)}
            self._lookup_for = self.label_names
        idx = self._lookup.get(normalize_label(name))
        if idx is None:
            raise UserError(
                f"task {self.name}: label {name!r} is not in the label space {self.label_names[:10]}"
                f"{'...' if len(self.label_names) > 10 else ''}; fix the data or set tasks.{self.name}.labels"
            )
        return idx

    def has_answer(self, row: dict[str, Any]) -> bool:
        value = row.get(self.label_col)
        # a ClassLabel's -1 is the datasets convention for "no label" (not the last class, as index -1 would be)
        return not (unlabelled(value) or self._ids_to_names is not None and isinstance(value, int) and value < 0)

    def example(self, row: dict[str, Any]) -> Example:
        label = self.label_index(row[self.label_col]) if self.has_answer(row) else -1
        instruction = self.cfg.instruction or "Classify the text."
        text = str(row[self.text_col])
        messages = self.system() + [{"role": "user", "content": self.template(instruction, text, self.label_names)}]
        target = self.label_names[label] if label >= 0 else ""
        return Example(messages, target, label, cuttable=((len(messages) - 1, text),))


class MultipleChoiceTask(Task):
    kind = "multiple_choice"
    STATE = ("label_names", "q_col", "c_col", "a_col")
    ANSWER = "answer"
    LETTERS = "ABCDEFGHIJ"

    def bind(self, ds: datasets.Dataset) -> None:
        self.q_col = self.cfg.question_column or "question"
        self.c_col = self.cfg.choices_column or "choices"
        self.a_col = self.cfg.answer_column or "answerKey"
        self._require(ds, self.q_col, self.c_col, self.a_col)
        # every key any row offers (ARC: 3 to 5 choices, letters in most rows, digits in some); each row is
        # prompted and scored over its own choices only (Example.choices)
        keys = {key for raw in ds[self.c_col] for key, _ in self._choices({self.c_col: raw})}
        self.label_names = list(self.cfg.labels or sorted(keys))

    def columns(self) -> list[str]:
        return [self.q_col, self.c_col, self.a_col]

    def input_columns(self) -> list[str]:
        return [self.q_col, self.c_col]

    def _choices(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        raw = row[self.c_col]
        if isinstance(raw, dict):  # {"label": [...], "text": [...]}, as in tau/commonsense_qa
            return [(str(k), str(t)) for k, t in zip(raw["label"], raw["text"], strict=True)]
        return [(self.LETTERS[i], str(t)) for i, t in enumerate(raw)]

    def has_answer(self, row: dict[str, Any]) -> bool:
        answer = row.get(self.a_col)
        return not (unlabelled(answer) or isinstance(answer, int) and answer < 0)

    def stratify_key(self, ex: Example) -> Any:
        return ex.choices.index(ex.label) if ex.choices else ex.label  # the answer's position among the row's choices

    def example(self, row: dict[str, Any]) -> Example:
        choices = self._choices(row)
        keys = [key for key, _ in choices]
        unknown = [k for k in keys if k not in self.label_names]
        if unknown:
            raise UserError(f"task {self.name}: choice key(s) {unknown} are not in the label space {self.label_names}; "
                            f"fix the data or tasks.{self.name}.labels")
        label = -1
        if self.has_answer(row):
            answer = row[self.a_col]
            key = (keys[answer] if answer < len(keys) else None) if isinstance(answer, int) else str(answer).strip()
            if key not in keys:  # an int answer is the choice's position
                raise UserError(f"task {self.name}: answer {answer!r} is not one of the choices {keys} of its row")
            label = self.label_names.index(key)
        instruction = self.cfg.instruction or "Choose the best answer."
        question = str(row[self.q_col])
        messages = self.system() + [{"role": "user", "content": self.template(instruction, question, choices)}]
        target = self.label_names[label] if label >= 0 else ""
        own = () if keys == self.label_names else tuple(self.label_names.index(k) for k in keys)
        return Example(messages, target, label, cuttable=((len(messages) - 1, question),), choices=own)


CONTEXT_HEADER = "Context:"  # precedes a chat row's reference text in its prompt


class ChatTask(Task):
    kind = "chat"
    STATE = ("label_names", "messages_col", "prompt_col", "response_col", "context_col")
    ANSWER = "response"

    def load(self, mirror: Path | None, drop_unlabelled: bool = True) -> datasets.Dataset:
        ds = super().load(mirror, drop_unlabelled)
        limit = self.cfg.max_answer_chars
        if limit:  # the same rows at every load, so a recorded split keeps pointing at the same ones
            ds = ds.filter(lambda row: len(self._answer(row)) <= limit, desc=f"{self.name}: answers of at most {limit} chars")
            if len(ds) == 0:
                raise UserError(f"task {self.name}: no row has an answer of at most {limit} characters; raise tasks.{self.name}.max_answer_chars")
        return ds

    def _answer(self, row: dict[str, Any]) -> str:
        if self.messages_col:
            msgs = row[self.messages_col] or []
            return str(msgs[-1]["content"]) if msgs else ""
        return str(row.get(self.response_col) or "")

    def has_answer(self, row: dict[str, Any]) -> bool:
        """A response to learn (the last assistant turn of a conversation): without one the target would be the
        end-of-turn alone, training the model to answer nothing. A conversation that ends with another role's
        turn is malformed, not unanswered: example() refuses it."""
        if self.messages_col:
            msgs = row[self.messages_col] or []
            if msgs and msgs[-1].get("role") != "assistant":
                return True
            return bool(msgs) and not unlabelled(msgs[-1].get("content"))
        return not unlabelled(row.get(self.response_col))

    def bind(self, ds: datasets.Dataset) -> None:
        cols = ds.column_names
        self.messages_col = self.cfg.messages_column or ("messages" if "messages" in cols else None)
        self.prompt_col = self.cfg.prompt_column or next((c for c in ("prompt", "question", "instruction") if c in cols), None)
        self.response_col = self.cfg.response_column or next(
            (c for c in ("response", "answer", "completion", "output") if c in cols), None
        )
        if self.messages_col is None and (self.prompt_col is None or self.response_col is None):
            raise UserError(
                f"task {self.name}: needs a 'messages' column or prompt/response columns; columns found: {cols}; "
                f"set tasks.{self.name}.messages_column or prompt_column and response_column"
            )
        self._require(ds, *([self.messages_col] if self.messages_col else [self.prompt_col, self.response_col]))
        # reference text for the prompt (databricks-dolly-15k's `context`): prompt/response datasets only
        self.context_col = None if self.messages_col else self.cfg.context_column or ("context" if "context" in cols else None)
        if self.context_col:
            self._require(ds, self.context_col)

    def restore(self, state: dict[str, Any]) -> None:
        super().restore({"context_col": None, **state})  # runs recorded before context columns existed

    def columns(self) -> list[str]:
        return [self.messages_col] if self.messages_col else [self.prompt_col, self.response_col, *([self.context_col] if self.context_col else [])]

    def input_columns(self) -> list[str]:
        return [self.messages_col] if self.messages_col else [self.prompt_col]

    def example(self, row: dict[str, Any]) -> Example:
        if not self.messages_col:
            prompt = str(row[self.prompt_col])
            answer = row.get(self.response_col)
            context = str(row.get(self.context_col) or "").strip() if self.context_col else ""
            if context:  # folded in after the request; both are input text that truncation may cut
                content = f"{prompt}\n\n{CONTEXT_HEADER}\n{context}"
                return self._conversation([{"role": "user", "content": content}], None if answer is None else str(answer),
                                          cut=(prompt, context))
            return self._conversation([{"role": "user", "content": prompt}], None if answer is None else str(answer))
        msgs = [{"role": m["role"], "content": m["content"]} for m in row[self.messages_col]]
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UserError(f"task {self.name}: each conversation must end with an assistant turn")
        return self._conversation(msgs[:-1], msgs[-1]["content"])

    def prompt(self, msgs: list[dict[str, str]]) -> Example:
        """A conversation that ends with the user's turn, as the task's prompts are built (system prompt, instruction)."""
        return self._conversation([dict(m) for m in msgs], None)

    def _conversation(self, msgs: list[dict[str, str]], answer: str | None, cut: tuple[str, ...] = ()) -> Example:
        """The system prompt and instruction added, the user turns marked as input text (or, with ``cut``, these
        pieces of the single user turn), the earlier assistant turns marked as supervised (unless
        tasks.<name>.assistant_turns=last)."""
        if self.cfg.system_prompt and not (msgs and msgs[0]["role"] == "system"):
            msgs = self.system() + msgs
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        cuttable = tuple((i, msgs[i]["content"]) for i in users)  # the user's words, not the instruction
        if cut:
            cuttable = tuple((users[0], text) for text in cut)
        if self.cfg.instruction and users:
            first = msgs[users[0]]
            msgs[users[0]] = {**first, "content": self.template(self.cfg.instruction, first["content"])}
        supervised = tuple(i for i, m in enumerate(msgs) if m["role"] == "assistant") if self.cfg.assistant_turns == "all" else ()
        return Example(msgs, answer or "", -1, cuttable=cuttable, supervised=supervised)

    def stratify_key(self, ex: Example) -> Any:
        return None

    def example_from_text(self, text: str) -> Example:
        return self._conversation([{"role": "user", "content": text}], None)

    def example_from_input(self, value: str | dict[str, Any]) -> Example:
        # a conversation to continue: it ends with the user's turn, not with an answer
        if isinstance(value, dict) and self.messages_col and isinstance(value.get(self.messages_col), list):
            msgs = [{"role": m["role"], "content": m["content"]} for m in value[self.messages_col]]
            if msgs and msgs[-1]["role"] != "assistant":
                return self._conversation(msgs, None)
        return super().example_from_input(value)

    def score(self, gold: list[int], pred: list[int]) -> dict[str, Any]:
        raise TypeError("chat tasks are scored by loss and perplexity, not labels")
