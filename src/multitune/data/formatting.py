"""Turning examples into token ids with the model's own chat template.

A conversation is rendered by the template and split into pieces: context (system, user turns, the
assistant header) and completions (an assistant answer + end-of-turn), each tokenised *separately*.
Tokenising the joined text instead lets BPE merge across the boundary (e.g. ``<|end_header_id|>\\n\\n``
+ answer), so training would see a context that inference, which only ever has the prompt, never sees.
The prompt given to the model at inference is exactly the pieces before the last completion.

Too long for ``max_length``: the example's input text (the row's text, question or user turns) is cut
in the middle; the template, system prompt, instruction, choices and every answer are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from multitune.errors import UserError
from multitune.tasks import Example

IGNORE = -100
CUT_MARK = " … "  # stands where the middle of a truncated input text was
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


class TooLong(UserError):
    """An example that does not fit ``max_length`` even with its input text cut out."""


@dataclass
class Formatter:
    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __post_init__(self) -> None:
        self.eot = end_of_turn(self.tokenizer)

    # ------------------------------------------------------------------ text pieces

    def _render(self, messages: list[dict[str, str]], prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def prompt_texts(self, examples: list[Example]) -> list[str]:
        """What the model is given at inference: the conversation up to the assistant header."""
        return [self._render(ex.messages, prompt=True) for ex in examples]

    def _pieces(self, ex: Example, target: bool) -> list[tuple[str, bool]]:
        """(text, supervised) pieces of the conversation: context and completions, alternating.

        Earlier assistant turns listed in ``ex.supervised`` are completions too; the target is the last
        completion (left out with ``target=False``: the inference prompt).
        """
        pieces: list[tuple[str, bool]] = []
        done = ""  # the rendered text the pieces so far cover
        for i in sorted(ex.supervised):
            context = self._render(ex.messages[:i], prompt=True)
            pieces.append((self._after(context, done), False))
            pieces.append((ex.messages[i]["content"] + self.eot, True))
            rendered = self._render(ex.messages[: i + 1], prompt=False)
            done = rendered[: rendered.rindex(self.eot) + len(self.eot)]
        pieces.append((self._after(self._render(ex.messages, prompt=True), done), False))
        if target:
            pieces.append((ex.target + self.eot, True))
        return pieces

    def _after(self, text: str, done: str) -> str:
        if not text.startswith(done):
            raise UserError(
                "the chat template does not render a conversation as its earlier turns followed by the next one, "
                "so earlier assistant turns cannot be supervised; set tasks.<name>.assistant_turns=last"
            )
        return text[len(done) :]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _tokenise(self, examples: list[Example], target: bool) -> list[list[tuple[list[int], bool]]]:
        """Each example's pieces as token ids, tokenised in one batch."""
        pieces = [self._pieces(ex, target) for ex in examples]
        flat = self._ids([text for p in pieces for text, _ in p])
        out, k = [], 0
        for p in pieces:
            out.append([(flat[k + j], sup) for j, (_, sup) in enumerate(p)])
            k += len(p)
        return out

    # ------------------------------------------------------------------ fitting max_length

    def _shorten(self, ex: Example, excess: int) -> Example:
        """``ex`` with ``excess`` tokens taken out of the middle of its input texts, the longest first."""
        spans = self._ids([text for _, text in ex.cuttable])
        budget = sum(len(s) for s in spans) - excess
        if budget < 0:
            raise TooLong(f"it needs {-budget} token(s) more even with its input text cut out")
        # water-filling: every span keeps min(its length, level) tokens, for the largest level within budget
        lo, hi = 0, max(len(s) for s in spans)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(min(len(s), mid) for s in spans) <= budget else (lo, mid - 1)
        messages = [dict(m) for m in ex.messages]
        for (i, text), ids in zip(ex.cuttable, spans, strict=True):
            keep, content = min(len(ids), lo), messages[i]["content"]
            at = content.rfind(text)
            if keep < len(ids) and at >= 0:  # a template that rewrote the text leaves nothing to cut here
                head, tail = ids[: (keep + 1) // 2], ids[len(ids) - keep // 2 :]
                short = self.tokenizer.decode(head) + CUT_MARK + self.tokenizer.decode(tail)
                messages[i]["content"] = content[:at] + short + content[at + len(text) :]
        return replace(ex, messages=messages)

    def _fit(self, ex: Example, pieces: list[tuple[list[int], bool]], reserve: int, target: bool):
        """The example (cut if needed) and its pieces, within ``max_length`` less ``reserve`` tokens."""
        room = self.max_length - reserve
        excess = sum(len(ids) for ids, _ in pieces) - room
        if excess <= 0:
            return ex, pieces
        if not ex.cuttable:
            raise TooLong(f"it is {excess} token(s) too long and has no input text to cut")
        need = excess + len(self._ids([CUT_MARK])[0]) * len(ex.cuttable)
        for _ in range(8):  # re-tokenising the cut text can take a token or two more than estimated
            cut = self._shorten(ex, need)
            pieces = self._tokenise([cut], target)[0]
            excess = sum(len(ids) for ids, _ in pieces) - room
            if excess <= 0:
                return cut, pieces
            need += excess
        raise TooLong(f"it is still {excess} token(s) too long after cutting its input text")

    def _fitted(self, examples: list[Example], reserve: int, target: bool):
        out = []
        for ex, pieces in zip(examples, self._tokenise(examples, target), strict=True):
            try:
                cut, pieces = self._fit(ex, pieces, reserve, target)
            except TooLong as e:
                raise TooLong(
                    f"an example does not fit model.max_length={self.max_length}: {e} (the template, system prompt, "
                    "instruction, choices and answers are never cut); raise model.max_length"
                ) from None
            out.append((pieces, cut is not ex))
        return out

    # ------------------------------------------------------------------ public

    def prompt_ids(self, examples: list[Example], reserve: int = 0) -> list[list[int]]:
        """Inference prompts, cut (in their input text) to leave ``reserve`` tokens for the answer."""
        return [[t for ids, _ in pieces for t in ids] for pieces, _ in self._fitted(examples, reserve, target=False)]

    def completion_ids(self, targets: list[str]) -> list[list[int]]:
        """Token ids of each target followed by the end-of-turn token: exactly what training supervises."""
        return self._ids([t + self.eot for t in targets])

    def encode(self, examples: list[Example]) -> dict[str, list]:
        """``input_ids`` and ``labels`` (context masked with -100) for training, and which rows were cut."""
        input_ids, labels, truncated = [], [], []
        for pieces, cut in self._fitted(examples, 0, target=True):
            input_ids.append([t for ids, _ in pieces for t in ids])
            labels.append([t if sup else IGNORE for ids, sup in pieces for t in ids])
            truncated.append(cut)
        return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def check_supervision(task_name: str, encoded: dict[str, list[list[int]]], formatter: Formatter) -> None:
    """Fail loudly before training if any example of a task has no token carrying loss."""
    empty = sum(1 for lab in encoded["labels"] if all(t == IGNORE for t in lab))
    if empty:
        raise UserError(f"task {task_name}: {empty} example(s) have no supervised tokens")
    eot_ids = formatter.tokenizer(formatter.eot, add_special_tokens=False)["input_ids"]
    if not any(lab[-len(eot_ids) :] == eot_ids for lab in encoded["labels"]):
        raise UserError(f"task {task_name}: no example ends with the end-of-turn token {formatter.eot!r}")
