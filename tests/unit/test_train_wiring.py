"""How the config becomes Trainer arguments: decisions that would silently go wrong under a launcher."""

from __future__ import annotations

import os

from multitune.config import config_from_dict
from multitune.rundir import RunDir
from multitune.training.args import checkpointing_for_peft, sft_config


def _cfg(tmp_path, method: str):
    return config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": "m"}, "peft": {"method": method},
                             "tasks": [{"name": "claims", "dataset": "d"}]})


def test_adapters_take_activation_checkpointing_away_from_fsdp_wrappers(tmp_path, monkeypatch):
    # FSDP's checkpoint wrappers rename modules, and PEFT then saves empty adapters
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    cfg = checkpointing_for_peft(_cfg(tmp_path, "lora"))
    assert os.environ["FSDP_ACTIVATION_CHECKPOINTING"] == "false"
    assert cfg.train.gradient_checkpointing
    assert sft_config(cfg, RunDir(tmp_path / "run")).activation_checkpointing


def test_full_fine_tuning_keeps_fsdp_activation_checkpointing(tmp_path, monkeypatch):
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    cfg = checkpointing_for_peft(_cfg(tmp_path, "full"))
    assert os.environ["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    # FSDP checkpoints the layers itself: transformers must not do it a second time
    assert not sft_config(cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": True})}),
                          RunDir(tmp_path / "run")).activation_checkpointing


def test_push_without_a_token_stops_the_launch_before_training(tmp_path, monkeypatch):
    """hub.push uploads at the end: the missing token is found before hours of training, not after."""
    import pytest

    from multitune.errors import UserError
    from multitune.launch.runner import train

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no stored login either
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": "m"}, "tasks": [{"name": "claims", "dataset": "d"}],
                            "hub": {"push": True, "repo_id": "me/tuned"}})
    with pytest.raises(UserError, match="hub.push needs a Hugging Face token"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_several_gpus_in_one_process_are_refused_not_wrapped_in_data_parallel(tmp_path, monkeypatch):
    """Trainer's DataParallel splits each batch over replicas that share the supervised-loss hook's labels."""
    import pytest
    from trl import SFTConfig

    from multitune.errors import UserError
    from multitune.launch.runner import train

    monkeypatch.setattr(SFTConfig, "n_gpu", property(lambda self: 4))
    with pytest.raises(UserError, match="4 GPUs are visible to one process.*--num_processes 4"):
        train(_cfg(tmp_path, "lora"))
    assert not (tmp_path / "run").exists()
