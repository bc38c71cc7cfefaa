"""From a rented pod's environment to the launcher's: RunPod (single pods and Instant Clusters) and plain nodes.

RunPod Instant Clusters set, on every node, ``PRIMARY_ADDR``/``MASTER_ADDR``, ``PRIMARY_PORT``/``MASTER_PORT``,
``NODE_RANK``, ``NUM_NODES`` and ``NUM_TRAINERS`` (GPUs per node), and carry node-to-node traffic on
``ens1``..``ens8`` (``eth0`` is the management interface, not for collectives). ``scripts/launch_node.sh``
wants ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``GPUS_PER_NODE`` and ``ACCELERATE_CONFIG``.
:func:`launch_env` is the mapping, a pure function of the environment so that it can be tested for 1 and 3
nodes; ``python -m multitune.launch.runpod CONFIG`` prints it as ``export`` lines for the start script to ``eval``.

SkyPilot (``launch/sky/``) runs the same start script on every node of its cluster and sets
``SKYPILOT_NODE_RANK``, ``SKYPILOT_NODE_IPS`` (one address a line, node 0 first), ``SKYPILOT_NUM_NODES`` and
``SKYPILOT_NUM_GPUS_PER_NODE``; :func:`cluster_env` puts them under the names above, so one mapping serves both.

Secrets are never printed: a token held in a RunPod secret (``RUNPOD_SECRET_<name>``) is exported by
reference (``export HF_TOKEN="${RUNPOD_SECRET_hf_token}"``), so its value appears in no output or log.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from multitune.errors import UserError

ACCELERATE_DIR = Path(__file__).resolve().parents[3] / "configs" / "accelerate"
DEFAULT_PORT = "29500"
# names a RunPod secret may have been given for each token (case-insensitive), besides the variable itself
SECRET_NAMES = {
    "HF_TOKEN": ("hf_token", "huggingface_token", "hugging_face_token", "hf"),
    "WANDB_API_KEY": ("wandb_api_key", "wandb_key", "wandb"),
}
# SkyPilot's variable -> the RunPod name launch_env reads (the address comes from SKYPILOT_NODE_IPS)
SKYPILOT_NAMES = {"SKYPILOT_NUM_NODES": "NUM_NODES", "SKYPILOT_NODE_RANK": "NODE_RANK",
                  "SKYPILOT_NUM_GPUS_PER_NODE": "NUM_TRAINERS"}
ADAPTER_METHODS = ("lora", "qlora", "dora", "rslora", "ia3", "prompt_tuning", "prefix_tuning")


@dataclass(frozen=True)
class LaunchEnv:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: str
    gpus_per_node: int
    accelerate_config: str
    exports: dict[str, str] = field(default_factory=dict)  # other variables, values as shell words
    notes: list[str] = field(default_factory=list)

    def as_env(self) -> dict[str, str]:
        return {
            "NNODES": str(self.nnodes), "NODE_RANK": str(self.node_rank), "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": self.master_port, "GPUS_PER_NODE": str(self.gpus_per_node),
            "ACCELERATE_CONFIG": self.accelerate_config,
        }

    def shell(self) -> str:
        """``export`` lines; secret references stay references (``"${RUNPOD_SECRET_x}"``), never values."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.as_env().items()]
        lines += [f"export {k}={v}" for k, v in self.exports.items()]
        lines += [f"echo {shlex.quote('multitune: ' + n)} >&2" for n in self.notes]
        return "\n".join(lines) + "\n"


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a whole number") from None


def _first(env: Mapping[str, str], *names: str) -> str | None:
    return next((env[n] for n in names if env.get(n)), None)


def accelerate_config_for(method: str, nnodes: int, gpus_per_node: int) -> str:
    """The shipped launch config for this job: adapters replicate (DDP), full fine-tuning shards (FSDP2/HSDP).

    An 8B model with an adapter fits on every GPU, so plain DDP moves only the adapter's gradients between
    GPUs; sharding would re-gather the frozen weights over the network every micro-step. Across nodes, full
    fine-tuning shards within a node and replicates across nodes (HSDP), keeping the all-gathers on NVLink.
    ``multitune plan`` checks that the replicated layout fits and recommends FSDP2 when it does not.
    """
    if nnodes * gpus_per_node <= 1:
        return "1gpu.yaml"
    adapter = method in ADAPTER_METHODS
    if nnodes == 1:
        return "ddp-1x4.yaml" if adapter else "fsdp2-1x4.yaml"
    return "ddp-3x4.yaml" if adapter else "hsdp-3x4.yaml"


def socket_interfaces(env: Mapping[str, str], interfaces: Sequence[str]) -> dict[str, str]:
    """NCCL/Gloo interfaces: the cluster's ``ens*`` network when there is one, never ``eth0``; a user's choice wins."""
    ens = sorted((i for i in interfaces if i.startswith("ens")), key=lambda i: (len(i), i))
    out = {}
    if ens:
        if not env.get("NCCL_SOCKET_IFNAME"):
            out["NCCL_SOCKET_IFNAME"] = "ens"  # NCCL reads a prefix: every ens1..ens8 interface
        if not env.get("GLOO_SOCKET_IFNAME"):
            out["GLOO_SOCKET_IFNAME"] = ens[0]  # Gloo wants one device: ens1 carries PRIMARY_ADDR
    return out


