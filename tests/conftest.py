"""Shared fixtures: a tiny generated model and datasets (built once per session), and the Hub mirror."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub id must fail at once here, not after a 20 s timeout
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tokenised-data cache of this session only: no test reads what another session (or a user) left
os.environ["MULTITUNE_CACHE"] = tempfile.mkdtemp(prefix="multitune-cache-")

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "hub"


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Generated datasets in the seed schemas plus a tiny (pretrained-on-their-texts) Llama model."""
    from multitune.commands import tiny

    root = tmp_path_factory.mktemp("assets")
    paths = tiny.synthetic_datasets(root / "data", per_class=12)
    tiny.make_tiny_model(root / "model", tiny.corpus(paths), vocab_size=1024, hidden=64, layers=2, pretrain_steps=60)
    return {**paths, "model": root / "model"}


@pytest.fixture(scope="session")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model"])


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "datasets").is_dir():
        pytest.skip(f"the local Hub mirror is absent ({MIRROR}); these tests need the real seed datasets")
    return MIRROR


def tiny_config(assets, run_dir: Path, **train) -> dict:
    """A config dict that trains all four tasks on the generated data quickly."""
    return {
        "run_dir": str(run_dir),
        "model": {"name_or_path": str(assets["model"]), "max_length": 192},
        # full fine-tuning learns fastest on a from-scratch tiny model; every PEFT method has its own test
        "peft": {"method": "full", "r": 8, "alpha": 16, "dropout": 0.0},
        "tasks": [
            {"name": "claims", "dataset": str(assets["claims"])},
            {"name": "banking77", "dataset": str(assets["banking77"])},
            {"name": "commonsense_qa", "dataset": str(assets["commonsense_qa"]), "max_rows": 60},
            {"name": "chat", "dataset": str(assets["chat"]), "weight": 0.5},
        ],
        "train": {"epochs": 2, "learning_rate": 1e-3, "batch_size": 16, "logging_steps": 5, "save_steps": 10,
                  "eval_rows_during_training": 16, **train},
        "eval": {"batch_size": 32},
    }


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run the CLI in-process (fast) and return its exit code and output, as a subprocess would see them."""

    import sys
    from types import SimpleNamespace

    from multitune.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["multitune", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run
