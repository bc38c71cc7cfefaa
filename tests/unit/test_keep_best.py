"""train.keep_best: the kept checkpoint survives rotation, final weights are its weights, and refusals.

The Trainer here is transformers' own, on a tiny Llama, with multitune's evaluation-table hook: its task
accuracies are a script (one task peaks early, the other late), so the step each criterion must keep is
known in advance; the weights each checkpoint holds are read back from its own file.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.results.selection import check_choosable
from multitune.tasks import resolve_tasks
from multitune.training.checkpoints import CompleteMarker
from multitune.training.hooks import TaskEvaluation
from multitune.training.keep_best import KeepBest, restore_best

# per evaluation step: claims peaks at step 4, banking77 at step 10; their mean peaks at step 8
SCRIPT = {2: (0.5, 0.1), 4: (0.9, 0.2), 6: (0.6, 0.3), 8: (0.7, 0.6), 10: (0.2, 0.7), 12: (0.3, 0.5)}


class ScriptedTrainer(TaskEvaluation, Trainer):
    def score_tasks(self, tables):
        claims, banking = SCRIPT[self.state.global_step]
        return {}, {"eval_claims_accuracy": claims, "eval_banking77_accuracy": banking}


def _train(tmp_path, tasks: list[str], steps: int = 12) -> ScriptedTrainer:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    ids = torch.randint(0, 32, (8, 6)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, save_strategy="steps", save_steps=3, save_total_limit=2,
                             eval_strategy="steps", eval_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0)
    trainer = ScriptedTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(2)),
                              callbacks=[CompleteMarker(), KeepBest(tasks)])
    trainer.train()
    return trainer


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    common = set(a) & set(b)
    return bool(common) and all(torch.equal(a[k], b[k]) for k in common)


@pytest.mark.parametrize("tasks, best", [(["claims"], 4), (["banking77"], 10), (["claims", "banking77"], 8)])
def test_the_best_step_is_kept_through_rotation_and_becomes_the_final_weights(tmp_path, tasks, best):
    trainer = _train(tmp_path, tasks)
    checkpoints = tmp_path / "checkpoints"
    kept = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    # save_total_limit=2 keeps the newest two of the regular saves (3, 6, 9, 12) and, beside them, the best step
    assert best in kept and 12 in kept and len(kept) <= 3, kept
    assert trainer.state.best_global_step == best
    # the last step's weights differ from the kept checkpoint's (else the test could not tell them apart)
    saved = load_file(str(checkpoints / f"checkpoint-{best}" / "model.safetensors"))
    assert not _same(_weights(trainer.model), saved)
    assert restore_best(trainer) == best
    assert _same(_weights(trainer.model), saved)


def test_the_last_step_needs_no_reload_and_none_scored_keeps_the_last(tmp_path):
    trainer = _train(tmp_path, ["claims"], steps=4)  # claims is best at step 4, the last
    assert trainer.state.best_global_step == 4 and restore_best(trainer) is None
    trainer = _train(tmp_path / "none", ["chat"])  # no accuracy of that task is ever logged
    assert trainer.state.best_global_step is None and restore_best(trainer) is None


def test_a_kept_checkpoint_that_is_gone_is_an_error_not_the_last_step(tmp_path):
    import shutil

    trainer = _train(tmp_path, ["claims"])
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")
    with pytest.raises(UserError, match="checkpoint-4 .* is missing"):
        restore_best(trainer)


BASE = {"model": {"name_or_path": "m"}, "tasks": [{"name": "claims"}, {"name": "chat"}]}


@pytest.mark.parametrize("train, extra, message", [
    ({"keep_best": "best"}, {}, "train.keep_best must be none, mean or task:<name>, not 'best'"),
    ({"keep_best": "task:"}, {}, "must be none, mean or task:<name>"),
    ({"keep_best": "task:banking77"}, {}, "no task named 'banking77'"),
    ({"keep_best": "mean", "eval_rows_during_training": 0}, {}, "eval_rows_during_training=0 scores none"),
    ({"keep_best": "mean"}, {"head": "classifier", "tasks": [{"name": "claims"}]}, "supports head: lm with strategy: joint"),
    ({"keep_best": "mean"}, {"strategy": "per_task"}, "supports head: lm with strategy: joint"),
    ({"keep_best": "mean", "hub_checkpoints": True}, {"hub": {"repo_id": "me/x"}}, "cannot be combined with train.hub_checkpoints"),
])
def test_bad_keep_best_is_one_clear_error(train, extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        config_from_dict({**BASE, "train": train, **extra})
    assert "\n" not in str(e.value)


def test_keep_best_on_a_chat_task_or_no_labelled_task_is_refused():
    with pytest.raises(UserError, match="task chat is a chat task, so nothing is scored"):
        check_choosable(resolve_tasks(config_from_dict({**BASE, "train": {"keep_best": "task:chat"}})))
    only_chat = {**BASE, "tasks": [{"name": "chat"}], "train": {"keep_best": "mean"}}
    with pytest.raises(UserError, match="no task is a classification or multiple-choice task"):
        check_choosable(resolve_tasks(config_from_dict(only_chat)))
    check_choosable(resolve_tasks(config_from_dict({**BASE, "train": {"keep_best": "task:claims"}})))  # accepted
    assert config_from_dict(BASE).train.keep_best == "none"  # the default: today's behaviour
