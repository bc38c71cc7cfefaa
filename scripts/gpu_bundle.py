"""`make gpu-bundle`: what the bare GPU machine needs for `make gpu-check`, prepared on this (CPU) machine.

    python scripts/gpu_bundle.py --out .gpu-bundle          # .gpu-bundle/run1 and .gpu-bundle/run2

The GPU machine (Python 3.12, manylinux x86_64, no network) has torch, transformers 5.17, accelerate,
peft, huggingface_hub, tokenizers and the scientific stack, but not trl, datasets, pydantic,
liger-kernel or bitsandbytes. Their wheels are downloaded here for that platform (pip download
--only-binary, --python-version 3.12), with transformers and peft at the versions this project is
tested with. Each run of the device tool carries at most 64 MiB with the working tree, and
bitsandbytes alone is 43 MB, so there are two bundles: run1 (sections a, b: the 8B model and QLoRA) with
it, run2 (sections c, d, e) without it. Each also holds the assets: generated task data and a tiny model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = [  # missing on the GPU machine, or pinned to the versions tested here
    "transformers==5.24.0", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.4",
    "typing-extensions==4.16.0",
]
BUNDLES = {"run1": BASE + ["liger-kernel==0.8.5", "bitsandbytes==0.50.2"], "run2": BASE + ["liger-kernel==0.8.5"]}
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
            "--abi", "none"] + [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                            "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
                                for a in ("--platform", p)]
LIMIT = 64 * 2**20  # what one device run carries, working tree included


def download(specs: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("-")[0].lower().replace("_", "-") for p in dest.glob("*.whl")}
    todo = [s for s in specs if s.split("==")[0].lower().replace("_", "-") not in have]
    if todo:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(dest), *todo], check=True)


def build_assets(dest: Path) -> Path:
    """Generated data in the seed tasks' schemas and a small tiny model (a few MB), built once."""
    from multitune.commands import tiny

    dest.mkdir(parents=True, exist_ok=True)
    paths = tiny.synthetic_datasets(dest / "data", per_class=40)
    if not (dest / "tiny-model" / "config.json").exists():
        tiny.make_tiny_model(dest / "tiny-model", tiny.corpus(paths), vocab_size=2048, hidden=64, layers=2, pretrain_steps=100)
    bench_config(dest)
    return dest


def bench_config(assets: Path) -> Path:
    """The benchmark config over the assets (paths of this machine: rewritten wherever the assets are)."""
    import yaml

    from multitune.commands.demo import offline_config

    raw = offline_config(assets)
    raw["tasks"] = raw["tasks"][:3]
    raw["model"]["name_or_path"] = str(assets / "tiny-model")
    raw["run_dir"] = str(assets / "run")
    raw["train"].update(logging_steps=1, eval_rows_during_training=0, eval_steps=100_000, save_steps=100_000, save_minutes=None)
    path = assets / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def repo_size() -> int:
    """The working tree that travels with every run: tracked files plus untracked files git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True).stdout.split()
    return sum((REPO / f).stat().st_size for f in files if (REPO / f).is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".gpu-bundle")
    args = ap.parse_args(argv)
    cache = args.out / "wheels-cache"
    download(sorted({s for specs in BUNDLES.values() for s in specs}), cache)
    assets = build_assets(args.out / "assets-build")
    base = repo_size()
    manifest = {}
    for name, specs in BUNDLES.items():
        target = args.out / name
        shutil.rmtree(target, ignore_errors=True)
        (target / "wheels").mkdir(parents=True)
        for spec in specs:
            dist = spec.split("==")[0].lower().replace("-", "_")
            found = [w for w in cache.glob("*.whl") if w.name.lower().startswith(dist + "-" + spec.split("==")[1])]
            if len(found) != 1:
                raise SystemExit(f"no single wheel for {spec} in {cache}: {[w.name for w in found]}")
            shutil.copy2(found[0], target / "wheels")
        shutil.copytree(assets, target / "assets", ignore=shutil.ignore_patterns("run", "bench.yaml"))
        size = tree_size(target)
        manifest[name] = {"wheels": sorted(p.name for p in (target / "wheels").iterdir()), "bytes": size,
                          "with_working_tree_bytes": size + base}
        print(f"{target}: {size / 2**20:.1f} MiB (+ working tree {base / 2**20:.1f} MiB = {(size + base) / 2**20:.1f} of 64 MiB)")
        if size + base > LIMIT:
            raise SystemExit(f"{target} with the working tree is over the 64 MiB a device run carries")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print("carry one bundle per run, e.g. carry=['.gpu-bundle/run1'] and command `make gpu-check RUN=1`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
