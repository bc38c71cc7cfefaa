"""train.liger and train.compile (multitune.modeling.speed): when Liger runs, and compiling without per-length recompiles."""

from __future__ import annotations

import pytest
import torch

from multitune.errors import UserError
from multitune.modeling.loss import supervised_loss
from multitune.modeling.speed import COMPILE_PAD_MULTIPLE, sft_args, use_liger


@pytest.mark.parametrize(("cuda", "installed", "expected"), [(True, True, True), (True, False, False), (False, True, False)])
def test_liger_auto_needs_cuda_and_the_package(cuda, installed, expected):
    assert use_liger("auto", cuda=cuda, installed=installed) is expected
    assert use_liger(False, cuda=cuda, installed=installed) is False


def test_liger_true_without_cuda_is_one_clear_error():
    with pytest.raises(UserError, match="train.liger=true needs a CUDA GPU"):
        use_liger(True, cuda=False, installed=True)
    with pytest.raises(UserError, match="pip install liger-kernel"):
        use_liger(True, cuda=True, installed=False)


def test_compile_pads_to_a_multiple_and_asks_for_dynamic_shapes(monkeypatch):
    from accelerate.utils import TorchDynamoPlugin

    from multitune.config import TrainConfig

    monkeypatch.delenv("ACCELERATE_DYNAMO_USE_DYNAMIC", raising=False)
    assert sft_args(TrainConfig()) == {"torch_compile": False}
    args = sft_args(TrainConfig(compile=True))
    assert args["torch_compile"] and args["pad_to_multiple_of"] == COMPILE_PAD_MULTIPLE
    # the plugin Trainer builds (dynamic=None) then reads the environment: dynamic shapes from the first compile
    assert TorchDynamoPlugin(backend="eager", dynamic=None).dynamic is True


def test_compiled_model_with_the_gather_hook_compiles_once_for_many_lengths(assets):
    """Batches of four padded lengths and varying answer counts through a dynamic-shape compile: after
    the second batch (dynamo may specialise once more on it) no new length compiles anything, and the
    loss equals the eager model's. A static-shape compile grows at every new length."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    counters.clear()
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).train()
    compiled = torch.compile(model, backend="eager", dynamic=True)
    g = torch.Generator().manual_seed(0)
    compiled_after = []
    for length in (64, 128, 192, 256):
        ids = torch.randint(10, model.config.vocab_size, (2, length), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -(length // 32) :] = ids[:, -(length // 32) :]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        loss = supervised_loss(compiled, batch)[0]
        loss.backward()
        assert loss.item() == pytest.approx(supervised_loss(model, batch)[0].item(), abs=1e-5)
        compiled_after.append(counters["frames"]["ok"])
    assert compiled_after[0] > 0
    assert compiled_after[2:] == [compiled_after[1]] * 2, compiled_after


def _compiled_module():
    module = torch.nn.Linear(2, 2)
    return module, torch.compile(module, backend="eager")  # lazy: nothing compiles until it is called


def test_evaluation_during_training_scores_with_the_uncompiled_module(monkeypatch):
    """Under compile + FSDP, Trainer's `model` is the compiled wrapper: scoring through it would compile again
    for every batch shape. The label scoring of MultitaskTrainer.evaluate gets the module under the wrapper."""
    from types import SimpleNamespace

    from trl import SFTTrainer

    from multitune.config import config_from_dict
    from multitune.training import lm

    seen = []
    monkeypatch.setattr(SFTTrainer, "evaluate", lambda self, *a, **k: {"eval_loss": 1.0})
    monkeypatch.setattr(lm, "evaluate_tasks", lambda model, *a, **k: seen.append(model) or {})
    module, compiled = _compiled_module()
    trainer = lm.MultitaskTrainer.__new__(lm.MultitaskTrainer)  # the state evaluate() reads, no model load
    trainer.model, trainer.formatter, trainer.log = compiled, None, lambda logs: None
    trainer.task_data = [SimpleNamespace(task=SimpleNamespace(kind="classification"))]
    trainer.mt_cfg = config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": "claims"}],
                                       "train": {"eval_rows_during_training": 4, "report_to": "none"}})
    trainer.args = SimpleNamespace(per_device_eval_batch_size=2, report_to=[])
    trainer.evaluate()
    assert len(seen) == 1 and seen[0] is module


def test_the_final_evaluation_scores_with_the_uncompiled_module(monkeypatch):
    from types import SimpleNamespace

    from pathlib import Path

    from multitune.config import config_from_dict
    from multitune.rundir import RunDir
    from multitune.training import parts

    seen = []
    monkeypatch.setattr(parts, "evaluate_tasks", lambda model, *a, **k: seen.append(model) or {})
    module, compiled = _compiled_module()
    cfg = config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": "claims"}], "train": {"report_to": "none"}})
    parts.LmParts().evaluate(compiled, cfg, RunDir(Path("run")), SimpleNamespace(formatter=None, data=[]))
    assert len(seen) == 1 and seen[0] is module
