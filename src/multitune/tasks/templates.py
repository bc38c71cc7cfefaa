"""Named prompt wordings ("hard prompts"), switchable per task with ``tasks.<name>.template=...``.

Each template turns the fields of one row into the user turn of a chat. Comparing templates on
the same data is how a user does hard-prompt engineering with this tool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from multitune.errors import UserError

LIST_LABELS_UP_TO = 12


def _labels_line(labels: Sequence[str]) -> str:
    return "Answer with exactly one of: " + ", ".join(labels) + "."


def cls_default(instruction: str, text: str, labels: Sequence[str]) -> str:
    parts = [instruction, f"Text: {text}"]
    if len(labels) <= LIST_LABELS_UP_TO:
        parts.append(_labels_line(labels))
    return "\n\n".join(parts)


def cls_with_labels(instruction: str, text: str, labels: Sequence[str]) -> str:
    return "\n\n".join([instruction, f"Text: {text}", _labels_line(labels)])


def cls_minimal(instruction: str, text: str, labels: Sequence[str]) -> str:
    return text


def cls_terse(instruction: str, text: str, labels: Sequence[str]) -> str:
    """No instruction: the text and the label names only (all of them, however many)."""
    return f"{text}\n\nLabel ({' / '.join(labels)})?"


def cls_role(instruction: str, text: str, labels: Sequence[str]) -> str:
    """A role before the task's instruction ("persona" prompting)."""
    return "You are a meticulous expert annotator.\n\n" + cls_default(instruction, text, labels)


def mc_default(instruction: str, question: str, choices: Sequence[tuple[str, str]]) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in choices)
    return f"{instruction}\n\nQuestion: {question}\n\n{options}\n\nAnswer with the letter of the correct choice."


def mc_inline(instruction: str, question: str, choices: Sequence[tuple[str, str]]) -> str:
    options = " ".join(f"({letter}) {text}" for letter, text in choices)
    return f"{question} {options}"


def mc_terse(instruction: str, question: str, choices: Sequence[tuple[str, str]]) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in choices)
    return f"{question}\n{options}\nAnswer:"


def mc_role(instruction: str, question: str, choices: Sequence[tuple[str, str]]) -> str:
    return "You are a careful expert at everyday reasoning.\n\n" + mc_default(instruction, question, choices)


CLASSIFICATION: dict[str, Callable[..., str]] = {
    "default": cls_default,
    "with_labels": cls_with_labels,
    "minimal": cls_minimal,
    "terse": cls_terse,
    "role": cls_role,
}
MULTIPLE_CHOICE: dict[str, Callable[..., str]] = {"default": mc_default, "inline": mc_inline, "terse": mc_terse, "role": mc_role}


def chat_default(instruction: str, prompt: str) -> str:
    return f"{instruction}\n\n{prompt}" if instruction else prompt


CHAT: dict[str, Callable[..., str]] = {"default": chat_default}

BY_KIND = {"classification": CLASSIFICATION, "multiple_choice": MULTIPLE_CHOICE, "chat": CHAT}


def names(kind: str) -> list[str]:
    return sorted(BY_KIND[kind])


def get(kind: str, name: str) -> Callable[..., str]:
    table = BY_KIND[kind]
    if name not in table:
        raise UserError(f"unknown {kind} template {name!r}; choose one of {sorted(table)}")
    return table[name]
