"""`fault_injection.py --matrix`: each fault a rented pod meets, injected once into a real `multitune train`
(the CLI in a subprocess, on the tiny model), and judged by an oracle of what must happen for that kind.

Every kind runs in its own folder under WORKDIR/matrix/<kind>/ (the run directory, its config and the
stdout/stderr of every launch), and prints `FAULT <kind>: survived` or `FAULT <kind>: lost (why)`. The
runs that must end where the uninterrupted run does are compared with one uninterrupted reference run of
the same config (bitwise final adapter, every logged loss and learning rate).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fault_run import (
    REPO,
    TIMEOUT,
    Bench,
    Lost,
    Outcome,
    check,
    checkpoints,
    clean_error,
    command,
    digests,
    finished,
    finite,
    newest_complete,
    resumed,
    strict_json,
    trained_steps,
    whole,
)
from processes import kill_tree

# ---------------------------------------------------------------- the kinds


def nan(b: Bench) -> str:
    """A learning rate that diverges: one error naming the step and a lower learning rate, nothing of it kept."""
    config = b.config("nan", train={"learning_rate": 1e30, "save_steps": 1, "save_total_limit": 2})
    run = config.parent / "run"
    steps = []
    for log in ("train", "relaunch"):  # the same command again (a pod start script) stops the same way
        line = clean_error(b.launch(config, log), "step", "learning_rate")
        at, lower = re.search(r"\bstep (\d+)", line), re.search(r"learning_rate=([0-9.eE+-]+)", line)
        check(at and lower and float(lower.group(1)) < 1e30, f"the error names no step or no lower learning rate: {line}")
        step = int(at.group(1))
        check(not (run / "DONE").exists() and not (run / "final").exists(), "the diverged run was marked DONE or saved final/")
        check(not (run / "metrics.json").exists() or strict_json(run / "metrics.json"), "metrics.json is not strict JSON")
        kept = checkpoints(run / "checkpoints")
        check(all(s < step for s in kept), f"a checkpoint from step {step} on was kept: {sorted(kept)}")
        check(all(finite(run / "checkpoints" / f"checkpoint-{s}") for s in kept), "a kept checkpoint holds NaN or inf")
        # a checkpoint every step, 2 kept: NaN checkpoints saved from the divergence on would rotate the last good one away
        check(step == 1 or kept.get(step - 1), f"the last good checkpoint, checkpoint-{step - 1}, is gone: {sorted(kept)}")
        steps.append(step)
    return f"diverged at step {steps[0]}, again at {steps[1]} on relaunch; checkpoint-{steps[1] - 1} kept, finite"


def nan_checkpoint(b: Bench) -> str:
    """A checkpoint whose saved weights hold a NaN (its manifest recorded as the save that wrote them would have):
    the relaunch warns naming it, resumes from the one before, trains only the steps after that and ends as if
    never interrupted, as for a damaged checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from multitune.training.manifest import read_marker, write_marker

    config = b.config("nan-checkpoint")
    step = b.interrupt(config, "train", b.rng.randint(4, b.steps - 4))
    ckpts = config.parent / "run" / "checkpoints"
    folder = ckpts / f"checkpoint-{step}"
    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = min(tensors)
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    # as a save that wrote these weights would have recorded them (a version without the divergence guard)
    write_marker(folder, {k: v for k, v in read_marker(folder).items() if k != "files"})
    previous = max((s for s, ok in checkpoints(ckpts).items() if ok and s < step), default=None)
    o = b.launch(config, "relaunch")
    finished(o, "the relaunch")
    check(any(line.startswith("warning:") and str(folder) in line and "NaN" in line for line in o.lines),
          f"no warning names the NaN in {folder}")
    resumed(o, ckpts, previous, b.steps)
    b.identical(config.parent / "run")
    return f"checkpoint-{step} with a NaN: warned, resumed from checkpoint-{previous}, identical"


