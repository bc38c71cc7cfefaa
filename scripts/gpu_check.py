"""`make gpu-check`: the prepared check for a bare GPU machine, in two runs of about 5.5 minutes each.

    python3 scripts/gpu_check.py --run 1 --bundle .gpu-bundle/run1   # a (8B: TRL defaults, TRL expert, multitune), b (QLoRA)
    python3 scripts/gpu_check.py --run 2 --bundle .gpu-bundle/run2   # c (Liger, packed vs grouped), d (CLI on CUDA), e (FSDP2)
    python3 scripts/gpu_check.py --tiny --out DIR                    # every section at a tiny shape on a CPU (the test)

`make gpu-bundle` (scripts/gpu_bundle.py) prepares the bundles on the CPU machine: wheels for the GPU
machine's platform and the assets (generated data, a tiny model). Here the bundle's wheels are
installed with `pip --no-index --no-deps` into a private folder, then each section runs under its own
timeout and writes `section-X.json` under the output folder ($OUT when set) as it goes, and every
child's output streams to `logs/` there as it runs: a late failure, a timeout, or the whole call killed
at the lease's limit loses nothing that was printed. The 8B benchmark's rows go to `gpu-X.json` there as each
side ends. A short table is printed last. Back on the CPU machine the calls' output folders become one record:

    python3 scripts/gpu_record.py RUN1_OUT RUN2_OUT   # -> benchmarks/results/<date>-<gpu>-gpu-check.json

a. the 8B-shaped benchmark (benchmarks/gpu.py): TRL defaults vs TRL expert vs multitune (LoRA bf16): tokens/s,
   MFU, peak memory beside the memory model's prediction (`plan_gib`) at each side's recorded shape;
b. QLoRA 4-bit on the same 8B model (built once by a, loaded here): memory against LoRA's (goal: at most 0.6x);
c. Liger on/off, packed vs length-grouped padded rows, on a 2-layer model of the 8B width;
d. `multitune train` on CUDA with the tiny model: checkpoints, SIGTERM, resume, `eval` in both modes, `predict`;
e. `accelerate launch` with the FSDP2 config and 1 process on NCCL: launch.json says FSDP, the adapter is
   complete, resume works.

torch.compile is not measured here: on the H100 (2026-11-27) its warm-up alone ran past its section's time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from processes import kill_tree  # this folder is sys.path[0] when the script runs

REPO = Path(__file__).resolve().parents[1]
RUNS = {1: ("a", "b"), 2: ("c", "d", "e")}  # b loads the 8B model a built: the same call
# Seconds, sized from the H100 run of 2026-11-27, where a's TRL-defaults side took 52 s of wall time (process start,
# the 16 GB load, 12 steps, the validation loss) and the 8B build ~30 s; the other two 8B sides died within seconds,
# so a's old 200 s was not measured with all three training. Now, by those figures:
#   a = build 30 + the parent's setup 15 (matmul rate, data) + multitune 55 (its validation loss on the trained model:
#       no second 16 GB load, which cost ~15-20 s) + TRL expert 50 + TRL defaults 55 = ~205 s -> 215 (TRL defaults,
#       last, is the one cut if it runs long: the issue asks multitune against the TRL expert first);
#   b = QLoRA 65 (start, the 8B load quantised to 4 bits, 12 slower steps, scoring) + auto-fit's `multitune train`
#       45 (the 8B load again, the probe, 2 steps, 8 rows a task scored) = ~110 s -> 115;
#   c, d, e unchanged at 130, 110, 75: c's first two 2-layer sides took 68 s after a 10 s build (four may not fit: its
#       last side, Liger, is the one cut), d's resume and 40-row likelihood eval 37 + 27 s, e 68 s.
# Calls: run 1 = a + b = 330 s, run 2 = c + d + e = 315 s, each well under a command's 600 s; 645 s and ~10 s of
# installs make ~11 minutes, leaving ~4 minutes of the 15-minute lease for the machine's start (1-2) and the transfers.
TIMEOUTS = {"a": 215, "b": 115, "c": 130, "d": 110, "e": 75}
# 2 micro-batches per step on every side: 3 examples each, or 2 packed rows of 256 (rounded to an even count)
GPU_ARGS = ["--eval-rows", "8"]  # a side's validation loss and multitune's end-of-run evaluation: time, not a figure
TINY_GPU_ARGS = ["--shape", "tiny", "--seq-len", "256", "--steps", "3", "--warmup", "1", "--examples", "6", "--eval-rows", "8",
                 "--grad-accum", "2"]


class Section:
    """One section's record, rewritten to section-X.json after every step; subprocesses share its deadline."""

    def __init__(self, name: str, out: Path, timeout: float, env: dict):
        self.name, self.path, self.env = name, out / f"section-{name}.json", env
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + timeout
        self.record: dict = {"section": name, "ok": None, "timed_out": False, "steps": []}
        self.t0 = time.monotonic()
        self.save()

    def save(self) -> None:
        self.record["seconds"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # whole: a kill mid-write leaves the last one
        tmp.write_text(json.dumps(self.record, indent=2))
        os.replace(tmp, self.path)

    def note(self, **facts) -> None:
        self.record.update(facts)
        self.save()

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def log(self, what: str) -> Path:
        """The file a child's output streams to, under the output folder: it comes back even if the call is killed."""
        n = len(self.record["steps"])
        return self.logs / f"{self.name}-{n}-{''.join(c if c.isalnum() else '-' for c in what).strip('-')}.log"

    def run(self, what: str, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        t0, log = time.monotonic(), self.log(what)
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=self.left())
            except (subprocess.TimeoutExpired, TimeoutError):
                kill_tree(proc.pid)  # its children too (a benchmark side, torchrun's ranks): the next section needs the GPU
                proc.wait()
                self.record["steps"].append({"step": what, "timed_out": True, "log": log.name, "tail": _tail(log.read_text())})
                raise TimeoutError from None
        out = log.read_text()
        proc.stdout, proc.stderr = out, ""  # read like subprocess.run's result (stderr joined to stdout)
        step = {"step": what, "rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1), "log": log.name}
        if proc.returncode != 0:
            step["tail"] = _tail(out)
        self.record["steps"].append(step)
        self.save()
        if check and proc.returncode != 0:
            raise RuntimeError(f"{what} exited {proc.returncode}")
        return proc

    def start(self, what: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        """A child left running (the caller waits), its output streamed to its log."""
        log = self.log(what)
        with log.open("w") as f:
            return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), log


def _tail(*texts, n: int = 1500) -> str:
    joined = "\n".join(t.decode() if isinstance(t, bytes) else (t or "") for t in texts)
    return joined[-n:]


# ---------------------------------------------------------------- sections


def _gpu_bench(s: Section, work: Path, bench_cfg: Path, extra: list[str]) -> dict:
    # the benchmark rewrites its rows after every side, here in the output folder: if the whole call is killed at the
    # lease's limit (no `finally` runs), the sides that finished are in gpu-X.json (scripts/gpu_record.py merges them)
    rows = s.path.parent / f"gpu-{s.name}.json"
    s.note(rows_file=rows.name)
    try:
        s.run("benchmarks.gpu", [sys.executable, "-m", "benchmarks.gpu", "--config", str(bench_cfg), "--workdir", str(work / s.name),
                                 "--models", str(work / "models"), "--logs", str(s.logs / f"{s.name}-sides"),
                                 "--json", str(rows), *extra], check=False)
    finally:  # rows written so far survive a timeout
        if rows.exists():
            s.note(results=json.loads(rows.read_text()))
    results = s.record.get("results") or {"rows": []}
    return {r["side"]: r for r in results["rows"] if "error" not in r}


def section_a(s: Section, ctx: dict) -> bool:
    # multitune, then the honest ratio's baseline: if the section runs out of time, trl-defaults (the slowest) is lost
    sides = _gpu_bench(s, ctx["work"], ctx["bench_cfg"], [*ctx["gpu_args"], "--sides", "multitune", "trl-expert", "trl-defaults"])
    ours = sides.get("multitune")
    if ours:
        s.note(summary={"vs_trl_expert": ours.get("vs_trl-expert"), "vs_trl_defaults": ours.get("vs_trl-defaults"),
                        "mfu_measured": ours.get("mfu_measured"), "mfu_datasheet": ours.get("mfu_datasheet"),
                        "memory_vs_trl_defaults": _ratio(ours, sides.get("trl-defaults"), "peak_allocated_gib"),
                        "memory_vs_plan": {k: _ratio(r, {"x": r.get("plan_gib")}, "peak_allocated_gib", "x") for k, r in sides.items()}})
    return len(sides) == 3


def section_b(s: Section, ctx: dict) -> bool:
    """QLoRA on a's 8B model (same call, same models folder: loaded, not rebuilt), against a's LoRA peak; then
    auto-fit's choice and its probe on that model and this card."""
    sides = _gpu_bench(s, ctx["work"], ctx["bench_cfg"], [*ctx["gpu_args"], "--sides", "qlora"])
    fitted = _auto_fit(s, ctx)
    a = ctx["out"] / "gpu-a.json"  # a's rows, as its benchmark wrote them
    lora = next((r for r in json.loads(a.read_text())["rows"] if r["side"] == "multitune" and "error" not in r), None) \
        if a.exists() else None
    if "qlora" in sides:
        ratio = _ratio(sides["qlora"], lora, "peak_allocated_gib")
        s.note(summary={"qlora_memory_vs_lora": ratio, "goal": 0.6, "met": ratio is not None and ratio <= 0.6,
                        "memory_vs_plan": _ratio(sides["qlora"], {"x": sides["qlora"].get("plan_gib")}, "peak_allocated_gib", "x")})
    return "qlora" in sides and fitted


def _auto_fit(s: Section, ctx: dict) -> bool:
    """`multitune train` with train.batch_size=auto on the benchmark's model (LoRA): the choice, the probe's verdict
    and what trained (launch.json), two steps."""
    run_dir = ctx["work"] / "autofit"
    overrides = ["train.batch_size=auto", "train.global_batch_size=16", "train.grad_accum=1", "train.max_steps=2",
                 "train.packing=false", "peft.method=lora", f"run_dir={run_dir}"]
    proc = s.run("train batch_size=auto", [sys.executable, "-m", "multitune.cli", "train", str(ctx["work"] / "b" / "gpu.yaml"),
                                          *overrides, "--overwrite"], check=False)
    said = [line for line in proc.stdout.splitlines() if "batch_size=auto" in line or "auto-fit probe" in line]
    launch = json.loads((run_dir / "launch.json").read_text()) if (run_dir / "launch.json").exists() else {}
    s.note(auto_fit={"rc": proc.returncode, "said": said, "trained": {k: v for k, v in launch.items() if "batch" in k
                                                                      or "checkpointing" in k or "accum" in k or "peak" in k}})
    return proc.returncode == 0 and bool(said)


def section_c(s: Section, ctx: dict) -> bool:
    # packed rows against length-grouped padded ones first (the two ways the 8B configs can batch), then Liger (its
    # default was flipped on one short measurement), then packed rows on FlexAttention (no T x T mask; compiled in its
# first steps, last so that its warm-up costs nothing else); no torch.compile of the model: its warm-up ran past the
# section's time on the H100
    sides = ["multitune+grouped", "multitune+flex", "multitune", "multitune+liger"]
    if ctx["tiny"]:  # the code path only: no Liger on a CPU, no FlexAttention backward on a CPU
        sides = ["multitune+grouped", "multitune"]
    layers = [] if ctx["tiny"] else ["--layers", "2"]
    got = _gpu_bench(s, ctx["work"], ctx["bench_cfg"], [*ctx["gpu_args"], *layers, "--sides", *sides])
    base = got.get("multitune")
    if base:
        others = [k for k in sides if k != "multitune" and k in got]  # against packed rows on SDPA
        s.note(summary={f"{k} tokens/s": got[k]["tokens_per_s"] / base["tokens_per_s"] for k in others}
               | {f"{k} memory": _ratio(got[k], base, "peak_allocated_gib") for k in others})
    return len(got) == len(sides)


def _train_config(ctx: dict, name: str, **peft) -> Path:
    from multitune.commands.demo import offline_config

    raw = offline_config(ctx["assets"])
    raw["run_dir"] = str(ctx["work"] / name)
    raw["model"]["name_or_path"] = str(ctx["assets"] / "tiny-model")
    raw["tasks"] = [{**t, "max_rows": 240, "max_eval_rows": 8 if ctx["tiny"] else 40} for t in raw["tasks"]]
    raw["train"].update(max_steps=40 if not ctx["tiny"] else 8, save_steps=4, save_minutes=None, logging_steps=2,
                        eval_rows_during_training=0, eval_steps=100_000)
    if peft:
        raw["peft"] = peft
    path = ctx["work"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _stop_then_resume(s: Section, launch: list[str], run_dir: Path) -> dict:
    """Start training, SIGTERM it once a complete checkpoint exists, then run the same command: it must resume."""
    proc, log = s.start("train (stopped)", launch)
    ckpts = run_dir / "checkpoints"
    try:
        while proc.poll() is None and not any(ckpts.glob("checkpoint-*/COMPLETE")):
            s.left()
            time.sleep(0.2)
        stopped_early = proc.poll() is None
        if stopped_early:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher forwards it to its ranks
        proc.wait(timeout=s.left())
    except (subprocess.TimeoutExpired, TimeoutError):
        kill_tree(proc.pid)
        s.record["steps"].append({"step": "train (stopped)", "timed_out": True, "log": log.name, "tail": _tail(log.read_text())})
        raise TimeoutError from None
    out = log.read_text()
    s.record["steps"].append({"step": "train (stopped)", "rc": proc.returncode, "log": log.name})
    first = {"rc": proc.returncode, "sigterm_sent": stopped_early, "said_stopped": "stopped at step" in out}
    second = s.run("train (resume)", launch)
    facts = {"first": first, "resumed": "resuming from" in second.stdout, "done": (run_dir / "DONE").exists()}
    s.note(stop_resume=facts)
    return facts


def section_d(s: Section, ctx: dict) -> bool:
    cfg = _train_config(ctx, "cli")
    run_dir = ctx["work"] / "cli"
    cli = [sys.executable, "-m", "multitune.cli"]
    facts = _stop_then_resume(s, [*cli, "train", str(cfg)], run_dir)
    launch = json.loads((run_dir / "launch.json").read_text()) if (run_dir / "launch.json").exists() else {}
    s.note(launch=launch)
    for mode, rows in (("likelihood", 40), ("generate", 8)):  # generation is slow per row: 40 ran past the time (H100)
        s.run(f"eval --mode {mode}", [*cli, "eval", str(run_dir), "--mode", mode, "--max-rows", "8" if ctx["tiny"] else str(rows)])
    pred = s.run("predict", [*cli, "predict", str(run_dir), "--task", "banking77", "I lost my card, please block it"])
    s.note(prediction=pred.stdout.strip().splitlines()[-1] if pred.stdout.strip() else None)
    on_gpu = launch.get("device", "").startswith("cuda") or ctx["tiny"]
    return facts["resumed"] and facts["done"] and facts["first"]["sigterm_sent"] and on_gpu


def section_e(s: Section, ctx: dict) -> bool:
    cfg = _train_config(ctx, "fsdp", method="lora", r=8, alpha=16, dropout=0.0)
    run_dir = ctx["work"] / "fsdp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/fsdp2-1x4.yaml"),
              "--num_processes", "1", "--main_process_port", str(_free_port()), "-m", "multitune.cli", "train", str(cfg)]
    if ctx["tiny"]:  # no GPU: accelerate's CPU path, without mixed precision
        launch[launch.index("--num_processes"):launch.index("--num_processes")] = ["--cpu", "--mixed_precision", "no"]
    facts = _stop_then_resume(s, launch, run_dir)
    info = json.loads((run_dir / "launch.json").read_text()) if (run_dir / "launch.json").exists() else {}
    from safetensors import safe_open

    adapter = run_dir / "final" / "adapter_model.safetensors"
    tensors = len(list(safe_open(str(adapter), framework="pt").keys())) if adapter.exists() else 0
    s.note(launch=info, adapter_tensors=tensors)
    fsdp = info.get("distributed_type") == "FSDP" and info.get("is_fsdp")
    return facts["resumed"] and facts["done"] and tensors > 0 and (fsdp or ctx["tiny"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ratio(a: dict | None, b: dict | None, key: str, key_b: str | None = None) -> float | None:
    key_b = key_b or key
    if not a or not b or a.get(key) is None or not b.get(key_b):
        return None
    return a[key] / b[key_b]


SECTIONS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e}


# ---------------------------------------------------------------- setup and report


def install(bundle: Path | None, site: Path, out: Path) -> dict:
    """pip install the bundle's wheels (no index, no dependency resolution) into `site`."""
    wheels = sorted((bundle / "wheels").glob("*.whl")) if bundle else []
    if not wheels:
        return {"installed": [], "note": "no bundle wheels: the environment's packages are used"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                           "--upgrade", "--target", str(site), *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode != 0:
        (out / "install-error.txt").write_text(proc.stdout + proc.stderr)
        raise SystemExit(f"installing the bundle failed: see {out / 'install-error.txt'}")
    return {"installed": [w.name for w in wheels], "seconds": round(time.monotonic() - t0, 1)}


def section_env(site: Path, work: Path) -> dict:
    """The sections' environment: the bundle's packages first, so they shadow the machine's older copies."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "MULTITUNE_CACHE": str(work / "cache")}


def environment(env: dict) -> dict:
    code = ("import json, torch; from importlib import metadata as m\n"
            "v = {p: m.version(p) for p in ('torch', 'transformers', 'trl', 'peft', 'accelerate', 'datasets', 'liger-kernel', 'bitsandbytes')"
            " if __import__('importlib').util.find_spec(p.replace('-', '_')) is not None}\n"
            "print(json.dumps({'versions': v, 'cuda': torch.cuda.is_available(),"
            " 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',"
            " 'memory_mib': torch.cuda.get_device_properties(0).total_memory // 2**20 if torch.cuda.is_available() else None}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-1000:]}


def table(out: Path, names: tuple[str, ...]) -> str:
    lines = [f"{'section':8s} {'ok':>5s} {'s':>6s}  summary"]
    for n in names:
        p = out / f"section-{n}.json"
        r = json.loads(p.read_text()) if p.exists() else {"ok": None, "seconds": 0}
        ok = "TIME" if r.get("timed_out") else {True: "yes", False: "NO", None: "-"}[r.get("ok")]
        summary = json.dumps(r.get("summary") or r.get("stop_resume") or r.get("error") or "", default=str)[:100]
        lines.append(f"{n:8s} {ok:>5s} {r.get('seconds', 0):6.0f}  {summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=int, choices=list(RUNS), help="which of the two planned runs")
    ap.add_argument("--sections", nargs="*", choices=list(SECTIONS), help="instead of --run")
    ap.add_argument("--bundle", type=Path, default=None, help="a folder made by `make gpu-bundle` (wheels/, assets/)")
    ap.add_argument("--assets", type=Path, default=None, help="data/ and tiny-model/ to use instead of the bundle's")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "runs" / "gpu-check")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: /tmp/multitune-gpu-check)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, CPU allowed: exercises every section quickly")
    args = ap.parse_args(argv)
    names = tuple(args.sections or (RUNS[args.run] if args.run else "abcde"))
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path("/tmp/multitune-gpu-check")
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    summary: dict = {"run": args.run, "sections": names, "tiny": args.tiny, "install": install(args.bundle, site, args.out)}
    env = section_env(site, work)
    if args.tiny:  # the code path, not the speed: dynamo's guards and graphs without inductor's minutes of codegen on a CPU
        env["MULTITUNE_COMPILE_BACKEND"] = "eager"
    sys.path[:0] = [str(site), str(REPO / "src"), str(REPO)]
    summary["environment"] = environment(env)
    (args.out / f"summary-run{args.run or 'x'}.json").write_text(json.dumps(summary, indent=2))
    if not args.tiny and not summary["environment"].get("cuda"):
        print("note: no CUDA device; the sections run on the CPU and their GPU figures mean nothing")
    from gpu_bundle import bench_config, build_assets

    given = args.assets or (args.bundle / "assets" if args.bundle and (args.bundle / "assets").is_dir() else None)
    if given:
        assets = work / "assets"  # a writable copy: runs and caches land beside the data
        shutil.copytree(given, assets, dirs_exist_ok=True, symlinks=False)
    else:  # build them here (a machine without a bundle)
        assets = build_assets(work / "assets")
    ctx = {"out": args.out, "work": work, "assets": assets, "tiny": args.tiny,
           "gpu_args": TINY_GPU_ARGS if args.tiny else GPU_ARGS, "bench_cfg": bench_config(assets)}
    for name in names:
        s = Section(name, args.out, TIMEOUTS[name] * (3 if args.tiny else 1), env)
        print(f"section {name} ...", flush=True)
        try:
            s.record["ok"] = bool(SECTIONS[name](s, ctx))
        except TimeoutError:
            s.record.update(ok=False, timed_out=True)
        except Exception as e:  # one section's failure must not cost the others
            s.record.update(ok=False, error=f"{type(e).__name__}: {e}")
        s.save()
    print(table(args.out, names))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
