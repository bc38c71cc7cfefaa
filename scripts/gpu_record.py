"""One record in benchmarks/results/ from what `make gpu-check` wrote on the GPU machine.

    python3 scripts/gpu_record.py RUN1_OUT RUN2_OUT            # -> benchmarks/results/<date>-<gpu>-gpu-check.json
    python3 scripts/gpu_record.py RUN1_OUT --gpu h200 --date 2026-12-01T0930

Each folder is one `make gpu-check` call's output ($OUT on the device, as the device tool brings it back): its
summary-runN.json, section-X.json, gpu-X.json (the benchmark's rows, rewritten after every side) and logs/. The record
is {"date", "command", "commit", "device", "runs": {N: summary}, "sections": {X: section}}, each section's benchmark
rows under ``sections.X.results.rows`` with their ``memory_shape``: the layout tests/unit/test_memory.py evaluates the
memory model at, and whose every measured peak it requires to be evaluated (or exempted there with a reason).

A call killed at the lease's limit leaves section-X.json without the rows it had not noted yet: they are taken from
gpu-X.json. Each section keeps what its logs measured (``trained:``, ``result:``, ``side`` and ``target`` lines, so a
side killed during its evaluation still has its speed and peak) and the tail of each log.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURED = ("trained: ", "result: ", "side ", "target ")  # the lines of benchmarks.gpu / train_speed that carry figures
TAIL = 1500  # characters of each log kept in the record


def read_out(folder: Path) -> tuple[dict, dict]:
    """({run: summary}, {section: record}) of one call's output folder, each section with its rows and logs."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder; pass the output folder of a `make gpu-check` call")
    runs = {p.stem.removeprefix("summary-run"): json.loads(p.read_text()) for p in sorted(folder.glob("summary-run*.json"))}
    sections = {}
    for path in sorted(folder.glob("section-*.json")):
        section = json.loads(path.read_text())
        name = section.get("section") or path.stem.removeprefix("section-")
        rows = folder / section.get("rows_file", f"gpu-{name}.json")
        if rows.exists():
            written = json.loads(rows.read_text())
            if len(written.get("rows", [])) > len((section.get("results") or {}).get("rows", [])):
                section["results"] = written  # the call ended before the section noted them
                section["results_from"] = rows.name
        section["logs"] = logs_of(folder / "logs", name)
        sections[name] = section
    if not sections:
        raise SystemExit(f"error: no section-*.json in {folder}; pass the output folder of a `make gpu-check` call")
    return runs, sections


def logs_of(logs: Path, name: str) -> dict[str, dict]:
    """Each of the section's logs (its steps', and its benchmark sides' under logs/X-sides/): the lines with figures
    and the tail."""
    out = {}
    for path in sorted([*logs.glob(f"{name}-*.log"), *logs.glob(f"{name}-sides/*.log")]):
        text = path.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith(MEASURED)]
        out[str(path.relative_to(logs))] = {"measured": lines, "tail": text[-TAIL:]}
    return out


def gpu_name(runs: dict) -> str:
    """A short name for the file: "h100" from "NVIDIA H100 80GB HBM3"."""
    for summary in runs.values():
        device = (summary.get("environment") or {}).get("device") or ""
        m = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", device)
        if m:
            return m.group(1).lower()
    return "gpu"


def commit() -> str | None:
    """The commit the record is assembled at (the check ran the same working tree)."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def assemble(folders: list[Path], date: str | None = None) -> dict:
    runs, sections = {}, {}
    for folder in folders:
        more_runs, more = read_out(folder)
        twice = sorted(set(more) & set(sections))
        if twice:
            raise SystemExit(f"error: section(s) {', '.join(twice)} in more than one folder; pass each call's folder once")
        runs |= more_runs
        sections |= more
    devices = [(summary.get("environment") or {}).get("device") for summary in runs.values()]
    device = next((d for d in devices if d), None)
    return {"date": date or f"{datetime.now(timezone.utc):%Y-%m-%dT%H%M}", "commit": commit(), "device": device,
            "command": "make gpu-check RUN=1, then RUN=2 (scripts/gpu_check.py); assembled by scripts/gpu_record.py "
                       + " ".join(f.name for f in folders),
            "runs": runs, "sections": dict(sorted(sections.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="the output folder of each `make gpu-check` call")
    ap.add_argument("--gpu", default=None, help="the card's short name in the file name (default: from the device's name)")
    ap.add_argument("--date", default=None, help="the record's date, YYYY-MM-DDTHHMM (default: now, UTC)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    record = assemble(args.folders, args.date)
    path = args.results / f"{record['date']}-{args.gpu or gpu_name(record['runs'])}-gpu-check.json"
    if path.exists():  # a record is committed evidence: never replaced
        raise SystemExit(f"error: {path} exists; pass another --date")
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    for name, section in record["sections"].items():
        rows = (section.get("results") or {}).get("rows", [])
        ok = "TIME" if section.get("timed_out") else {True: "yes", False: "NO", None: "-"}[section.get("ok")]
        print(f"{name}: {ok:4s} {len(rows)} benchmark row(s)" + (f", from {section['results_from']}" if "results_from" in section else ""))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
