"""Classification heads: the task slices of one score layer, their loss, pooling and save/reload."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import set_seed

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.data.formatting import Formatter
from multitune.modeling.heads import (
    START_LOGIT_STD,
    Heads,
    SlicedLoss,
    build_model,
    init_at_logit_scale,
    load_trained,
    probabilities,
    prompt_ids,
)
from multitune.tasks import Example
from tests.conftest import tiny_config
from tests.unit.test_cli import assert_clean_error

HEADS = Heads({"claims": ["Claim", "Not a Claim"], "intent": ["a", "b", "c"]})


def test_layout_gives_each_task_its_rows(tmp_path):
    assert HEADS.size == 5
    assert HEADS.rows("claims") == slice(0, 2) and HEADS.rows("intent") == slice(2, 5)
    assert HEADS.global_label("intent", 1) == 3
    assert [HEADS.task_of(r) for r in range(5)] == ["claims"] * 2 + ["intent"] * 3
    assert HEADS.id2label()[3] == "intent:b"
    HEADS.save(tmp_path)
    assert Heads.load(tmp_path) == HEADS
    with pytest.raises(UserError, match="no classification head for task 'chat'"):
        HEADS.rows("chat")


def test_loss_is_each_rows_cross_entropy_over_its_own_slice():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    tasks = ["claims", "intent", "intent", "claims", "intent", "claims"]
    local = [1, 0, 2, 0, 1, 1]
    labels = torch.tensor([HEADS.global_label(t, y) for t, y in zip(tasks, local)])
    # oracle: a separate softmax per task, over that task's columns only
    expected = sum(
        -torch.log_softmax(logits[i, HEADS.rows(t)], -1)[y] for i, (t, y) in enumerate(zip(tasks, local))
    ) / 6
    assert SlicedLoss(HEADS)({"logits": logits}, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # with gradient accumulation, Trainer passes the rows of the whole accumulated batch
    assert SlicedLoss(HEADS)({"logits": logits}, labels, num_items_in_batch=12).item() == pytest.approx(expected.item() / 2, rel=1e-6)


def test_one_tasks_loss_leaves_the_other_heads_untouched():
    torch.manual_seed(0)
    score = torch.nn.Linear(8, HEADS.size, bias=False)
    hidden = torch.randn(4, 8)
    labels = torch.tensor([HEADS.global_label("intent", y) for y in (0, 1, 2, 1)])
    SlicedLoss(HEADS)({"logits": score(hidden)}, labels).backward()
    grad = score.weight.grad
    assert torch.count_nonzero(grad[HEADS.rows("claims")]) == 0  # exactly zero, not just small
    assert torch.all(grad[HEADS.rows("intent")].abs().sum(-1) > 0)


@pytest.fixture(scope="module")
def lora_cfg(assets, tmp_path_factory):
    """The tiny model without a pad token in its config, as Llama 3 ships (the head must get the tokenizer's)."""
    root = tmp_path_factory.mktemp("heads")
    shutil.copytree(assets["model"], root / "model")
    config = json.loads((root / "model" / "config.json").read_text())
    (root / "model" / "config.json").write_text(json.dumps(config | {"pad_token_id": None}))
    raw = tiny_config(assets, root / "run")
    raw |= {"head": "classifier", "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}}
    raw["model"]["name_or_path"] = str(root / "model")
    return config_from_dict(raw)


def _examples(n: int) -> list[Example]:
    texts = ["My car was rear-ended, I want to claim.", "When is my next payment due?", "hi"]
    return [Example([{"role": "user", "content": texts[i % 3] * (1 + i)}], "", -1) for i in range(n)]


def test_head_reads_each_rows_last_real_token_under_padding(lora_cfg, tokenizer):
    """Against an oracle: the trunk run on each prompt alone, its last hidden state through the score rows."""
    torch.manual_seed(1)
    model = build_model(lora_cfg, HEADS, tokenizer).eval()
    ids = prompt_ids(Formatter(tokenizer, 192), _examples(3))
    assert len({len(x) for x in ids}) == 3  # a batch of three lengths: two rows are padded
    batched = probabilities(model, tokenizer, ids, HEADS.rows("intent"), batch_size=3)
    base = model.get_base_model()
    with torch.no_grad():
        for i, x in enumerate(ids):
            last = base.model(input_ids=torch.tensor([x])).last_hidden_state[0, -1]
            oracle = (model.base_model.model.score(last)[2:5]).softmax(-1)
            torch.testing.assert_close(batched[i], oracle, atol=1e-5, rtol=1e-4)


def test_adapter_and_head_reload_to_identical_probabilities(lora_cfg, tokenizer, tmp_path):
    torch.manual_seed(2)
    model = build_model(lora_cfg, HEADS, tokenizer)
    with torch.no_grad():  # stand-in for training: move every trained tensor (LoRA B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    ids = prompt_ids(Formatter(tokenizer, 192), _examples(4))
    before = probabilities(model, tokenizer, ids, HEADS.rows("claims"), batch_size=2)
    model.save_pretrained(str(tmp_path))
    HEADS.save(tmp_path)
    reloaded, heads = load_trained(lora_cfg, tmp_path, tokenizer)
    assert heads == HEADS
    after = probabilities(reloaded, tokenizer, ids, heads.rows("claims"), batch_size=2)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    # the fresh head of a base model predicts differently: the reload really restored the trained one
    fresh = probabilities(build_model(lora_cfg, HEADS, tokenizer), tokenizer, ids, HEADS.rows("claims"), batch_size=2)
    assert not torch.allclose(fresh, before, atol=1e-3)


def test_a_prompt_ending_in_the_pad_token_is_refused(tokenizer):
    formatter = Formatter(tokenizer, 192)
    last = formatter.prompt_ids(_examples(1))[0][-1]
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.pad_token = tok.convert_ids_to_tokens(last)
    with pytest.raises(UserError, match="ends with the pad token"):
        prompt_ids(Formatter(tok, 192), _examples(1))


@pytest.mark.parametrize("extra, fragment", [
    ({"head": "classifier", "peft": {"method": "prompt_tuning"}}, "cannot use peft.method=prompt_tuning"),
    ({"head": "classifier", "train": {"packing": True}}, "set train.packing and train.padding_free to false"),
    ({"head": "sideways"}, "invalid config at head"),
])
def test_config_refuses_what_a_head_cannot_do(assets, tmp_path, extra, fragment):
    with pytest.raises(UserError, match=fragment):
        config_from_dict(tiny_config(assets, tmp_path) | extra)


@pytest.mark.parametrize("extra, fragment", [
    ({}, "task(s) ['chat'] are chat tasks"),
    ({"hub": {"push": True, "repo_id": "me/x"}}, "hub.push is not supported with head: classifier"),
    ({"hub": {"repo_id": "me/x"}, "train": {"hub_checkpoints": True}}, "train.hub_checkpoints is not supported with head"),
])
def test_train_refuses_chat_tasks_and_push_writing_nothing(run_cli, assets, tmp_path, extra, fragment):  # noqa: F811
    raw = tiny_config(assets, tmp_path / "run") | {"head": "classifier"} | {k: v for k, v in extra.items() if k != "train"}
    raw["train"] |= extra.get("train", {})
    if extra:
        raw["tasks"] = raw["tasks"][:1]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert_clean_error(run_cli("train", tmp_path / "c.yaml"), fragment)
    assert not (tmp_path / "run").exists()


def _trained_head(model) -> torch.Tensor:
    return model.get_base_model().score.modules_to_save["default"].weight


INTENTS = Heads({"intent": [f"intent {i}" for i in range(60)]})  # 60 rows: a std over 60 logits per prompt


def test_head_starts_random_with_logits_of_the_set_scale(lora_cfg, tokenizer):
    """Issue 19 item 6: transformers' rows (std 0.02: logits of std ~0.2 on a narrow model) and the label-word rows
    made the head learn slower than writing the label. Oracle: the built model's own logits on real prompts."""
    set_seed(0)
    model = build_model(lora_cfg, INTENTS, tokenizer).eval()
    ids = prompt_ids(Formatter(tokenizer, 192), _examples(6))
    batch = tokenizer.pad({"input_ids": ids}, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits.float()
    assert logits.std(-1).mean().item() == pytest.approx(START_LOGIT_STD, rel=0.25)
    rows = _trained_head(model).detach().float()
    assert rows.mean().abs().item() < 0.1 * rows.std().item()
    # independent rows: the label words shared one direction ("intent"), random rows are nearly orthogonal
    cos = F.normalize(rows, dim=1) @ F.normalize(rows, dim=1).T
    assert cos[~torch.eye(len(rows), dtype=torch.bool)].abs().mean().item() < 0.25


class _Trunk(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm


class _Classifier(torch.nn.Module):
    """What init_at_logit_scale reads: ``score`` and the base model's final ``norm``."""

    def __init__(self, hidden: int, labels: int, norm):
        super().__init__()
        self.score = torch.nn.Linear(hidden, labels, bias=False)
        self.base_model = _Trunk(norm)


def _norms(hidden: int) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    rms = LlamaRMSNorm(hidden)
    rms.weight.data = 3 * (0.5 + torch.rand(hidden, generator=g))  # x3 and uneven: the length is not sqrt(hidden)
    layer = torch.nn.LayerNorm(hidden)  # mean-subtracting: a flat vector would come out as zeros
    layer.weight.data = 0.5 + torch.rand(hidden, generator=g)
    return {"rmsnorm x3": rms, "layernorm": layer}


@pytest.mark.parametrize("kind", ["rmsnorm x3", "layernorm"])
def test_head_logits_start_at_the_set_scale_whatever_the_final_norm(kind):
    """Oracle: the logits of the drawn rows on the norm's output for random hidden states, std over 500 labels."""
    hidden = 128
    model = _Classifier(hidden, 500, _norms(hidden)[kind])
    set_seed(0)
    init_at_logit_scale(model)
    with torch.no_grad():
        logits = model.score(model.base_model.norm(torch.randn(64, hidden)))
    assert logits.std(-1).mean().item() == pytest.approx(START_LOGIT_STD, rel=0.1)


def test_head_draw_is_reproducible_and_skipped_on_the_meta_device():
    hidden = 64
    rows = []
    for _ in range(2):
        model = _Classifier(hidden, 10, _norms(hidden)["rmsnorm x3"])
        set_seed(3)
        init_at_logit_scale(model)
        rows.append(model.score.weight.detach().clone())
    assert torch.equal(rows[0], rows[1])  # set_seed decides the rows: a relaunch draws the same head
    with torch.device("meta"):  # an FSDP rank that loads no weights: nothing drawn, nothing raised
        meta = _Classifier(hidden, 10, _norms(hidden)["rmsnorm x3"])
    init_at_logit_scale(meta)
    assert meta.score.weight.is_meta
