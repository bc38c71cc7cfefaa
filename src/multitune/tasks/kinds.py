"""The three kinds of task: classification, multiple choice and chat. Each says how one row becomes a chat
prompt plus a target completion and what its label space is (:class:`~multitune.tasks.base.Task` loads and scores).

Built-in tasks (one short module each) and tasks declared in YAML are both instances of these
classes, configured by a :class:`~multitune.config.TaskConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np

from multitune.errors import UserError
from multitune.tasks.base import Example, Task, normalize_label, unlabelled


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
