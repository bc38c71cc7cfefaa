"""`multitune compare SPEC.yaml`: base zero-shot and k-shot, named prompt templates and trained runs,
scored on the same validation rows of the same recorded split, in one table with each row's cost.

    config: configs/mirror-tiny.yaml   # the base config: model, tasks, split (paths relative to the cwd)
    overrides: [train.epochs=1]        # applied to it (and to every row it trains)
    out_dir: runs/compare-tiny         # the split, the trained rows and compare.{md,json}
    max_rows: 200                      # validation rows per task (one fixed sample; default: all)
    rows:
      - {name: zero-shot}              # the base model, no training (the row deltas are taken against)
      - {name: 2-shot, shots: 2}
      - {name: terse, template: terse}
      - {name: lora, overrides: [peft.method=lora]}   # trained into out_dir/runs/lora unless it finished
      - {name: mine, run: runs/my-run} # an existing run directory, trained on the same split

Every row is checked before any row trains (its template and shots, a classifier head's, its split where it is
recorded or its config makes it). compare.{json,md} are rewritten after each row, so a later failure keeps the
rows scored before it; a relaunch keeps every recorded row whose row, config, split and weights are unchanged
(`row_key`) and trains and scores the rest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from multitune.config import Config, dump_config, load_config
from multitune.data.load import TaskData, load_tasks, save_splits
from multitune.errors import UserError
from multitune.files import atomic_write, strict_json
from multitune.rundir import RunDir
from multitune.launch.runner import train
from multitune.results.trained import TrainedRun, open_run, trained_run
from multitune.tasks import resolve_tasks
from multitune.training.parts import part_kind
from multitune.training.stages import COST_KEYS
from multitune.results.variants import Variant, as_base, check_variant, eval_data, evaluate



class RowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    shots: int = Field(0, ge=0, description="examples from the training rows in each prompt")
    template: str | None = Field(None, description="a named prompt template (`multitune templates`)")
    run: str | None = Field(None, description="an existing run directory")
    config: str | None = Field(None, description="a config to train (default: the spec's config)")
    overrides: list[str] | None = Field(None, description="dotted overrides of the config to train")

    @model_validator(mode="after")
    def _one_kind(self) -> RowSpec:
        if self.run and (self.config or self.overrides):
            raise ValueError(f"row {self.name}: give `run` (an existing run) or `config`/`overrides` (train one), not both")
        return self

    @property
    def trains(self) -> bool:
        return self.config is not None or self.overrides is not None

    @property
    def base(self) -> bool:
        return not self.run and not self.trains


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str
    overrides: list[str] = []
    out_dir: str
    mode: str | None = None
    max_rows: int | None = Field(None, gt=0)
    rows: list[RowSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> CompareSpec:
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"row names must be unique: {names}")
        return self


def load_spec(path: Path) -> CompareSpec:
    if not path.is_file():
        raise UserError(f"compare spec not found: {path}")
    try:
        return CompareSpec.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{path}: {where + ': ' if where else ''}{err['msg']}") from None


# ---------------------------------------------------------------- the rows


def row_config(spec: CompareSpec, row: RowSpec) -> Config:
    """The config a training row trains: its config (or the spec's) with the spec's and the row's overrides,
    in out_dir/runs/<name> unless the row's overrides name a run_dir."""
    overrides = [*spec.overrides, *(row.overrides or [])]
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides.append(f"run_dir={Path(spec.out_dir) / 'runs' / row.name}")
    return load_config(row.config or spec.config, overrides)


def _same_split(row: str, data: list[TaskData], reference: dict[str, dict]) -> None:
    for td in data:
        ref = reference.get(td.task.name)
        if ref is not None and (td.split["train"] != ref["train"] or td.split["val"] != ref["val"]):
            raise UserError(
                f"row {row}: task {td.task.name} was trained on another split than the compare's base config makes "
                "(data.split_seed, data.val_fraction, tasks.<name>.max_rows or the data differ); "
                "compare only runs made with the same split"
            )


def run_row(run: RunDir, row: RowSpec, spec: CompareSpec, reference: dict[str, dict], seed: int) -> dict[str, dict[str, Any]]:
    """A trained run's metrics on the compare's rows (its own weights, shots and template as the row says)."""
    trained = open_run(run)
    variant = Variant(shots=row.shots, template=row.template, mode=spec.mode, max_rows=spec.max_rows)
    try:
        trained.check_variant(variant)
    except UserError as e:
        raise UserError(f"row {row.name}: {e}") from None
    data = trained.data(variant, seed)  # the compare's seed draws the shots, for every row alike
    _same_split(row.name, data, reference)
    return trained.evaluate(data, mode=variant.mode, max_rows=variant.max_rows, seed=seed)


def cost_of(run: RunDir | None) -> dict[str, Any]:
    """train_seconds, trainable_params and tokens_seen from the run's cost.json (zero for an untrained row)."""
    if run is None:
        return dict.fromkeys(COST_KEYS, 0)
    path = run.root / "cost.json"
    facts = json.loads(path.read_text()) if path.exists() else {}
    return {k: facts.get(k) for k in COST_KEYS}


def method_of(row: RowSpec, trained: TrainedRun | None) -> str:
    if trained is None:
        what = f"{row.shots}-shot" if row.shots else "zero-shot"
        return what + (f", template {row.template}" if row.template else "")
    parts = [trained.method]
    parts += [f"{row.shots}-shot"] if row.shots else []
    parts += [f"template {row.template}"] if row.template else []
    return ", ".join(parts)


# ---------------------------------------------------------------- refused before any row trains


def check_rows(spec: CompareSpec, base_cfg: Config) -> None:
    """Refuse every row that cannot be scored (a bad template, shots on a classifier head, a missing run, a
    config train refuses) before any row trains: a refusal after an hour of training loses that hour."""
    for row in spec.rows:
        try:
            if row.base:
                check_variant(base_cfg, Variant(shots=row.shots, template=row.template, mode=spec.mode))
                continue
            if row.run and not RunDir(Path(row.run)).is_finished():
                raise UserError(f"{row.run} holds no finished run; train it first or give `overrides` to train one")
            run = RunDir(Path(row.run)) if row.run else None
            cfg = run.load_config() if run else row_config(spec, row)
            trained_run(run or RunDir(Path(cfg.run_dir)), cfg).check_variant(Variant(shots=row.shots, template=row.template, mode=spec.mode))
            if row.trains:  # what train refuses (a head needs label tasks), before any row trains
                part_kind(cfg).check(resolve_tasks(cfg))
        except UserError as e:
            raise UserError(str(e) if str(e).startswith(f"row {row.name}:") else f"row {row.name}: {e}") from None


def check_splits(spec: CompareSpec, reference: dict[str, dict]) -> None:
    """Refuse, before any row trains, a row trained (its recorded split) or to be trained (the split its config
    makes: the split is deterministic) on another split than the compare's."""
    for row in spec.rows:
        if row.base:
            continue
        run = RunDir(Path(row.run)) if row.run else None
        cfg = run.load_config() if run else row_config(spec, row)
        split_dir = (run or RunDir(Path(cfg.run_dir))).splits
        _same_split(row.name, load_tasks(cfg, split_dir if split_dir.is_dir() else None, create=True), reference)


# ---------------------------------------------------------------- the whole comparison


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_key(spec: CompareSpec, row: RowSpec, base_cfg: Config, split: str) -> str:
    """What a row's scores depend on: the row, the spec's mode and rows, the config that scores it, the split and,
    for a trained run, its weights (the DONE its last training wrote). Equal keys: the recorded scores stand."""
    cfg = base_cfg if row.base else RunDir(Path(row.run)).load_config() if row.run else row_config(spec, row)
    run = None if row.base else RunDir(Path(row.run)) if row.run else RunDir(Path(cfg.run_dir))
    done = run.done.stat().st_mtime_ns if run is not None and run.is_finished() else None
    return _digest([row.model_dump(), spec.mode, spec.max_rows, dump_config(cfg), split, done])


def recorded_rows(out: Path) -> dict[str, dict[str, Any]]:
    """The rows an earlier launch scored, by name (none when compare.json is absent or unreadable)."""
    try:
        return {r["name"]: r for r in json.loads((out / "compare.json").read_text())["scored"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def score_row(spec: CompareSpec, row: RowSpec, base_cfg: Config, split_dir: Path, reference: dict[str, dict]) -> dict[str, Any]:
    """Train the row if it trains (a finished run with the same config is reused) and score it."""
    seed = base_cfg.seed
    if row.base:
        variant = Variant(base=True, shots=row.shots, template=row.template, mode=spec.mode, max_rows=spec.max_rows)
        results = evaluate(base_cfg, eval_data(base_cfg, split_dir, variant, seed), variant, seed)
        run = None
    else:
        if row.trains:
            cfg = row_config(spec, row)
            train(cfg)  # a finished run with this config is reused: the relaunch does nothing
            run = RunDir(Path(cfg.run_dir))
        else:
            run = RunDir(Path(row.run))
        results = run_row(run, row, spec, reference, seed)
    summary = {t: {k: m[k] for k in ("kind", "n", "accuracy", "macro_f1", "chance")} for t, m in results.items() if m["kind"] != "chat"}
    return {"name": row.name, "method": method_of(row, open_run(run) if run else None), "run_dir": str(run.root) if run else None,
            "results": summary, "cost": cost_of(run)}


def write_table(out: Path, spec_path: Path, rows: list[dict[str, Any]], pending: list[str]) -> tuple[dict[str, Any], str]:
    """compare.json (the table, and each scored row with its key for a relaunch) and compare.md, rewritten whole."""
    table = build_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "compare.json", strict_json({**table, "scored": rows}))  # NaN/inf as null
    md = format_markdown(table, spec_path) + (f"\nRows still to score: {', '.join(pending)}.\n" if pending else "")
    atomic_write(out / "compare.md", md)
    return table, md


def compare(spec_path: Path) -> dict[str, Any]:
    """Train what the spec names and has not finished, score every row, write compare.{json,md} after each row,
    print it. A relaunch keeps the rows already scored whose key (row_key) is unchanged."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process scores every row and writes the table
        raise UserError("run `multitune compare` as one process; train multi-GPU rows with `accelerate launch ... "
                        "multitune train` first and name their run directories with `run:` rows")
    spec = load_spec(spec_path)
    out = Path(spec.out_dir)
    base_cfg = load_config(spec.config, [*spec.overrides, f"run_dir={out}"])
    base_cfg = as_base(base_cfg)
    check_rows(spec, base_cfg)  # every bad row refused before an hour of training
    split_dir = out / "splits"
    reference_data = load_tasks(base_cfg, split_dir if split_dir.is_dir() else None, create=not split_dir.is_dir())
    save_splits(reference_data, split_dir)
    reference = {td.task.name: td.split for td in reference_data}
    check_splits(spec, reference)
    split, recorded, rows = _digest(reference), recorded_rows(out), []
    for i, row in enumerate(spec.rows):
        key = row_key(spec, row, base_cfg, split)
        if recorded.get(row.name, {}).get("key") == key:
            print(f"compare: row {row.name}: scored by an earlier launch, unchanged")
            rows.append(recorded[row.name])
            continue
        print(f"compare: row {row.name}")
        entry = score_row(spec, row, base_cfg, split_dir, reference)
        rows.append({**entry, "key": row_key(spec, row, base_cfg, split)})  # after training: its DONE
        write_table(out, spec_path, rows, [r.name for r in spec.rows[i + 1 :]])  # a later failure keeps this row
    table, md = write_table(out, spec_path, rows, [])
    print(md, end="")
    print(f"wrote {out / 'compare.md'} and {out / 'compare.json'}")
    return table


def _zero_shot(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == "zero-shot"), None)


def build_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row and label task: n, accuracy, macro-F1 and their deltas to the zero-shot row; the row's cost."""
    zero = _zero_shot(rows)
    tasks = list(dict.fromkeys(t for r in rows for t, m in r["results"].items() if m["kind"] != "chat"))
    table_rows = []
    for r in rows:
        cells = {}
        for t in tasks:
            m = r["results"].get(t)
            if m is None:
                continue
            ref = zero["results"].get(t) if zero else None
            cells[t] = {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "chance": m["chance"],
                        "delta_accuracy": None if ref is None else m["accuracy"] - ref["accuracy"],
                        "delta_macro_f1": None if ref is None else m["macro_f1"] - ref["macro_f1"]}
        table_rows.append({"name": r["name"], "method": r["method"], "run_dir": r["run_dir"], "tasks": cells, "cost": r["cost"]})
    return {"zero_shot_row": zero["name"] if zero else None, "tasks": tasks, "rows": table_rows}


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_markdown(table: dict[str, Any], spec_path: Path) -> str:
    tasks = table["tasks"]
    head = ["row", "method"] + [f"{t} {m}" for t in tasks for m in ("acc", "Δacc", "F1", "ΔF1")] + ["train s", "trainable params", "tokens seen"]
    lines = [f"# multitune compare: {spec_path}", "",
             f"Accuracy and macro-F1 on the same validation rows; Δ against the {table['zero_shot_row'] or '(no zero-shot)'} row.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [r["name"], r["method"]]
        for t in tasks:
            c = r["tasks"].get(t, {})
            cells += [_num(c.get("accuracy")), _num(c.get("delta_accuracy"), "{:+.3f}"), _num(c.get("macro_f1")),
                      _num(c.get("delta_macro_f1"), "{:+.3f}")]
        cost = r["cost"]
        cells += [_num(cost.get("train_seconds"), "{:.0f}"), _num(cost.get("trainable_params"), "{:,}"), _num(cost.get("tokens_seen"), "{:,}")]
        lines.append("| " + " | ".join(cells) + " |")
    ns = {t: next((r["tasks"][t]["n"] for r in table["rows"] if t in r["tasks"]), 0) for t in tasks}
    lines += ["", "Validation rows per task: " + ", ".join(f"{t} {n}" for t, n in ns.items()) + "."]
    return "\n".join(lines) + "\n"
