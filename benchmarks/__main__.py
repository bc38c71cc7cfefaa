"""The benchmark suite: data preparation, training throughput against TRL's defaults, evaluation throughput.

    python -m benchmarks                 # or `make bench`; about 10 minutes on 2 CPU cores
    python -m benchmarks --steps 30 --sides baseline packed

Uses the real seed datasets from the local Hub mirror (../shared/hub, or $MULTITUNE_HUB_MIRROR) when it
is there, else the offline demo's generated data, with a tiny Llama-architecture model trained on
their texts. Every comparison runs side by side in this one invocation; the table is printed and a
JSON record (machine, versions, date, every number) is written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from benchmarks.train_speed import DEFAULT_SIDES, SIDES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "multitune")


def machine() -> dict:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "memory_gib": round(mem, 1), "gpu": gpu, "torch_threads": torch.get_num_threads()}


def workspace(workdir: Path) -> Path:
    """The benchmark config: the three seed tasks (mirror data when present) and a tiny model, built once."""
    from multitune import tiny
    from multitune.config import load_config
    from multitune.demo import offline_config, prepare_offline
    from multitune.hub import mirror_root
    from multitune.tasks import build_task

    mirror = mirror_root(os.environ.get("MULTITUNE_HUB_MIRROR") or str(REPO.parent / "shared" / "hub"))
    model_dir = workdir / "tiny-model"
    if mirror is not None and (mirror / "datasets").is_dir():
        raw = yaml.safe_load((REPO / "configs" / "mirror-tiny.yaml").read_text())
        raw["hub_mirror"] = str(mirror)
        if not (model_dir / "config.json").exists():
            cfg = load_config(REPO / "configs" / "mirror-tiny.yaml", [f"hub_mirror={mirror}"])
            texts = []
            for tcfg in cfg.tasks:
                task = build_task(tcfg)
                texts += tiny.dataset_texts(task.load(mirror), task.label_names)
            tiny.make_tiny_model(model_dir, texts)
        source = f"real seed datasets from {mirror}"
    else:
        prepare_offline(workdir)
        raw = offline_config(workdir)
        raw["tasks"] = raw["tasks"][:3]
        source = "generated data (no Hub mirror found)"
    raw["run_dir"] = str(workdir / "run")
    raw["model"]["name_or_path"] = str(model_dir)
    for t in raw["tasks"]:
        t["max_eval_rows"] = 200
    raw["train"].update(logging_steps=10, eval_rows_during_training=0, eval_steps=100_000, save_steps=100_000, save_minutes=None)
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    print(f"benchmark data: {source}; model: {model_dir}")
    return path


def data_prep(config: Path, workdir: Path) -> dict:
    env = {**os.environ, "MULTITUNE_CACHE": str(workdir / f"cache-{time.time_ns()}"),
           "HF_DATASETS_CACHE": str(workdir / f"hf-datasets-{time.time_ns()}")}
    runs = []
    for _ in ("cold", "cached"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.data_prep", str(config)], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    cold, cached = runs
    assert not cold["cached"] and cached["cached"], runs
    print(f"\ndata preparation ({cold['train_rows']} training rows, {len(cold['tasks'])} tasks): "
          f"cold {cold['seconds']:.2f} s, cached {cached['seconds']:.2f} s")
    return {"cold_s": cold["seconds"], "cached_s": cached["seconds"], "tasks": cold["tasks"]}


def training(config: Path, workdir: Path, sides: list[str], steps: int) -> list[dict]:
    results = []
    for side in sides:
        out = workdir / f"side-{side}.json"
        print(f"training: {side} ({steps} steps) ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_speed", "--side", side, "--config", str(config),
                               "--steps", str(steps), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(f"the {side} side failed")
        results.append(json.loads(out.read_text()))
    base = next((r for r in results if r["side"] == "baseline"), None)
    print(f"\n{'side':18s} {'tokens/s':>9s} {'vs TRL':>7s} {'train s':>8s} {'wall s':>7s} {'peak RSS MB':>12s} "
          f"{'train loss':>11s} {'val answer loss':>16s}")
    for r in results:
        r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        ratio = f"{r['vs_baseline']:.2f}x" if base else "-"
        print(f"{r['side']:18s} {r['tokens_per_s']:9.0f} {ratio:>7s} {r['train_s']:8.1f} {r['wall_s']:7.1f} "
              f"{r['peak_rss_mb']:12.0f} {r['train_loss_last']:11.3f} {r['val_answer_loss']:16.3f}")
    print("(the baseline's training loss covers every token, multitune's the answers only; "
          "the validation answer loss is the same measure for all)")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per training side")
    ap.add_argument("--sides", nargs="*", default=DEFAULT_SIDES, choices=list(SIDES))
    ap.add_argument("--eval-run", type=Path, default=None,
                    help="a finished run to measure evaluation on (default: runs/mirror-tiny if finished, else a trained side)")
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    record = {"date": started.isoformat(timespec="seconds"), "machine": machine(),
              "versions": {p: metadata.version(p) for p in PACKAGES}, "steps": args.steps}
    print(json.dumps(record, indent=1))
    config = workspace(args.workdir)
    record["data_prep"] = data_prep(config, args.workdir)
    record["training"] = training(config, args.workdir, args.sides, args.steps)
    eval_run = args.eval_run
    if eval_run is None:
        trained = REPO / "runs" / "mirror-tiny"
        ours = [s for s in args.sides if s != "baseline"]
        if not (trained / "DONE").exists() and not ours:
            raise SystemExit("no finished run to measure evaluation on: pass --eval-run or a multitune side")
        eval_run = trained if (trained / "DONE").exists() else args.workdir / f"train-side-{ours[0]}"
    print(f"\nevaluation throughput on {eval_run} ({args.eval_rows} validation rows per task)")
    from benchmarks.eval_speed import measure

    record["eval_run"] = str(eval_run)
    record["evaluation"] = measure(eval_run, args.eval_rows)
    record["minutes"] = round((datetime.now(timezone.utc) - started).total_seconds() / 60, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started:%Y-%m-%dT%H%M}-{platform.node() or 'host'}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"\n{record['minutes']} min; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
