"""Inject the faults a rented pod meets into real training runs and check that none loses work.

--cycles N (the default mode): kill training with SIGKILL, relaunch the same command, and check that the result
is bitwise the run that was never interrupted: same final adapter, same loss and learning rate at every logged
step. The kills cycle through four moments, as a pod start script that reruns the same command after every
restart meets them: at a random step, during a checkpoint save, after the last checkpoint (while the final
adapter is saved and evaluated), and after the run finished (the relaunch must then say so and exit 0). Each
cycle prints where the kill landed.

    python scripts/fault_injection.py --cycles 4            # prints "4/4 resumed identical"
    python scripts/fault_injection.py --cycles 10 --nproc 2  # the same under 2-process DDP (torchrun, gloo)
    python scripts/fault_injection.py --cycles 10 --nproc 2 --fsdp  # FSDP2: the shipped accelerate config

--fsdp launches `accelerate launch --config_file configs/accelerate/fsdp2-1x4.yaml`; on CPU it goes
through the test-only shim tests/distributed/fsdp_on_cpu.py, since accelerate runs FSDP as DDP there.

--matrix: every other fault kind once (one process, 12 steps), each judged by an oracle of what must happen
(scripts/fault_matrix.py has each kind's oracle in its docstring); one `FAULT <kind>: survived|lost (...)` line
per kind, then `N/M faults survived` (M: the kinds run); exit status 0 only when every kind survived. Every
relaunch that must resume is also checked to resume from the expected checkpoint and to train only the steps
after it (a relaunch that trained again from step 0 would end identical too).

    nan                      train.learning_rate=1e30: one `error:` line naming the step and a lower learning rate,
                             exit 2, no DONE or final/, metrics.json (if any) strict JSON, every kept checkpoint
                             finite and older than that step, the last good one kept; the same command again stops
                             the same way
    nan-checkpoint           a NaN in the newest checkpoint's saved weights: the relaunch warns naming it, resumes
                             from the previous complete checkpoint and ends identical
    disk-full                the run directory a size-limited tmpfs (its own mount namespace, `unshare`): one
                             `error:` line naming the checkpoint being written, nothing cut off marked complete,
                             every checkpoint complete before it unchanged (a fill outside a save is inconclusive,
                             lost); grown, the relaunch ends identical
    damaged-optimizer        the newest checkpoint's optimizer.pt with a byte flipped in its middle (same size)
    truncated-rng            the newest checkpoint's rng_state.pth cut to half: for both, the relaunch warns, resumes
                             from the previous complete checkpoint and ends identical
    concurrent               a second launch, and a second --no-resume, while the first trains: each refused
                             naming the holder's host and pid, nothing written; the first ends identical
    sigterm-save             SIGTERM while a checkpoint is written: that save completes, a complete checkpoint
                             holds the last step trained, exit 0; relaunch identical
    sigterm-after-last-step  SIGTERM after the last step (tests/distributed/late_signal.py): the final adapter is
                             saved, no DONE, exit 0; the relaunch trains no step, evaluates it and ends identical
    hub-newer                train.hub_checkpoints, a volume older than the Hub (tests/fake_hub.py's, in the training
                             process) whose newer checkpoints are damaged: the relaunch warns for each, resumes from
                             the volume's, and its first upload deletes none of the Hub's newer steps; relaunched
                             again, the run ends identical, the Hub holding the run's newest checkpoints

    python scripts/fault_injection.py --matrix                  # prints "9/9 faults survived"
    python scripts/fault_injection.py --matrix --only concurrent --only nan
    python scripts/fault_injection.py --matrix --only hub-newer --seed 4803  # hub-newer as the full --seed 4803 ran it

"Identical" is bitwise against one uninterrupted run of the same config. Each kind's run directory, config
and launch logs stay in WORKDIR/matrix/<kind>/ until the next --matrix in that WORKDIR, which starts every kind
and the reference afresh (WORKDIR: --workdir, where the data and tiny model are reused, or a new temporary folder).

On CPU, on the offline demo's data and tiny model, with LoRA dropout on so that the RNG state has to
be restored too.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fault_matrix  # this folder is sys.path[0] when the script runs
import yaml
from fault_run import STEPS, recipe, same_weights, weights, write_config
from fault_run import checkpoints as _checkpoints
from fault_run import command as _command
from fault_run import history as _history
from processes import kill_tree

from multitune.commands.demo import offline_config, prepare_offline


def _config(workdir: Path, run_dir: Path) -> Path:
    return write_config(recipe(offline_config(workdir), run_dir))


KINDS = ("at a random step", "during a save", "after the last checkpoint", "after the run finished")


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
        return subprocess.run(cmd, check=False, capture_output=True, text=True)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=3, help="kill -9 cycles (the default mode)")
    ap.add_argument("--matrix", action="store_true", help="every fault kind once, each judged by its own oracle")
    ap.add_argument("--only", action="append", choices=list(fault_matrix.KINDS), default=None,
                    help="with --matrix: this kind only (repeat for several)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--nproc", type=int, default=1, help="processes (DDP on CPU through torchrun when > 1)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 through the shipped accelerate config instead of DDP")
    args = ap.parse_args(argv)
    if args.matrix and (args.nproc != 1 or args.fsdp):
        ap.error("--matrix runs one process; --nproc and --fsdp are for --cycles")
    if args.only and not args.matrix:
        ap.error("--only needs --matrix")
    random.seed(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="multitune-faults-"))
    prepare_offline(work)
    if args.matrix:
        bench = fault_matrix.Bench(work, offline_config(work), seed=args.seed)
        return fault_matrix.run(bench, args.only or list(fault_matrix.KINDS))
    return cycles(work, args.cycles, args.nproc, args.fsdp)


def cycles(work: Path, n: int, nproc: int, fsdp: bool) -> int:
    """``n`` kill -9 cycles, each against the uninterrupted reference run; 0 when every one resumed identical."""
    ref_dir = work / "reference"
    ref = _train(_config(work, ref_dir), nproc=nproc, fsdp=fsdp)
    if ref.returncode:
        print(f"the uninterrupted reference run failed:\n{ref.stderr[-3000:]}")
        return 1
    ref_weights, ref_hist = weights(ref_dir), _history(ref_dir)
    identical = after_finish = 0
    for k in range(n):
        run_dir = work / f"faulty-{k}"
        config = _config(work, run_dir)
        kind = KINDS[k % len(KINDS)]
        kill_at = random.randint(2, STEPS - 4)
        _train(config, nproc=nproc, fsdp=fsdp, kill=(kind, kill_at))
        landed = _landed(run_dir)
        after_finish += landed == "after the run finished"
        again = _train(config, nproc=nproc, fsdp=fsdp)  # the same command again: must exit 0
        if again.returncode:
            print(f"cycle {k + 1}: SIGKILL {kind} (from step {kill_at}), landed {landed}; the relaunch FAILED "
                  f"(exit {again.returncode}):\n{again.stderr[-2000:]}")
            continue
        finished_said = "holds a finished run with this config" in again.stdout
        same_w, same_hist = same_weights(weights(run_dir), ref_weights), _history(run_dir) == ref_hist
        relaunch_ok = finished_said == (landed == "after the run finished")
        identical += same_w and same_hist and relaunch_ok
        print(f"cycle {k + 1}: SIGKILL {kind} (from step {kill_at}), landed {landed}; relaunch "
              f"{'said finished' if finished_said else 'resumed'}{'' if relaunch_ok else ' (WRONG)'}; "
              f"weights {'identical' if same_w else 'DIFFER'}, loss/lr {'identical' if same_hist else 'DIFFER'}")
    print(f"{identical}/{n} resumed identical ({after_finish} of the kills landed after the run had finished)")
    return 0 if identical == n else 1


if __name__ == "__main__":
    sys.exit(main())