def secret_exports(env: Mapping[str, str]) -> dict[str, str]:
    """``HF_TOKEN``/``WANDB_API_KEY`` from the pod's secrets when not set directly, as shell references."""
    out = {}
    lowered = {k.lower(): k for k in env if k.startswith("RUNPOD_SECRET_") and env[k]}
    for var, names in SECRET_NAMES.items():
        if env.get(var):
            continue
        for name in names:
            source = lowered.get(f"runpod_secret_{name}")
            if source:
                out[var] = f'"${{{source}}}"'
                break
    return out


def cluster_env(env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The environment with a SkyPilot cluster's variables under RunPod's names, and which provider set it.

    On SkyPilot (``SKYPILOT_NODE_RANK`` set) its values win over any RunPod-style ones; across nodes the
    rendezvous is node 0, the first of ``SKYPILOT_NODE_IPS``; one node uses 127.0.0.1, as a single pod does.
    """
    if env.get("SKYPILOT_NODE_RANK") in (None, ""):
        return dict(env), "runpod"
    out = dict(env)
    for sky, ours in SKYPILOT_NAMES.items():
        if env.get(sky):
            out[ours] = env[sky]
    ips = env.get("SKYPILOT_NODE_IPS", "").split()
    nnodes = _int(env, "SKYPILOT_NUM_NODES") or len(ips) or 1
    if nnodes > 1 and len(ips) != nnodes:
        raise UserError(f"SKYPILOT_NUM_NODES={nnodes} but SKYPILOT_NODE_IPS lists {len(ips)} address(es)")
    out["PRIMARY_ADDR"] = ips[0] if nnodes > 1 else "127.0.0.1"
    return out, "skypilot"


def launch_env(
    env: Mapping[str, str], *, method: str = "lora", gpu_count: int = 0, interfaces: Sequence[str] = (),
    accelerate_dir: Path = ACCELERATE_DIR,
) -> LaunchEnv:
    """Map a pod's environment (RunPod or SkyPilot names, or the launcher's own) to the launcher's variables.

    ``gpu_count`` is what this node sees (``nvidia-smi -L``), used when neither ``NUM_TRAINERS`` nor
    ``GPUS_PER_NODE`` is set; ``interfaces`` are this node's network interfaces (``/sys/class/net``).
    """
    env, provider = cluster_env(env)
    nnodes = _int(env, "NUM_NODES") or _int(env, "NNODES") or 1
    gpus = _int(env, "NUM_TRAINERS") or _int(env, "GPUS_PER_NODE") or gpu_count or 1
    node_rank = _int(env, "NODE_RANK", 0)
    if nnodes < 1 or gpus < 1:
        raise UserError(f"need at least 1 node and 1 GPU per node (got NUM_NODES={nnodes}, GPUs per node={gpus})")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"NODE_RANK={node_rank} is outside 0..{nnodes - 1} for {nnodes} node(s)")
    world = _int(env, "WORLD_SIZE")
    if nnodes > 1 and world is not None and world != nnodes * gpus:
        raise UserError(f"WORLD_SIZE={world} but {nnodes} nodes x {gpus} GPUs = {nnodes * gpus}; set NUM_TRAINERS to the GPUs per node")
    addr = _first(env, "PRIMARY_ADDR", "MASTER_ADDR")
    port = _first(env, "PRIMARY_PORT", "MASTER_PORT") or DEFAULT_PORT
    notes = []
    if nnodes > 1 and not addr:
        raise UserError(f"{nnodes} nodes but no PRIMARY_ADDR or MASTER_ADDR: set it to node 0's address on the cluster network")
    if nnodes == 1:
        addr = addr or "127.0.0.1"
    exports = {}
    if nnodes > 1 and provider == "runpod":  # ens* is RunPod's cluster network; SkyPilot's clouds route the node IPs
        exports |= {k: shlex.quote(v) for k, v in socket_interfaces(env, interfaces).items()}
        if not any(i.startswith("ens") for i in interfaces) and not env.get("NCCL_SOCKET_IFNAME"):
            notes.append("no ens* interface found: NCCL picks one itself; set NCCL_SOCKET_IFNAME if nodes cannot connect")
    exports |= secret_exports(env)
    if not env.get("HF_TOKEN") and "HF_TOKEN" not in exports:
        notes.append("no HF_TOKEN (nor a RunPod secret named hf_token): gated models and Hub uploads will fail")
    config = env.get("ACCELERATE_CONFIG") or str(Path(accelerate_dir) / accelerate_config_for(method, nnodes, gpus))
    return LaunchEnv(nnodes, node_rank, addr, port, gpus, config, exports, notes)


def _gpu_count() -> int:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _interfaces() -> list[str]:
    net = Path("/sys/class/net")
    return sorted(p.name for p in net.iterdir()) if net.is_dir() else []


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m multitune.launch.runpod", description="print the launcher's variables as export lines")
    parser.add_argument("config", nargs="?", help="the training config (its peft.method picks DDP or FSDP)")
    parser.add_argument("overrides", nargs="*", help="the key=value overrides the training gets")
    parser.add_argument("--accelerate-dir", type=Path, default=ACCELERATE_DIR, help="where the shipped accelerate configs are")
    args = parser.parse_args(argv)
    try:
        method = "lora"
        if args.config:
            from multitune.config import load_config

            method = load_config(args.config, args.overrides).peft.method
        plan = launch_env(os.environ, method=method, gpu_count=_gpu_count(), interfaces=_interfaces(),
                          accelerate_dir=args.accelerate_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(plan.shell())
    return 0


if __name__ == "__main__":
    sys.exit(main())
