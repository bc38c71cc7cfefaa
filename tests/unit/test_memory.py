"""The memory model (multitune.launch.memory) against what was measured: GPU peaks in benchmarks/results/*.json, and a
fresh CPU measurement of the real model code against the coefficients the module ships."""

import json
from pathlib import Path

import pytest
import torch

from multitune.launch.memory import (
    LLAMA3_8B_MEASURED,
    SLICE,
    _slice_model,
    measure,
)

from benchmarks.gpu import predicted_gib

REPO = Path(__file__).resolve().parents[2]
DERIVED = Path(__file__).parent / "data" / "gpu_record_shapes_2026-11-27.json"


def recorded_sides() -> list[tuple[str, dict, float]]:
    """(record, shape, measured peak GiB) for every side with a shape: written by benchmarks/gpu.py into the record
    (``memory_shape``), or, for records older than that, derived from the benchmark's data (tests/unit/data)."""
    derived = json.loads(DERIVED.read_text())
    out = []
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        record = json.loads(path.read_text())
        results = [s["results"] for s in record.get("sections", {}).values() if isinstance(s, dict) and s.get("results")]
        results += [record] if "rows" in record else []
        for res in results:
            for row in res["rows"]:
                if "memory_shape" in row and row.get("peak_allocated_gib"):
                    out.append((path.name, row["memory_shape"], row["peak_allocated_gib"]))
        if derived["record"].endswith(path.name):
            for shape in derived["sides"]:
                rows = record["sections"][shape["section"]]["results"]["rows"]
                peak = next(r["peak_allocated_gib"] for r in rows if r["side"] == shape["side"])  # the record's figure
                out.append((path.name, shape, peak))
    return out


SIDES = recorded_sides()


def test_the_derived_shapes_cover_the_first_record():
    assert {(s["section"], s["side"]) for _, s, _ in SIDES} >= {("c", "multitune+liger-off"), ("c", "multitune"), ("a", "trl-defaults")}


@pytest.mark.parametrize("record,shape,measured", SIDES, ids=[f"{r}:{s['side']}" for r, s, _ in SIDES])
def test_the_model_is_within_10_percent_of_each_recorded_gpu_peak(record, shape, measured):
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
