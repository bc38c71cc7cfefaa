import pytest

from multitune.errors import UserError
from multitune.data.formatting import IGNORE, Formatter, check_supervision, end_of_turn
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


def _task(tmp_path, rows, **cfg):
    import datasets

    from multitune.config import TaskConfig
    from multitune.tasks import build_task

    folder = tmp_path / cfg["name"]
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    task = build_task(TaskConfig(dataset=str(folder), **cfg))
    return task, [task.example(r) for r in task.load(None)]


def _supervised_spans(tokenizer, labels):
    """The decoded runs of consecutive supervised tokens."""
    spans, run = [], []
    for t in [*labels, IGNORE]:
        if t != IGNORE:
            run.append(t)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def test_a_long_input_is_cut_in_its_middle_keeping_everything_else(tokenizer, tmp_path):
    text = "START my car was hit " + "and then some more words " * 60 + "by a truck END"
    task, (ex,) = _task(tmp_path, [{"text": text, "label": "Claim"}], name="claims")
    f = Formatter(tokenizer, 150)
    enc = f.encode([ex])
    ids = enc["input_ids"][0]
    shown = tokenizer.decode(ids)
    assert len(ids) <= 150
    assert shown.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + task.cfg.system_prompt)
    assert task.cfg.instruction in shown and "Answer with exactly one of: Claim, Not a Claim." in shown
    assert "Text: START my car" in shown and "by a truck END" in shown and "…" in shown  # head and tail of the text
    assert _supervised_spans(tokenizer, enc["labels"][0]) == ["Claim<|eot_id|>"]
    assert enc["truncated"] == [True]
    # the inference prompt is cut the same way, leaving room for the longest label
    (prompt,) = f.prompt_ids([ex], reserve=8)
    assert len(prompt) <= 150 - 8 and tokenizer.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "by a truck END" in tokenizer.decode(prompt)


def test_a_long_question_keeps_every_choice(tokenizer, tmp_path):
    row = {"question": "Q-START " + "why " * 200 + "Q-END", "answerKey": "C",
           "choices": {"label": list("ABCDE"), "text": ["sky", "fridge", "library", "sea", "hat"]}}
    _, (ex,) = _task(tmp_path, [row], name="commonsense_qa")
    enc = Formatter(tokenizer, 150).encode([ex])
    shown = tokenizer.decode(enc["input_ids"][0])
    assert len(enc["input_ids"][0]) <= 150 and "Q-START" in shown and "Q-END" in shown
    assert all(f"{k}. {v}" in shown for k, v in zip("ABCDE", row["choices"]["text"], strict=True))
    assert _supervised_spans(tokenizer, enc["labels"][0]) == ["C<|eot_id|>"]


def test_an_answer_is_never_cut(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "long answer " * 80}]}]
    _, (ex,) = _task(tmp_path, rows, name="chat")
    with pytest.raises(UserError, match="does not fit model.max_length=64.*raise model.max_length"):
        Formatter(tokenizer, 64).encode([ex])


def test_every_assistant_turn_is_supervised_and_only_user_turns_are_cut(tokenizer, tmp_path):
    convo = [{"role": "user", "content": "U1 " + "blah " * 50 + "U1END"}, {"role": "assistant", "content": "first answer"},
             {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]
    _, (ex,) = _task(tmp_path, [{"messages": convo}], name="chat", instruction="Answer briefly.")
    f = Formatter(tokenizer, 512)
    enc = f.encode([ex])
    assert _supervised_spans(tokenizer, enc["labels"][0]) == ["first answer<|eot_id|>", "second answer<|eot_id|>"]
    # the pieces join to the template's own rendering, the instruction before the first user turn
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    full = [*system, {"role": "user", "content": "Answer briefly.\n\n" + convo[0]["content"]}, *convo[1:]]
    assert tokenizer.decode(enc["input_ids"][0]) == tokenizer.apply_chat_template(full, tokenize=False)
    # what inference sees is a prefix of what training sees
    (prompt,) = f.prompt_ids([ex])
    assert enc["input_ids"][0][: len(prompt)] == prompt
    # cut to fit: both answers whole, the long user turn shortened in its middle
    short = Formatter(tokenizer, 110).encode([ex])
    assert len(short["input_ids"][0]) <= 110 and short["truncated"] == [True]
    assert _supervised_spans(tokenizer, short["labels"][0]) == ["first answer<|eot_id|>", "second answer<|eot_id|>"]
    assert "U1END" in tokenizer.decode(short["input_ids"][0]) and "Answer briefly." in tokenizer.decode(short["input_ids"][0])
    # the option keeps the last turn only
    _, (last,) = _task(tmp_path, [{"messages": convo}], name="chat2", type="chat", assistant_turns="last")
    assert _supervised_spans(tokenizer, f.encode([last])["labels"][0]) == ["second answer<|eot_id|>"]


def test_assistant_only_conversation_and_chat_instruction(tokenizer, tmp_path):
    _, (ex,) = _task(tmp_path, [{"messages": [{"role": "assistant", "content": "Welcome!"}]}], name="chat")
    enc = Formatter(tokenizer, 128).encode([ex])
    assert _supervised_spans(tokenizer, enc["labels"][0]) == ["Welcome!<|eot_id|>"]
    _, (qa,) = _task(tmp_path, [{"prompt": "2+2?", "response": "4"}], name="qa", type="chat", instruction="Be exact.")
    assert qa.messages[-1]["content"] == "Be exact.\n\n2+2?" and qa.target == "4"


def test_supervision_check_fails_loudly(tokenizer):
    f = Formatter(tokenizer, 64)
    enc = f.encode(EXAMPLES)
    check_supervision("ok", enc, f)
    enc["labels"][0] = [IGNORE] * len(enc["labels"][0])
    with pytest.raises(UserError, match="no supervised tokens"):
        check_supervision("broken", enc, f)
