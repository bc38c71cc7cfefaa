import pytest

from multitune.errors import UserError
from multitune.formatting import IGNORE, Formatter, check_supervision, end_of_turn
from multitune.tasks import Example

EXAMPLES = [
    Example([{"role": "system", "content": "sys"}, {"role": "user", "content": "Where is my new card?"}], "card_arrival", 0),
    Example([{"role": "user", "content": "Question: milk?\n\nA. fridge\nB. sky"}], "A", 0),
    Example([{"role": "user", "content": "I crashed my car."}], "Not a Claim", 1),
    Example([{"role": "user", "content": "hi"}], "Hello there, how can I help?", -1),
]


def test_end_of_turn_is_the_llama3_eot(tokenizer):
    assert end_of_turn(tokenizer) == "<|eot_id|>"


def test_template_without_end_of_turn_is_rejected(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="no end-of-turn special token"):
        end_of_turn(tok)


def test_loss_mask_covers_exactly_the_completion(tokenizer):
    f = Formatter(tokenizer, 512)
    enc = f.encode(EXAMPLES)
    prompts = f.prompt_ids(EXAMPLES)
    for ex, ids, labels, prompt in zip(EXAMPLES, enc["input_ids"], enc["labels"], prompts, strict=True):
        assert ids[: len(prompt)] == prompt  # what inference sees is a prefix of what training sees
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)
        supervised = [t for t in labels if t != IGNORE]
        assert tokenizer.decode(supervised) == ex.target + "<|eot_id|>"


def test_joined_text_equals_the_chat_template_rendering(tokenizer):
    f = Formatter(tokenizer, 512)
    for ex, ids in zip(EXAMPLES, f.encode(EXAMPLES)["input_ids"], strict=True):
        full = tokenizer.apply_chat_template([*ex.messages, {"role": "assistant", "content": ex.target}], tokenize=False)
        assert tokenizer.decode(ids) == full


def test_long_prompts_are_cut_from_the_left_keeping_the_answer(tokenizer):
    long = Example([{"role": "user", "content": "word " * 400}], "card_arrival", 0)
    f = Formatter(tokenizer, 64)
    enc = f.encode([long])
    assert len(enc["input_ids"][0]) <= 64
    assert tokenizer.decode([t for t in enc["labels"][0] if t != IGNORE]) == "card_arrival<|eot_id|>"


def test_supervision_check_fails_loudly(tokenizer):
    f = Formatter(tokenizer, 64)
    enc = f.encode(EXAMPLES)
    check_supervision("ok", enc, f)
    enc["labels"][0] = [IGNORE] * len(enc["labels"][0])
    with pytest.raises(UserError, match="no supervised tokens"):
        check_supervision("broken", enc, f)
