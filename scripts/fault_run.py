"""What both modes of fault_injection.py share: the run they fault, how it is launched, and how its result is read.

The run: the offline demo's data and tiny model (or any config dict of the same shape), a LoRA adapter with
dropout on (so that the RNG state has to be restored too), a checkpoint every 2 steps, a log line every step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from processes import kill_tree
from safetensors.torch import load_file

STEPS = 24
REPO = Path(__file__).resolve().parents[1]


def recipe(raw: dict, run_dir: Path, steps: int = STEPS) -> dict:
    """``raw`` (the offline demo's config, or one of the same tasks) as the run the faults are injected into."""
    raw = {**raw, "run_dir": str(run_dir), "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1}}
    raw["tasks"] = [{**t, "max_rows": 200} for t in raw["tasks"][:3]]
    raw["train"] = {**raw["train"], "max_steps": steps, "save_steps": 2, "logging_steps": 1, "eval_rows_during_training": 0,
                    "eval_steps": 10_000, "learning_rate": 2e-3}
    return raw


def write_config(raw: dict) -> Path:
    """The config file beside its run directory (RUN_DIR.yaml)."""
    run_dir = Path(raw["run_dir"])
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def command(config: Path, nproc: int = 1, fsdp: bool = False, entry: list[str] | None = None) -> list[str]:
    """The training command; ``entry`` (1 process only) runs the CLI through a shim instead of ``-m multitune.cli``."""
    if fsdp:
        on_cpu = [] if _cuda() else [str(REPO / "tests" / "distributed" / "fsdp_on_cpu.py")]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp2-1x4.yaml"),
                "--num_processes", str(nproc), "--main_process_port", str(free_port()),
                *(on_cpu or ["-m", "multitune.cli"]), "train", str(config)]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return [*(launcher if nproc > 1 else [sys.executable]), *(entry or ["-m", "multitune.cli"]), "train", str(config)]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoints(ckpts: Path) -> dict[int, bool]:
    """Each checkpoint folder's step, and whether it is marked complete."""
    found = {}
    for p in ckpts.glob("checkpoint-*") if ckpts.exists() else []:
        if p.name.split("-")[1].isdigit():
            found[int(p.name.split("-")[1])] = (p / "COMPLETE").exists()
    return found


def history(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Loss and learning rate at every logged step, from the run's trainer_state.json."""
    logs = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: (e["loss"], e["learning_rate"]) for e in logs if "loss" in e}


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    """Bitwise: a resumed run must end exactly where the uninterrupted one does."""
    return a.keys() == b.keys() and all((a[n] == b[n]).all() for n in a)


# ---------------------------------------------------------------- --matrix: launches, the reference, the oracles' reading

MATRIX_STEPS = 12  # --matrix: enough for two checkpoints before and after any fault, at half the kill cycles' cost
TIMEOUT = 3600  # a launch that takes longer has hung


class Lost(Exception):
    """The fault lost work or ended otherwise than its oracle says (the message says how)."""


def check(ok: object, why: str) -> None:
    if not ok:
        raise Lost(why)


@dataclass
class Outcome:
    code: int | None  # None: killed, or hung
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in (self.out + self.err).replace("\r", "\n").splitlines() if line.strip()]


class Launched:
    """One `multitune train` process, its stdout and stderr in LOG.out and LOG.err."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_for(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        """Poll ``condition`` every 10 ms while the process runs: True once it holds, False if the process ended first;
        after ``timeout`` seconds the process is killed whole and the kind lost (hung)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if condition():
                return True
            if time.monotonic() > deadline:
                kill_tree(self.proc.pid)
                self.proc.wait()
                raise Lost(f"hung: {self.log.name} reached no awaited point in {timeout:.0f} s (see {self.log}.err)")
            time.sleep(0.01)
        return False

    def finish(self, kill: bool = False) -> Outcome:
        if kill:
            kill_tree(self.proc.pid)  # SIGKILL to the process and its children: a lost machine
        try:
            code = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait()
            code = None
        return Outcome(None if kill else code, Path(f"{self.log}.out").read_text(), Path(f"{self.log}.err").read_text())


