"""Turning examples into token ids with the model's own chat template.

The prompt (system + user turns + the assistant header) and the completion (target + end-of-turn)
are tokenised *separately* and concatenated. Tokenising the joined text instead lets BPE merge
across the boundary (e.g. ``<|end_header_id|>\\n\\n`` + answer), so training would see a context
that inference, which only ever has the prompt, never sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from multitune.errors import UserError
from multitune.tasks import Example

IGNORE = -100
_SENTINEL = "\u2063MULTITUNE_SENTINEL\u2063"


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template puts after an assistant message, cut after its first special token.

    E.g. ``<|eot_id|>`` for Llama 3, ``<|im_end|>`` for ChatML. Raises if there is none: a model that
    never learns to end its turn cannot be scored or stop generating.
    """
    if not tokenizer.chat_template:
        raise UserError("the tokenizer has no chat template; use an instruct/chat model or add a chat_template")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
    suffix = rendered.split(_SENTINEL, 1)[1]
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.added_tokens_encoder), key=len, reverse=True)
    hits = [(suffix.find(tok), tok) for tok in specials if tok and tok in suffix]
    if not hits:
        raise UserError(
            f"the chat template puts no end-of-turn special token after assistant turns (found {suffix!r}); "
            "fix the template so the model can learn to stop"
        )
    pos, tok = min(hits)
    return suffix[: pos + len(tok)]


@dataclass
class Formatter:
    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __post_init__(self) -> None:
        self.eot = end_of_turn(self.tokenizer)

    def prompt_texts(self, examples: list[Example]) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
            for ex in examples
        ]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        return [self.fit_prompt(p) for p in self._ids(self.prompt_texts(examples))]

    def completion_ids(self, targets: list[str]) -> list[list[int]]:
        """Token ids of each target followed by the end-of-turn token: exactly what training supervises."""
        return self._ids([t + self.eot for t in targets])

    def fit_prompt(self, prompt: list[int], completion_len: int = 0) -> list[int]:
        """Cut the prompt from the left so prompt + completion fit ``max_length`` (keeps half for the prompt)."""
        room = max(self.max_length - completion_len, self.max_length // 2)
        return prompt[-room:] if len(prompt) > room else prompt

    def encode(self, examples: list[Example]) -> dict[str, list[list[int]]]:
        """``input_ids`` and ``labels`` (prompt tokens masked with -100) for training."""
        prompts = self._ids(self.prompt_texts(examples))
        completions = self.completion_ids([ex.target for ex in examples])
        input_ids, labels = [], []
        for p, c in zip(prompts, completions, strict=True):
            p = self.fit_prompt(p, len(c))
            c = c[: self.max_length - len(p)]
            input_ids.append(p + c)
            labels.append([IGNORE] * len(p) + c)
        return {"input_ids": input_ids, "labels": labels}


def check_supervision(task_name: str, encoded: dict[str, list[list[int]]], formatter: Formatter) -> None:
    """Fail loudly before training if any example of a task has no token carrying loss."""
    empty = sum(1 for lab in encoded["labels"] if all(t == IGNORE for t in lab))
    if empty:
        raise UserError(
            f"task {task_name}: {empty} example(s) have no supervised tokens after truncation to "
            f"{formatter.max_length}; raise model.max_length"
        )
    eot_ids = formatter.tokenizer(formatter.eot, add_special_tokens=False)["input_ids"]
    if not any(lab[-len(eot_ids) :] == eot_ids for lab in encoded["labels"]):
        raise UserError(f"task {task_name}: no example ends with the end-of-turn token {formatter.eot!r}")
