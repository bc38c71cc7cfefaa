"""Every shipped config validates, and the demo config file is exactly what `multitune demo` trains."""

from pathlib import Path

import pytest
import yaml

from multitune.config import load_config
from multitune.demo import offline_config
from multitune.tasks import build_task, resolve_spec

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_required_configs_ship():
    names = {p.name for p in CONFIGS}
    assert {"demo-cpu.yaml", "llama3-8b-lora.yaml", "llama3-8b-qlora.yaml", "mirror-tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    for t in cfg.tasks:
        spec = resolve_spec(t)
        assert spec.type in ("classification", "multiple_choice", "chat")
        build_task(t)


def test_demo_file_matches_embedded_default():
    shipped = yaml.safe_load((CONFIGS[0].parent / "demo-cpu.yaml").read_text())
    assert shipped == offline_config(Path("runs/demo"))


def test_llama_configs_use_the_right_methods():
    assert load_config(CONFIGS[0].parent / "llama3-8b-qlora.yaml").peft.method == "qlora"
    assert load_config(CONFIGS[0].parent / "llama3-8b-lora.yaml").peft.method == "lora"