class Bench:
    """Where the kinds run: WORKDIR/matrix, the base config dict (the offline demo's), and the reference run."""

    def __init__(self, work: Path, base: dict, *, seed: int = 0, steps: int = MATRIX_STEPS):
        self.root, self.base, self.steps, self.seed = work / "matrix", base, steps, seed
        self.rng = random.Random(seed)
        self._reference: tuple[dict, dict] | str | None = None
        self._launched: list[Launched] = []

    def begin(self, kind: str) -> None:
        """Before ``kind``: its folder afresh (what an earlier matrix left there goes), its own random draws (so
        that `--only KIND --seed S` repeats KIND's injection of the whole matrix's)."""
        shutil.rmtree(self.root / kind, ignore_errors=True)
        self.rng = random.Random(f"{self.seed}:{kind}")

    def end(self) -> None:
        """After a kind, however it ended: kill whatever it launched that still runs (a lost kind leaves no launch
        running into the next)."""
        for launched in self._launched:
            if launched.proc.poll() is None:
                kill_tree(launched.proc.pid)
                launched.proc.wait()
        self._launched.clear()

    def config(self, kind: str, **sections: dict) -> Path:
        """The recipe's config for ``kind`` (run directory WORKDIR/matrix/<kind>/run), ``sections`` merged in."""
        raw = recipe(self.base, self.root / kind / "run", self.steps)
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        return write_config(raw)

    def start(self, config: Path, log: str, *extra: str, env: dict | None = None, entry: list[str] | None = None) -> Launched:
        return self.start_command([*command(config, entry=entry), *extra], config.parent / log, env)

    def start_command(self, cmd: list[str], log: Path, env: dict | None = None) -> Launched:
        """``cmd`` launched and recorded, to be killed by :meth:`end` if the kind leaves it running."""
        launched = Launched(cmd, log, env)
        self._launched.append(launched)
        return launched

    def launch(self, config: Path, log: str, *extra: str, **kwargs) -> Outcome:
        return self.start(config, log, *extra, **kwargs).finish()

    def interrupt(self, config: Path, log: str, at: int) -> int:
        """Train and kill -9 as soon as a complete checkpoint at step ``at`` or later is there; its newest complete step."""
        ckpts = config.parent / "run" / "checkpoints"
        run = self.start(config, log)
        fired = run.wait_for(lambda: any(ok and s >= at for s, ok in checkpoints(ckpts).items()))
        run.finish(kill=fired)
        check(fired, f"the run ended before checkpoint {at} (see {run.log}.err)")
        return max(s for s, ok in checkpoints(ckpts).items() if ok)

    def reference(self) -> tuple[dict, dict]:
        """The uninterrupted run's final adapter and loss/learning-rate history (trained once, when first asked)."""
        if self._reference is None:
            shutil.rmtree(self.root / "reference", ignore_errors=True)  # this matrix's own, trained by this code
            config = self.config("reference")
            done = self.launch(config, "train")
            self._reference = (weights(config.parent / "run"), history(config.parent / "run")) if done.code == 0 else \
                f"the uninterrupted reference run failed (exit {done.code}; see {config.parent}/train.err)"
        check(not isinstance(self._reference, str), self._reference)
        return self._reference

    def identical(self, run_dir: Path) -> None:
        """The run finished, and ended bitwise where the uninterrupted one does."""
        ref_weights, ref_history = self.reference()
        check((run_dir / "DONE").exists(), "the relaunch did not finish the run (no DONE)")
        check(same_weights(weights(run_dir), ref_weights), "the final adapter differs from the uninterrupted run's")
        check(history(run_dir) == ref_history, "the logged loss or learning rate differs from the uninterrupted run's")


# ---------------------------------------------------------------- what the oracles read


def clean_error(o: Outcome, *fragments: str) -> str:
    """The launch ended with exit status 2 and one `error:` line (the last line of stderr, no traceback) that
    holds every fragment; that line."""
    lines = [line for line in o.err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    check(o.code == 2, f"exit status {o.code}, not 2: {lines[-1:]}")
    check("Traceback" not in o.err, "a traceback")
    check(len(errors) == 1 and lines[-1] == errors[0], f"{len(errors)} error line(s), the last line being {lines[-1:]}")
    missing = [f for f in fragments if f not in errors[0]]
    check(not missing, f"the error line lacks {missing}: {errors[0]}")
    return errors[0]


def finished(o: Outcome, what: str) -> None:
    check(o.code == 0, f"{what} failed (exit {o.code}): {o.lines[-3:]}")


def trained_steps(o: Outcome) -> int:
    """Training steps a launch ran: one `{'loss': ...}` line on its stdout each (the recipe logs every step)."""
    return sum(line.startswith("{'loss':") for line in o.out.splitlines())


def resumed(o: Outcome, ckpts: Path, step: int | None, steps: int) -> None:
    """The launch resumed from ``ckpts/checkpoint-<step>`` (None: started afresh) and trained only the steps after
    it: training is deterministic, so a relaunch that trained again from step 0 would end identical too."""
    if step is None:
        check("resuming from" not in o.out, "the relaunch resumed, though no checkpoint was complete")
    else:
        check(f"resuming from {ckpts / f'checkpoint-{step}'}" in o.out, f"the relaunch did not resume from checkpoint-{step}")
    n, due = trained_steps(o), steps - (step or 0)
    check(n == due, f"the relaunch trained {n} step(s), not the {due} after {f'checkpoint-{step}' if step else 'step 0'}")


def newest_complete(ckpts: Path) -> int | None:
    """The newest step marked complete (read without multitune)."""
    return max((s for s, ok in checkpoints(ckpts).items() if ok), default=None)


def finite(folder: Path) -> bool:
    import torch

    files = list(folder.glob("*.safetensors"))
    return bool(files) and all(torch.isfinite(t).all() for f in files for t in load_file(str(f)).values())


def whole(folder: Path) -> str | None:
    """What in ``folder`` is cut short (None: every torch file passes its zip CRC checks, every safetensors file
    loads, the trainer state parses): read without multitune, so that it judges multitune's COMPLETE marker."""
    for f in sorted(folder.iterdir()):
        try:
            if f.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(f) as z:
                    check(z.testzip() is None, "")
            elif f.suffix == ".safetensors":
                load_file(str(f))
            elif f.name == "trainer_state.json":
                json.loads(f.read_text())
        except Exception:  # noqa: BLE001 - whatever a cut-off file raises
            return f.name
    return None


def digests(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_json(path: Path) -> bool:
    def refuse(name):
        raise ValueError(name)

    try:
        json.loads(path.read_text(), parse_constant=refuse)
    except ValueError:
        return False
    return True
