"""The memory model (multitune.launch.memory) against what was measured: GPU peaks in benchmarks/results/*.json, and a
fresh CPU measurement of the real model code against the coefficients the module ships."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import gpu_rows, predicted_gib
from multitune.launch.memory import (
    LLAMA3_8B_MEASURED,
    SLICE,
    _slice_model,
    measure,
)

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
DERIVED = Path(__file__).parent / "data" / "gpu_record_shapes_2026-11-27.json"
# Rows of benchmarks/results/*.json with a measured GPU peak that the model is not evaluated at, each with its reason:
# {(record file, section, side): why}. (A side that ran out of memory has no peak, only its error, so no entry: its
# crash is a lower bound, tested below where it matters.) A new record whose rows lack their shapes fails
# test_every_measured_peak_is_evaluated_or_exempt until its shapes are recorded or derived, or it is listed here.
EXEMPT: dict[tuple[str, str | None, str], str] = {}


def measured_rows(folder: Path = RESULTS) -> list[tuple[str, str | None, dict]]:
    """(record file, section, row) for every row with a GPU peak (``peak_allocated_gib``) in every JSON under ``folder``,
    in any layout benchmarks.gpu, scripts/gpu_check.py or scripts/gpu_record.py writes (benchmarks.gpu.gpu_rows)."""
    out = []
    for path in sorted(folder.glob("*.json")):
        out += [(path.name, section, row) for section, row in gpu_rows(json.loads(path.read_text()))
                if row.get("peak_allocated_gib")]
    return out


def recorded_sides(folder: Path = RESULTS) -> list[tuple[str, str | None, dict, float]]:
    """(record, section, shape, measured peak GiB) for every measured side with a shape: written by benchmarks/gpu.py
    into the row (``memory_shape``), or, for records older than that, derived from the benchmark's data (tests/unit/data)."""
    derived = json.loads(DERIVED.read_text())
    out = []
    for name, section, row in measured_rows(folder):
        if "memory_shape" in row:
            out.append((name, section, row["memory_shape"], row["peak_allocated_gib"]))
        elif derived["record"].endswith(name):
            shape = next((s for s in derived["sides"] if (s["section"], s["side"]) == (section, row["side"])), None)
            if shape is not None:
                out.append((name, section, shape, row["peak_allocated_gib"]))  # the record's figure
    return out


def unevaluated(folder: Path = RESULTS) -> list[tuple[str, str | None, str]]:
    """Measured rows the model is evaluated at neither from a shape nor by an exemption."""
    evaluated = {(name, section, shape["side"]) for name, section, shape, _ in recorded_sides(folder)}
    return [key for name, section, row in measured_rows(folder)
            if (key := (name, section, row["side"])) not in evaluated and key not in EXEMPT]


SIDES = recorded_sides()


def test_the_derived_shapes_cover_the_first_record():
    assert {(sec, s["side"]) for _, sec, s, _ in SIDES} >= {("c", "multitune+liger-off"), ("c", "multitune"), ("a", "trl-defaults")}


def test_every_measured_peak_is_evaluated_or_exempt():
    """Every GPU peak in benchmarks/results/ tightens the model: a record committed without its sides' shapes fails here."""
    assert unevaluated() == []
    measured = {(name, section, row["side"]) for name, section, row in measured_rows()}
    assert set(EXEMPT) <= measured, "an exemption names no measured row"
    assert all(why.strip() for why in EXEMPT.values())


def _row(side: str, shape: bool = True) -> dict:
    return {"side": side, "peak_allocated_gib": 10.0} | ({"memory_shape": {"side": side}} if shape else {})


