"""scripts/gpu_record.py: the output folders of a `make gpu-check` pair of calls become one record in the layout the
memory model's records test reads, rows of a killed call included."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_record

from tests.unit.test_memory import recorded_sides, unevaluated

SHAPE = {"model": {"shape": "8b", "layers": 32, "dtype": "bfloat16"}, "peft": {"method": "lora"}, "steps": []}


def _row(side: str, peak: float) -> dict:
    return {"side": side, "tokens_per_s": 9000.0, "peak_allocated_gib": peak, "memory_shape": {"side": side, **SHAPE}}


def _write(path: Path, text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if isinstance(text, str) else json.dumps(text))


@pytest.fixture
def outs(tmp_path):
    """Run 1 (a finished; b killed with the whole call after its first side: no results noted in section-b.json,
    the side's row in gpu-b.json) and run 2 (c), as two device calls bring them back."""
    one, two = tmp_path / "run1", tmp_path / "run2"
    env = {"device": "NVIDIA H200", "cuda": True}
    _write(one / "summary-run1.json", {"run": 1, "sections": ["a", "b"], "environment": env})
    _write(one / "section-a.json", {"section": "a", "ok": True, "steps": [], "rows_file": "gpu-a.json",
                                    "results": {"rows": [_row("multitune", 40.0), _row("trl-expert", 45.0)]}})
    _write(one / "gpu-a.json", {"rows": [_row("multitune", 40.0), _row("trl-expert", 45.0)]})
    _write(one / "section-b.json", {"section": "b", "ok": None, "steps": [], "rows_file": "gpu-b.json"})
    _write(one / "gpu-b.json", {"rows": [_row("qlora", 31.0)]})
    _write(one / "logs" / "b-0-benchmarks-gpu.log", "loading\r 50%\r100%\nside qlora: 7000 tokens/s over 9 steps\n")
    _write(one / "logs" / "b-sides" / "side-qlora.log", 'noise\ntrained: {"peak_allocated_gib": 31.0}\n')
    _write(two / "summary-run2.json", {"run": 2, "sections": ["c"], "environment": env})
    _write(two / "section-c.json", {"section": "c", "ok": False, "timed_out": True, "steps": [],
                                    "results": {"rows": [_row("multitune+grouped", 7.0)]}})
    return one, two


def test_two_calls_become_one_record_the_records_test_reads(outs, tmp_path):
    results = tmp_path / "results"
    assert gpu_record.main([*map(str, outs), "--results", str(results), "--date", "2026-12-01T0930"]) == 0
    path = results / "2026-12-01T0930-h200-gpu-check.json"
    record = json.loads(path.read_text())
    assert list(record["sections"]) == ["a", "b", "c"] and set(record["runs"]) == {"1", "2"}
    assert record["device"] == "NVIDIA H200"
    b = record["sections"]["b"]
    assert b["results_from"] == "gpu-b.json" and [r["side"] for r in b["results"]["rows"]] == ["qlora"]
    # what the logs measured is kept line by line, beside each log's tail
    assert b["logs"]["b-0-benchmarks-gpu.log"]["measured"] == ["side qlora: 7000 tokens/s over 9 steps"]
    assert b["logs"]["b-sides/side-qlora.log"]["measured"] == ['trained: {"peak_allocated_gib": 31.0}']
    # the memory model's records test evaluates every measured side of the assembled record
    found = {(section, shape["side"], peak) for name, section, shape, peak in recorded_sides(results)}
    assert found == {("a", "multitune", 40.0), ("a", "trl-expert", 45.0), ("b", "qlora", 31.0), ("c", "multitune+grouped", 7.0)}
    assert unevaluated(results) == []


def test_a_record_is_never_replaced_and_a_section_is_taken_once(outs, tmp_path):
    results = tmp_path / "results"
    args = [*map(str, outs), "--results", str(results), "--date", "2026-12-01T0930"]
    gpu_record.main(args)
    before = (results / "2026-12-01T0930-h200-gpu-check.json").read_text()
    with pytest.raises(SystemExit, match="exists; pass another --date"):
        gpu_record.main(args)
    assert (results / "2026-12-01T0930-h200-gpu-check.json").read_text() == before
    with pytest.raises(SystemExit, match="section.s. a, b in more than one folder"):
        gpu_record.main([str(outs[0]), str(outs[0]), "--results", str(results), "--date", "2026-12-02T0000"])
    with pytest.raises(SystemExit, match="no section-"):
        gpu_record.main([str(tmp_path), "--results", str(results)])
