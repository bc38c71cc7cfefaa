"""Every shipped config validates, and the demo config file is exactly what `multitune demo` trains."""

from pathlib import Path

import pytest
import yaml

from multitune.config import load_config
from multitune.commands.demo import offline_config
from multitune.tasks import build_task, resolve_spec

REPO = Path(__file__).resolve().parents[2]
ALL = sorted((REPO / "configs").glob("*.yaml"))
CONFIGS = [p for p in ALL if not p.name.startswith("compare-")]
COMPARE_SPECS = [p for p in ALL if p.name.startswith("compare-")]


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


@pytest.mark.parametrize("path", COMPARE_SPECS, ids=lambda p: p.name)
def test_shipped_compare_spec_validates(path, monkeypatch):
    from multitune.commands.compare import load_spec, row_config
    from multitune.results.variants import Variant, check_variant

    monkeypatch.chdir(REPO)  # a spec's paths are relative to the repository root, as its commands are run
    spec = load_spec(path)
    assert spec.rows[0].base and spec.rows[0].shots == 0 and spec.rows[0].template is None  # the zero-shot row
    base = load_config(spec.config, spec.overrides)
    for row in spec.rows:
        if row.trains:
            cfg = row_config(spec, row)
            assert str(cfg.run_dir) == f"{spec.out_dir}/runs/{row.name}"
            if cfg.head == "classifier":  # what train refuses (a chat task under a head) must not wait hours for its row
                from multitune.training import classifier
                from multitune.tasks import resolve_tasks

                classifier.check(resolve_tasks(cfg))
        else:
            check_variant(base, Variant(base=True, shots=row.shots, template=row.template))


def test_the_compare_specs_ship():
    assert {"compare-tiny.yaml", "compare-llama3-8b.yaml"} <= {p.name for p in COMPARE_SPECS}


def test_demo_file_matches_embedded_default():
    shipped = yaml.safe_load((CONFIGS[0].parent / "demo-cpu.yaml").read_text())
    assert shipped == offline_config(Path("runs/demo"))


def test_llama_configs_use_the_right_methods():
    assert load_config(CONFIGS[0].parent / "llama3-8b-qlora.yaml").peft.method == "qlora"
    assert load_config(CONFIGS[0].parent / "llama3-8b-lora.yaml").peft.method == "lora"


@pytest.mark.parametrize("gpu", ["a100-80gb", "h100-80gb"])
@pytest.mark.parametrize("name", ["llama3-8b-lora.yaml", "llama3-8b-qlora.yaml"])
def test_the_8b_configs_skip_checkpointing_and_padding_where_the_memory_model_fits(name, gpu):
    """Activation checkpointing recomputes every forward (4P -> 6P FLOPs a token with a frozen base): off while 8 rows
    of max_length tokens fit an 80 GB card without it, the loss on every position (the worst case), on the 3 x 4 DDP
    launch the configs are written for; batches of similar length (or packed) instead of random padded ones."""
    from multitune.launch.plan import GPUS, Layout, count, memory, total_with_overhead

    cfg = load_config(CONFIGS[0].parent / name)
    assert not cfg.train.gradient_checkpointing
    assert cfg.train.group_by_length or cfg.train.packing
    parts = memory(count(cfg), cfg, Layout("ddp-3x4.yaml", 1), micro_batch=8, seq=cfg.model.max_length, world=12, checkpointing=False)
    assert total_with_overhead(parts) <= GPUS[gpu].memory


ACCELERATE = sorted((CONFIGS[0].parent / "accelerate").glob("*.yaml"))


def test_the_launch_configs_ship():
    names = {p.name for p in ACCELERATE}
    assert {"1gpu.yaml", "ddp-1x4.yaml", "fsdp2-1x4.yaml", "ddp-3x4.yaml", "fsdp2-3x4.yaml", "hsdp-3x4.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_loads_with_accelerates_own_launcher(path):
    """accelerate's config loader (unknown keys are errors) and its launch-argument validation accept the file,
    and the processes it declares add up."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.num_machines == raw["num_machines"] and cfg.num_processes == raw["num_processes"]
    assert cfg.num_processes % cfg.num_machines == 0
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "multitune.cli", "train", "c.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == cfg.num_processes
    if raw["distributed_type"] == "FSDP":
        assert args.use_fsdp and str(raw["fsdp_config"]["fsdp_version"]) == "2"


def test_hsdp_config_shards_within_a_node_and_replicates_across_nodes(monkeypatch):
    """The environment accelerate's launcher builds from hsdp-3x4.yaml gives a 3 x 4 (replicate x shard) mesh."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = CONFIGS[0].parent / "accelerate" / "hsdp-3x4.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "multitune.cli", "train", "c.yaml"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith("PARALLELISM_CONFIG_"):
            monkeypatch.setenv(key, value)
    pc = ParallelismConfig()
    assert pc._get_mesh() == (("dp_replicate", "dp_shard"), (3, 4))
    assert pc.total_size == args.num_processes == 3 * 4
