"""In-context ("k-shot") prompts: k solved training examples as earlier chat turns before the question.

The examples for a validation row are drawn from the task's *training* rows only (the recorded or
deterministic split), seeded by the row's position, so the same evaluation always shows the same
examples and no validation answer ever appears in a prompt.
"""

from __future__ import annotations

import random
from dataclasses import replace

from multitune.errors import UserError
from multitune.tasks import Example


def draw_shots(train: list[Example], n_queries: int, k: int, seed: int, salt: str = "") -> list[list[Example]]:
    """For each of ``n_queries`` prompts, ``k`` distinct training examples (seeded per prompt)."""
    if k <= 0:
        return [[] for _ in range(n_queries)]
    if k > len(train):
        raise UserError(f"--shots {k}: {salt or 'the task'} has only {len(train)} training rows to draw examples from")
    # a string seed is hashed deterministically by random.seed (not by Python's salted hash())
    return [random.Random(f"{seed}:{salt}:{i}").sample(train, k) for i in range(n_queries)]


def _system_len(messages: list[dict[str, str]]) -> int:
    return 1 if messages and messages[0]["role"] == "system" else 0


def with_shots(ex: Example, shots: list[Example]) -> Example:
    """``ex`` with each shot's user turn(s) and its answer put before the question, as earlier turns.

    The system prompt stays first; the shots' input texts may be cut to fit ``max_length`` like the
    question's own; the shots' answers are context, never supervised.
    """
    head = ex.messages[: _system_len(ex.messages)]
    turns: list[dict[str, str]] = []
    cuttable: list[tuple[int, str]] = []
    for shot in shots:
        skip = _system_len(shot.messages)
        base = len(head) + len(turns) - skip
        cuttable += [(base + i, text) for i, text in shot.cuttable]
        turns += [dict(m) for m in shot.messages[skip:]] + [{"role": "assistant", "content": shot.target}]
    shift = len(turns)
    cuttable += [(i + shift, text) for i, text in ex.cuttable]
    return replace(
        ex,
        messages=head + turns + [dict(m) for m in ex.messages[len(head) :]],
        cuttable=tuple(cuttable),
        supervised=tuple(i + shift for i in ex.supervised),
    )


def add_shots(train: list[Example], queries: list[Example], k: int, seed: int, salt: str = "") -> list[Example]:
    """``queries`` each preceded by its own ``k`` training examples (see :func:`draw_shots`)."""
    draws = draw_shots(train, len(queries), k, seed, salt)
    return [with_shots(q, s) for q, s in zip(queries, draws, strict=True)]