def _damaged(b: Bench, kind: str, damage: Callable[[Path], None], file: str) -> str:
    """The newest complete checkpoint damaged on disk: the relaunch warns, falls back to the previous complete
    one and ends as if never interrupted."""
    config = b.config(kind)
    step = b.interrupt(config, "train", b.rng.randint(4, b.steps - 4))
    ckpts = config.parent / "run" / "checkpoints"
    previous = max((s for s, ok in checkpoints(ckpts).items() if ok and s < step), default=None)
    damage(ckpts / f"checkpoint-{step}" / file)
    again = b.launch(config, "relaunch")
    finished(again, "the relaunch")
    check(any(line.startswith("warning:") and f"checkpoint-{step}" in line for line in again.lines),
          f"no warning names the damaged checkpoint-{step}")
    resumed(again, ckpts, previous, b.steps)
    b.identical(config.parent / "run")
    return f"{file} of checkpoint-{step} damaged; warned, resumed from checkpoint-{previous}, identical"


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: what a bad block leaves
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def damaged_optimizer(b: Bench) -> str:
    return _damaged(b, "damaged-optimizer", _flip_middle_byte, "optimizer.pt")


def truncated_rng(b: Bench) -> str:
    return _damaged(b, "truncated-rng", _truncate, "rng_state.pth")


def _blocks(*paths: Path) -> int:
    """Bytes these files take on a tmpfs (whole 4 KiB pages)."""
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in files)


DISK_FULL = """set -u
size=$1 run=$2 logs=$3 bigger=$4; shift 4
mount -t tmpfs -o size="$size" tmpfs "$run" || exit 90
mkdir -p "$logs/seen"
(  # a copy of each checkpoint as soon as it is marked complete, outside the tmpfs: its bytes before the failed save
  while [ ! -e "$logs/train.code" ]; do
    for c in "$run"/checkpoints/checkpoint-*; do
      seen="$logs/seen/${c##*/}"
      if [ -e "$c/COMPLETE" ] && [ ! -e "$seen" ] && [ ! -e "$seen.gone" ]; then
        cp -a "$c" "$seen.tmp" 2>/dev/null && mv "$seen.tmp" "$seen" || mv "$seen.tmp" "$seen.gone"
      fi
    done
    sleep 0.02
  done
) &
"$@" >"$logs/train.out" 2>"$logs/train.err"; echo $? >"$logs/train.code"
wait
mkdir -p "$logs/after-train" && cp -a "$run/." "$logs/after-train/"
mount -o remount,size="$bigger" "$run" || exit 91
"$@" >"$logs/relaunch.out" 2>"$logs/relaunch.err"; echo $? >"$logs/relaunch.code"
mkdir -p "$logs/after-relaunch" && cp -a "$run/." "$logs/after-relaunch/"
"""


