"""Kill training with SIGKILL, relaunch the same command, and check that the result is bitwise the run
that was never interrupted: same final adapter, same loss and learning rate at every logged step.

The kills cycle through four moments, as a pod start script that reruns the same command after every
restart meets them: at a random step, during a checkpoint save, after the last checkpoint (while the
final adapter is saved and evaluated), and after the run finished (the relaunch must then say so and
exit 0). Each cycle prints where the kill landed.

    python scripts/fault_injection.py --cycles 4            # prints "4/4 resumed identical"
    python scripts/fault_injection.py --cycles 10 --nproc 2  # the same under 2-process DDP (torchrun, gloo)
    python scripts/fault_injection.py --cycles 10 --nproc 2 --fsdp  # FSDP2: the shipped accelerate config

--fsdp launches `accelerate launch --config_file configs/accelerate/fsdp2-1x4.yaml`; on CPU it goes
through the test-only shim tests/distributed/fsdp_on_cpu.py, since accelerate runs FSDP as DDP there.

On CPU, on the offline demo's data and tiny model, with LoRA dropout on so that the RNG state has to
be restored too.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file
from processes import kill_tree  # this folder is sys.path[0] when the script runs

from multitune.commands.demo import offline_config, prepare_offline

STEPS = 24
REPO = Path(__file__).resolve().parents[1]


def _config(workdir: Path, run_dir: Path) -> Path:
    raw = offline_config(workdir)
    raw["run_dir"] = str(run_dir)
    raw["peft"] = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1}
    raw["tasks"] = [{**t, "max_rows": 200} for t in raw["tasks"][:3]]
    raw["train"].update(max_steps=STEPS, save_steps=2, logging_steps=1, eval_rows_during_training=0, eval_steps=10_000, learning_rate=2e-3)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _command(config: Path, nproc: int, fsdp: bool) -> list[str]:
    if fsdp:
        on_cpu = [] if _cuda() else [str(REPO / "tests" / "distributed" / "fsdp_on_cpu.py")]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp2-1x4.yaml"),
                "--num_processes", str(nproc), "--main_process_port", str(_free_port()),
                *(on_cpu or ["-m", "multitune.cli"]), "train", str(config)]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "multitune.cli", "train", str(config)]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


KINDS = ("at a random step", "during a save", "after the last checkpoint", "after the run finished")


def _checkpoints(ckpts: Path) -> dict[int, bool]:
    """Each checkpoint folder's step, and whether it is marked complete."""
    found = {}
    for p in ckpts.glob("checkpoint-*") if ckpts.exists() else []:
        if p.name.split("-")[1].isdigit():
            found[int(p.name.split("-")[1])] = (p / "COMPLETE").exists()
    return found


def _due(kind: str, run_dir: Path, kill_at: int) -> bool:
    found = _checkpoints(run_dir / "checkpoints")
    if kind == "at a random step":
        return any(done for step, done in found.items() if step >= kill_at)
    if kind == "during a save":
        return any(not done for step, done in found.items() if step >= kill_at)
    if kind == "after the last checkpoint":
        return found.get(STEPS, False)
    return (run_dir / "DONE").exists()


def _train(config: Path, nproc: int = 1, fsdp: bool = False, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess | None:
    """Run training to its end, or SIGKILL it at the moment ``kill`` names."""
    cmd = _command(config, nproc, fsdp)
    if kill is None:
        return subprocess.run(cmd, capture_output=True, text=True)
    kind, kill_at = kill
    run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None:
        if _due(kind, run_dir, kill_at):
            if kind == "at a random step":
                time.sleep(random.uniform(0, 0.5))  # land anywhere: mid-step, mid-save
            kill_tree(proc.pid)
            break
        time.sleep(0.01)
    proc.wait()
    return None


def _landed(run_dir: Path) -> str:
    """Where the kill really landed, read from what it left behind."""
    found = _checkpoints(run_dir / "checkpoints")
    newest = max(found, default=None)
    if (run_dir / "DONE").exists():
        return "after the run finished"
    if newest is not None and not found[newest]:
        return f"during the save of checkpoint {newest}"
    if newest == STEPS:
        return "after the last checkpoint"
    return f"after checkpoint {newest}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(run_dir: Path) -> dict[int, tuple[float, float]]:
    logs = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: (e["loss"], e["learning_rate"]) for e in logs if "loss" in e}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--nproc", type=int, default=1, help="processes (DDP on CPU through torchrun when > 1)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 through the shipped accelerate config instead of DDP")
    args = ap.parse_args(argv)
    random.seed(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="multitune-faults-"))
    prepare_offline(work)
    ref_dir = work / "reference"
    ref = _train(_config(work, ref_dir), nproc=args.nproc, fsdp=args.fsdp)
    if ref.returncode:
        print(f"the uninterrupted reference run failed:\n{ref.stderr[-3000:]}")
        return 1
    ref_weights, ref_hist = load_file(str(ref_dir / "final" / "adapter_model.safetensors")), _history(ref_dir)
    identical = after_finish = 0
    for k in range(args.cycles):
        run_dir = work / f"faulty-{k}"
        config = _config(work, run_dir)
        kind = KINDS[k % len(KINDS)]
        kill_at = random.randint(2, STEPS - 4)
        _train(config, nproc=args.nproc, fsdp=args.fsdp, kill=(kind, kill_at))
        landed = _landed(run_dir)
        after_finish += landed == "after the run finished"
        again = _train(config, nproc=args.nproc, fsdp=args.fsdp)  # the same command again: must exit 0
        if again.returncode:
            print(f"cycle {k + 1}: SIGKILL {kind} (from step {kill_at}), landed {landed}; the relaunch FAILED "
                  f"(exit {again.returncode}):\n{again.stderr[-2000:]}")
            continue
        finished_said = "holds a finished run with this config" in again.stdout
        weights, hist = load_file(str(run_dir / "final" / "adapter_model.safetensors")), _history(run_dir)
        same_weights = weights.keys() == ref_weights.keys() and all((weights[n] == ref_weights[n]).all() for n in weights)
        same_hist = hist == ref_hist
        relaunch_ok = finished_said == (landed == "after the run finished")
        identical += same_weights and same_hist and relaunch_ok
        print(f"cycle {k + 1}: SIGKILL {kind} (from step {kill_at}), landed {landed}; relaunch "
              f"{'said finished' if finished_said else 'resumed'}{'' if relaunch_ok else ' (WRONG)'}; "
              f"weights {'identical' if same_weights else 'DIFFER'}, loss/lr {'identical' if same_hist else 'DIFFER'}")
    print(f"{identical}/{args.cycles} resumed identical ({after_finish} of the kills landed after the run had finished)")
    return 0 if identical == args.cycles else 1


if __name__ == "__main__":
    sys.exit(main())
