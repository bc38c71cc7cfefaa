"""k-shot prompts: examples drawn from training rows only, seeded, rendered as earlier chat turns."""

import pytest

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.data.fewshot import add_shots, draw_shots
from multitune.data.formatting import Formatter
from multitune.results.variants import Variant, check_variant, eval_data
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def cfg(assets, tmp_path_factory):
    tree = tiny_config(assets, tmp_path_factory.mktemp("fewshot") / "run")
    tree["tasks"][0]["system_prompt"] = "You sort insurance claims."  # the system prompt must stay first
    return config_from_dict(tree)


def _user(ex):
    return ex.messages[-1]["content"]


def test_shots_come_from_training_rows_only_and_are_earlier_turns(cfg, tokenizer):
    data = eval_data(cfg, None, Variant(shots=2), seed=3)
    plain = {td.task.name: td for td in eval_data(cfg, None, Variant(), seed=3)}
    formatter = Formatter(tokenizer, 4096)
    for td in data:
        if td.task.kind == "chat":
            assert td.val == plain["chat"].val  # chat is scored by loss: no shots
            continue
        ref = plain[td.task.name]
        train_q = {_user(ex): ex.target for ex in ref.train}
        val_q = {_user(ex) for ex in ref.val}
        assert len(td.val) == len(ref.val)
        drawn = set()
        for shot_ex, orig in zip(td.val, ref.val, strict=True):
            sys = [m for m in orig.messages if m["role"] == "system"]
            msgs = shot_ex.messages
            assert [m["role"] for m in msgs] == ["system"] * len(sys) + ["user", "assistant"] * 2 + ["user"]
            assert msgs[: len(sys)] == sys and msgs[-1] == orig.messages[-1]  # the real question comes last
            assert (shot_ex.target, shot_ex.label) == (orig.target, orig.label)
            for u, a in zip(msgs[len(sys):-1:2], msgs[len(sys) + 1:-1:2], strict=True):
                assert u["content"] in train_q and u["content"] not in val_q  # a training row, never validation
                assert a["content"] == train_q[u["content"]]  # with its own gold answer
                drawn.add(u["content"])
            # the chat template renders them as earlier turns: exactly the tokenizer's rendering of that list
            assert formatter.prompt_texts([shot_ex])[0] == tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert len(drawn) > 2  # each prompt draws its own examples, not one fixed pair
    # seeded: the same seed draws the same examples, another seed others
    again = eval_data(cfg, None, Variant(shots=2), seed=3)
    other = eval_data(cfg, None, Variant(shots=2), seed=4)
    assert [ex.messages for ex in again[0].val] == [ex.messages for ex in data[0].val]
    assert [ex.messages for ex in other[0].val] != [ex.messages for ex in data[0].val]


def test_shot_texts_are_cut_to_fit_never_the_answers(cfg, tokenizer):
    td = eval_data(cfg, None, Variant(), seed=0)[0]
    ex = add_shots(td.train, td.val[:1], 3, seed=0)[0]
    assert len(ex.cuttable) == 4 and all(ex.messages[i]["content"].count(text) for i, text in ex.cuttable)
    full = Formatter(tokenizer, 4096).prompt_ids([ex])[0]
    short = Formatter(tokenizer, len(full) - 20).prompt_ids([ex])[0]
    assert len(short) <= len(full) - 20
    text = tokenizer.decode(short)
    assert all(m["content"] in text for m in ex.messages if m["role"] == "assistant")


def test_bad_shots_and_templates_are_refused(cfg):
    td = eval_data(cfg, None, Variant(), seed=0)[0]
    with pytest.raises(UserError, match="training rows"):
        draw_shots(td.train, 1, len(td.train) + 1, seed=0)
    with pytest.raises(UserError, match="template 'nope'"):
        check_variant(cfg, Variant(template="nope"))
    with pytest.raises(UserError, match="choose likelihood, constrained, generate"):
        check_variant(cfg, Variant(mode="vibes"))


def test_template_rerenders_the_same_rows(cfg):
    plain = eval_data(cfg, None, Variant(), seed=0)
    terse = eval_data(cfg, None, Variant(template="terse"), seed=0)
    for a, b in zip(plain, terse, strict=True):
        assert a.split["val"] == b.split["val"]
        assert [ex.label for ex in a.val] == [ex.label for ex in b.val]
        if a.task.kind != "chat":
            assert all(x.messages != y.messages for x, y in zip(a.val, b.val, strict=True))
            assert all("Label (" in _user(y) or y.messages[-1]["content"].endswith("Answer:") for y in b.val)