def test_the_records_are_read_in_every_layout_a_gpu_check_writes(tmp_path):
    """benchmarks.gpu's --json (top-level rows), gpu_check's section-X.json as committed (top-level results), and the
    assembled record (sections.X.results); a measured row without a shape is reported, not dropped."""
    (tmp_path / "gpu-a.json").write_text(json.dumps({"device": "H100", "rows": [_row("multitune"), {"side": "qlora", "error": "oom"}]}))
    (tmp_path / "section-b.json").write_text(json.dumps({"section": "b", "ok": True, "results": {"rows": [_row("qlora")]}}))
    assembled = {"sections": {"c": {"results": {"rows": [_row("multitune+grouped"), _row("multitune", shape=False)]}},
                              "d": {"stop_resume": {}}}}
    (tmp_path / "2026-12-01T0000-h200-gpu-check.json").write_text(json.dumps(assembled))
    found = {(name, section, shape["side"]) for name, section, shape, _ in recorded_sides(tmp_path)}
    assert found == {("gpu-a.json", None, "multitune"), ("section-b.json", "b", "qlora"),
                     ("2026-12-01T0000-h200-gpu-check.json", "c", "multitune+grouped")}
    assert unevaluated(tmp_path) == [("2026-12-01T0000-h200-gpu-check.json", "c", "multitune")]


@pytest.mark.parametrize("record,section,shape,measured", SIDES, ids=[f"{r}:{sec}:{s['side']}" for r, sec, s, _ in SIDES])
def test_the_model_is_within_10_percent_of_each_recorded_gpu_peak(record, section, shape, measured):
    """torch.cuda.max_memory_allocated on the GPU (the record) against the model at the side's recorded shape."""
    predicted = predicted_gib(shape)
    assert abs(predicted - measured) <= 0.10 * measured, f"{shape['side']}: predicted {predicted:.2f} GiB, measured {measured:.2f}"


def test_shipped_coefficients_match_a_fresh_measurement_of_the_real_layers():
    """A 1- and a 2-layer slice of the real code on the CPU: what one more LoRA layer keeps for backward."""
    tokens = 128
    one, two = (measure("lora", layers=n, tokens=tokens) for n in (1, 2))
    layer = _slice_model("lora", 16, 0.0, 1, 32, SLICE, False).get_decoder().layers[0]
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    coef = LLAMA3_8B_MEASURED["lora"]
    expected = coef.kept_per_layer * SLICE["hidden_size"] * tokens + coef.per_trainable_param * trainable
    assert abs((two["kept"] - one["kept"]) - expected) <= 0.02 * expected


def test_packed_rows_keep_a_bf16_mask_in_every_layer():
    """Two sequences in one padding-free row: transformers builds a block mask and each layer keeps it as bf16."""
    tokens = 256
    plain, packed = (measure("lora", layers=2, tokens=tokens, sequences=n) for n in (1, 2))
    assert packed["kept"] - plain["kept"] == 2 * 2 * tokens**2  # 2 layers x 2 bytes x T^2
    assert LLAMA3_8B_MEASURED["lora"].mask_per_layer == 2.0


def test_lora_dropout_adds_exactly_its_noise_on_the_cpu():
    """What LoRA dropout costs on the CPU is its noise tensors (one per adapted input, 2 or 4 bytes an element), which
    the model swaps for CUDA's 1-byte masks; at least 2 bytes an element, so a GPU pays less than the CPU."""
    tokens = 64
    layer = _slice_model("lora", 16, 0.1, 1, 32, SLICE, False).get_decoder().layers[0]
    adapted = sum(m.in_features for m in layer.modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), torch.nn.Linear))
    without, with_ = (measure("lora", layers=1, tokens=tokens, dropout=p) for p in (0.0, 0.1))
    assert with_["kept"] - without["kept"] == with_["dropout_noise"] >= 2 * adapted * tokens


def test_the_8b_side_that_ran_out_of_memory_is_predicted_above_what_it_had():
    """Section a's multitune side: the same data, seed and packed micro-batches as section c's (one micro-batch of 4
    packed rows a step) on all 32 layers, Liger on (its swiglu.py is in the traceback). It failed in a forward, with
    61.13 GiB allocated, asking for 220 MiB more, beside another process's 15.74 GiB: its peak was above 61.35 GiB."""
    import copy

    shape = copy.deepcopy(next(s for s in json.loads(DERIVED.read_text())["sides"] if s["side"] == "multitune"))
    shape["model"]["layers"] = 32
    assert predicted_gib(shape) > 61.13 + 220 / 1024