def _in_namespace(config: Path, size: int) -> None:
    """DISK_FULL in a mount namespace of its own (`unshare`): the run directory a tmpfs of ``size`` bytes."""
    logs, run = config.parent, config.parent / "run"
    ns = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    proc = subprocess.Popen([*ns, "bash", "-c", DISK_FULL, "bash", str(size), str(run), str(logs), str(size + (64 << 20)),
                             *command(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=2 * TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # the namespace's shell, its snapshot loop and the training under it
        proc.communicate()
        raise Lost(f"hung: the launches on the full disk took over {2 * TIMEOUT} s (logs in {logs})") from None
    check(proc.returncode == 0, f"could not mount a size-limited tmpfs in a mount namespace (exit {proc.returncode}: "
          f"{err.strip()[-300:]}); this kind needs `unshare` (root, or unprivileged user namespaces)")


def disk_full(b: Bench) -> str:
    """The disk fills during a checkpoint save: one error line naming that checkpoint, nothing half-written marked
    complete, every checkpoint complete before it kept unchanged; the same command, once there is space, resumes
    from the newest of those and ends as if never interrupted.

    The run directory is a tmpfs of room for the run's files and two and a half checkpoints (sized from the
    reference run), in a mount namespace of its own (`unshare`), so the third save meets a real ENOSPC; then
    the tmpfs is grown (space freed) and the same command relaunched. Copies of the run directory after each
    launch, and of each checkpoint once complete (seen/), are kept in WORKDIR/matrix/disk-full/."""
    b.reference()
    ref = b.root / "reference" / "run"
    checkpoint = _blocks(ref / "checkpoints" / f"checkpoint-{b.steps}")
    size = _blocks(ref / "config.yaml", ref / "splits") + 64 * 1024 + checkpoint * 5 // 2
    config = b.config("disk-full")
    logs, run = config.parent, config.parent / "run"
    run.mkdir()
    _in_namespace(config, size)
    train, relaunch = (Outcome(int((logs / f"{n}.code").read_text()), (logs / f"{n}.out").read_text(),
                               (logs / f"{n}.err").read_text()) for n in ("train", "relaunch"))
    first = logs / "after-train"
    found = checkpoints(first / "checkpoints")
    cut = [s for s, ok in found.items() if not ok]
    check(cut, f"inconclusive: the disk did not fill during a checkpoint save ({size >> 10} KiB tmpfs; exit "
          f"{train.code}: {train.lines[-1:]})")
    clean_error(train, "No space left", str(run / "checkpoints" / f"checkpoint-{max(cut)}"))
    check(not (first / "DONE").exists(), "marked DONE on a full disk")
    broken = {s: whole(first / "checkpoints" / f"checkpoint-{s}") for s, ok in found.items() if ok}
    check(not any(broken.values()), f"a checkpoint marked complete holds a cut-off file: {broken}")
    seen = checkpoints(logs / "seen") if (logs / "seen").exists() else {}
    kept = sorted(s for s, ok in found.items() if ok)
    # the tmpfs holds two and a half checkpoints, so every one seen complete is there when the third save fails
    gone = [s for s in sorted(seen) if s not in kept]
    check(seen and not gone, f"checkpoint(s) {gone} complete before the failed save are gone (seen {sorted(seen)})")
    changed = [s for s in kept if s not in seen
               or digests(first / "checkpoints" / f"checkpoint-{s}") != digests(logs / "seen" / f"checkpoint-{s}")]
    check(not changed, f"complete checkpoint(s) {changed} changed after they were complete")
    finished(relaunch, "the relaunch with space")
    resumed(relaunch, run / "checkpoints", newest_complete(first / "checkpoints"), b.steps)
    b.identical(logs / "after-relaunch")
    return f"full during the save of checkpoint-{max(cut)} ({size >> 10} KiB tmpfs); {kept} kept unchanged; relaunch identical"


def _holds_lock(run: Path, pid: int) -> bool:
    try:
        return json.loads((run / ".multitune.lock").read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def concurrent(b: Bench) -> str:
    """A second launch into the run directory while the first trains, plain and with --no-resume: each refused
    with the holder's host and pid, nothing written; the first finishes as if alone."""
    config = b.config("concurrent")
    run = config.parent / "run"
    first = b.start(config, "first")
    ckpts = run / "checkpoints"
    check(first.wait_for(lambda: _holds_lock(run, first.proc.pid) and any(checkpoints(ckpts).values())),
          f"the first launch ended before training (see {first.log}.err)")
    watched = [run / "config.yaml", *sorted((run / "splits").glob("*"))]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched}
    seconds = [b.start(config, "second"), b.start(config, "second-no-resume", "--no-resume")]
    outcomes = [s.finish() for s in seconds]
    check(first.proc.poll() is None, "inconclusive: the first launch ended before the second ones were refused")
    for o in outcomes:
        clean_error(o, f"pid {first.proc.pid}", socket.gethostname())
    check({p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched} == before, "a refused launch rewrote the config or split")
    finished(first.finish(), "the first launch")
    b.identical(run)
    return f"both refused naming pid {first.proc.pid}; the first finished identical"


def sigterm_save(b: Bench) -> str:
    """SIGTERM while a checkpoint is being written: that save finishes, a checkpoint at the step the launch stopped
    at, exit 0; the relaunch resumes from it and ends as if never interrupted."""
    config = b.config("sigterm-save")
    ckpts = config.parent / "run" / "checkpoints"
    at = b.rng.randint(2, b.steps - 4)
    first = b.start(config, "train")
    saving: list[int] = []  # the save seen under way, recorded when seen (a read after the signal could miss it)

    def under_way() -> bool:
        saving.extend(s for s, ok in checkpoints(ckpts).items() if not ok and s >= at)
        return bool(saving)

    check(first.wait_for(under_way), f"the run ended before saving checkpoint {at} (see {first.log}.err)")
    os.kill(first.proc.pid, signal.SIGTERM)
    step = saving[0]
    o = first.finish()
    finished(o, "the signalled launch")
    found = checkpoints(ckpts)
    check(not (config.parent / "run" / "DONE").exists(), "a stopped launch marked the run DONE")
    check(found.get(step), f"the save of checkpoint-{step} under way at the signal was not finished")
    last = trained_steps(o)
    states = {s: json.loads((ckpts / f"checkpoint-{s}" / "trainer_state.json").read_text())["global_step"]
              for s, ok in found.items() if ok}
    check(last in states.values(), f"no complete checkpoint at step {last}, the last the launch trained: {states}")
    newest = newest_complete(ckpts)
    again = b.launch(config, "relaunch")
    finished(again, "the relaunch")
    resumed(again, ckpts, newest, b.steps)
    b.identical(config.parent / "run")
    return f"signalled during the save of checkpoint-{step}; stopped with checkpoint-{last}; relaunch resumed there, identical"


def sigterm_last(b: Bench) -> str:
    """SIGTERM right after the last training step (tests/distributed/late_signal.py sends it from the process's
    own on_train_end): the final save finishes, the launch stops before evaluating, exit 0, no DONE; the
    relaunch evaluates that saved model and finishes, as if never interrupted."""
    config = b.config("sigterm-after-last-step")
    run = config.parent / "run"
    shim = [str(REPO / "tests" / "distributed" / "late_signal.py")]
    o = b.launch(config, "train", env={"MULTITUNE_TEST_LATE_SIGNAL": "0"}, entry=shim)
    finished(o, "the signalled launch")
    check(any(line.startswith("received SIGTERM") for line in o.lines), "the signal was not received")
    check((run / "final" / "adapter_model.safetensors").exists(), "the final adapter was not saved")
    check(not (run / "DONE").exists(), "marked DONE although stopped before evaluating")
    again = b.launch(config, "relaunch")
    finished(again, "the relaunch")
    check(trained_steps(again) == 0, f"the relaunch trained {trained_steps(again)} step(s) again after the last one")
    b.identical(run)
    return "final adapter saved, stopped before evaluating; relaunch finished identical"


def _hub_steps(on_hub: Path) -> list[int]:
    """The steps of the Hub folder's checkpoints whose COMPLETE marker is there whole (a commit adds it last)."""
    steps = []
    for step, marked in checkpoints(on_hub).items():
        try:
            steps += [step] if marked and json.loads((on_hub / f"checkpoint-{step}" / "COMPLETE").read_text()) else []
        except (OSError, ValueError):  # the fake Hub copies a commit's files one by one: a kill can cut the last short
            pass
    return sorted(steps)


def hub_newer(b: Bench) -> str:
    """train.hub_checkpoints, a pod whose volume holds an older checkpoint than the Hub (a lost pod got further),
    the Hub's newer ones unloadable: the relaunch warns for each, falls back to the volume's and trains; its first
    upload deletes no Hub checkpoint newer than itself (a resume never deletes the Hub's newer steps); relaunched,
    the run ends as if never interrupted. The Hub is tests/fake_hub.py's (a folder), in the training process."""
    hub = b.root / "hub-newer" / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    config = b.config("hub-newer", train={"hub_checkpoints": True}, hub={"repo_id": "me/tuned"})
    run = config.parent / "run"
    on_hub = hub / "me" / "tuned-checkpoints" / run.name / "checkpoints"
    kw = {"env": {"HF_TOKEN": "hf_fake"}, "entry": [str(REPO / "tests" / "fake_hub.py"), str(hub)]}
    first = b.start(config, "pod-1", **kw)
    check(first.wait_for(lambda: any(checkpoints(run / "checkpoints").values())), f"pod 1 ended early (see {first.log}.err)")
    first.finish(kill=True)
    volume = config.parent / "volume"
    shutil.copytree(run, volume, symlinks=True)  # what this pod's volume keeps
    local = max(s for s, ok in checkpoints(volume / "checkpoints").items() if ok)
    later = b.rng.randint(local + 4, b.steps - 2)  # past the step of pod 3's first upload
    second = b.start(config, "pod-2", **kw)  # a pod that got further before it too was lost
    check(second.wait_for(lambda: any(s >= later for s in _hub_steps(on_hub))),
          f"pod 2 ended before uploading checkpoint {later} (see {second.log}.err)")
    second.finish(kill=True)
    shutil.rmtree(run)
    volume.rename(run)  # pod 3 comes back with pod 1's volume
    damaged = [s for s in _hub_steps(on_hub) if s > local]
    check(damaged, f"the setup failed: the Hub holds nothing newer than the volume's checkpoint-{local}")
    for s in damaged:  # a bad block on the Hub's side: what its save recorded no longer matches
        _flip_middle_byte(on_hub / f"checkpoint-{s}" / "optimizer.pt")
    third = b.start(config, "pod-3", **kw)
    uploaded = lambda: re.search(r"^uploaded checkpoint-(\d+) ", Path(f"{third.log}.out").read_text(), re.MULTILINE)
    check(third.wait_for(lambda: bool(uploaded())), f"pod 3 ended before uploading a checkpoint (see {third.log}.err)")
    o = third.finish(kill=True)
    first_upload = int(uploaded().group(1))
    for s in damaged:
        check(any(line.startswith("warning:") and f"checkpoint-{s} " in line and "damaged" in line for line in o.lines),
              f"pod 3 gave no warning for the Hub's damaged checkpoint-{s}")
    check(f"resuming from {run / 'checkpoints' / f'checkpoint-{local}'}" in o.out,
          f"pod 3 did not fall back to the volume's checkpoint-{local}")
    newer = [s for s in damaged if s > first_upload]
    check(newer, f"inconclusive: pod 3's first upload, checkpoint-{first_upload}, is not older than the Hub's {damaged}")
    gone = [s for s in newer if not (on_hub / f"checkpoint-{s}").is_dir()]
    check(not gone, f"uploading checkpoint-{first_upload} deleted the Hub's newer checkpoint(s) {gone}")
    last = newest_complete(run / "checkpoints")
    pod4 = b.launch(config, "pod-4", **kw)
    finished(pod4, "pod 4's launch")
    resumed(pod4, run / "checkpoints", last, b.steps)
    b.identical(run)
    left = _hub_steps(on_hub)
    check(left == [b.steps - 2, b.steps], f"the Hub ends holding {left}, not the run's newest two")
    return (f"volume at checkpoint-{local}, Hub's {damaged} damaged: warned, fell back; uploading "
            f"checkpoint-{first_upload} kept {newer}; relaunch identical; Hub holds {left}")


KINDS: dict[str, Callable[[Bench], str]] = {
    "nan": nan, "nan-checkpoint": nan_checkpoint, "disk-full": disk_full, "damaged-optimizer": damaged_optimizer,
    "truncated-rng": truncated_rng, "concurrent": concurrent, "sigterm-save": sigterm_save,
    "sigterm-after-last-step": sigterm_last, "hub-newer": hub_newer,
}


def run(bench: Bench, kinds: list[str], table: dict[str, Callable[[Bench], str]] = KINDS) -> int:
    """Each kind once: one `FAULT <kind>: survived|lost (...)` line each, then the count; 0 when all survived."""
    survived = 0
    started = time.monotonic()
    for kind in kinds:
        t = time.monotonic()
        bench.begin(kind)
        try:
            detail, ok = table[kind](bench), True
        except Lost as e:
            detail, ok = str(e), False
        except Exception as e:  # noqa: BLE001 - the harness itself failed: the kind is not shown survived
            detail, ok = f"the harness failed: {type(e).__name__}: {e}", False
        finally:
            bench.end()
        survived += ok
        where = "" if ok else f"; logs in {bench.root / kind}"
        print(f"FAULT {kind}: {'survived' if ok else 'lost'} ({detail}{where}; {time.monotonic() - t:.0f} s)", flush=True)
    print(f"{survived}/{len(kinds)} faults survived ({time.monotonic() - started:.0f} s)", flush=True)
    return 0 if survived == len(kinds) else 1
