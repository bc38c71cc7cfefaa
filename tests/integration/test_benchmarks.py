"""The benchmark suite's pieces run end to end on the tiny assets (a few steps; no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.slow


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_training_sides_report_comparable_numbers(assets, tmp_path):
    raw = tiny_config(assets, tmp_path / "run", logging_steps=1, eval_rows_during_training=4, save_steps=1000)
    raw["tasks"] = raw["tasks"][:3]
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(raw))
    sides = {}
    for side in ("trl-defaults", "trl-expert", "multitune"):
        out = tmp_path / f"{side}.json"
        _run("benchmarks.train_speed", "--side", side, "--config", str(config), "--steps", "3", "--warmup", "1", "--out", str(out),
             "--eval-rows", "16")
        sides[side] = json.loads(out.read_text())
    for r in sides.values():
        assert r["steps"] == 3 and r["timed_steps"] == 2 and r["train_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["tokens"] < r["tokens_all_steps"]  # the timed window leaves the first step out
        assert 0 < r["val_answer_loss"] < 20
        # the shape the memory model needs, one entry per micro-batch trained; their real tokens are the counted ones
        shape = r["memory_shape"]
        assert len(shape["steps"]) == 3 * shape["grad_accum"] and shape["attention"] == "sdpa"
        assert sum(s["tokens"] for s in shape["steps"]) == r["tokens_all_steps"]
        assert all(0 < s["supervised"] <= s["tokens"] <= s["rows"] * s["length"] for s in shape["steps"])
    assert sides["trl-defaults"]["memory_shape"]["checkpointing"] and not sides["multitune"]["memory_shape"]["checkpointing"]
    # the same seed and batch size over the same train split: the same examples, so the same non-pad tokens
    assert len({r["tokens"] for r in sides.values()}) == 1
    expert, ours = sides["trl-expert"], sides["multitune"]
    assert not expert["bf16"] and not expert["gradient_checkpointing"]  # the expert's CPU settings
    # the same data, masks and fp32 updates: multitune's supervised-positions loss trains exactly as TRL's full one
    assert ours["val_answer_loss"] == pytest.approx(expert["val_answer_loss"], rel=1e-4)
    assert ours["val_answer_loss"] != pytest.approx(sides["trl-defaults"]["val_answer_loss"], rel=1e-3)


def test_data_prep_is_cold_then_cached(assets, tmp_path):
    raw = tiny_config(assets, tmp_path / "run")
    config = tmp_path / "prep.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {"MULTITUNE_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    runs = [json.loads(_run("benchmarks.data_prep", str(config), env=env).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert [r["cached"] for r in runs] == [False, True]
    assert runs[0]["tasks"] == runs[1]["tasks"] and runs[0]["train_rows"] == runs[1]["train_rows"] > 0


def _check_assets(assets, tmp_path: Path) -> Path:
    """The session's tiny assets in the layout of a gpu bundle's assets/ (data/TASK, tiny-model)."""
    given = tmp_path / "assets"
    (given / "data").mkdir(parents=True)
    for task in ("claims", "banking77", "commonsense_qa", "chat"):
        (given / "data" / task).symlink_to(assets[task])
    (given / "tiny-model").symlink_to(assets["model"])
    return given


def test_gpu_check_killed_after_the_first_side_keeps_that_sides_row(assets, tmp_path):
    """The device call killed at its limit (the whole tree, so no `finally` runs) once section a's second side has
    started: the first side's row is already in the output folder, which is what comes back, and its log says its
    speed; scripts/gpu_record.py puts the row into the record."""
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_record
    from processes import kill_tree

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "scripts/gpu_check.py", "--tiny", "--sections", "a", "--assets", str(_check_assets(assets, tmp_path)),
                             "--out", str(out), "--work", str(tmp_path / "work")], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    second = out / "logs" / "a-sides" / "side-trl-expert.log"  # opened once the first side has ended
    try:
        for _ in range(1200):  # a bound, not a timing: the first side takes well under 10 minutes
            if second.exists() or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert second.exists(), "section a never reached its second side"
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert "results" not in json.loads((out / "section-a.json").read_text())  # killed before the section noted its rows
    rows = json.loads((out / "gpu-a.json").read_text())["rows"]
    assert [r["side"] for r in rows] == ["multitune"]
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["memory_shape"]["steps"] and rows[0]["plan_gib"] > 0
    side_log = (out / "logs" / "a-sides" / "side-multitune.log").read_text()
    trained = json.loads(next(line for line in side_log.splitlines() if line.startswith("trained: ")).removeprefix("trained: "))
    assert trained["tokens"] == rows[0]["tokens"] and "result: " in side_log
    bench_log = next((out / "logs").glob("a-*benchmarks-gpu.log")).read_text()
    assert any(line.startswith("side multitune: ") and "tokens/s" in line for line in bench_log.splitlines())
    record = gpu_record.assemble([out])
    assert record["sections"]["a"]["results_from"] == "gpu-a.json"
    assert [r["side"] for r in record["sections"]["a"]["results"]["rows"]] == ["multitune"]


def test_the_head_share_comparison_gives_every_side_its_ratios(assets, tmp_path, capsys):
    """`make bench`'s second comparison (a model with a given head share) at a tiny width, 2 steps: every side gets both
    ratios, the honest ratio's sides run twice as in the main comparison, and the head share printed is the shape's."""
    from transformers import AutoTokenizer

    from benchmarks.__main__ import head_share_lines, head_share_training

    raw = tiny_config(assets, tmp_path / "run", logging_steps=1, eval_rows_during_training=0, save_steps=1000)
    raw["tasks"] = raw["tasks"][:3]
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(raw))
    d, i, layers, kv = 32, 64, 2, 16  # 2 heads of 16, 1 key/value head
    shape = {"hidden_size": d, "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1}
    vocab = len(AutoTokenizer.from_pretrained(assets["model"]))
    by_hand = d * vocab / (layers * (2 * d * d + 2 * d * kv + 3 * d * i) + d * vocab)
    result = head_share_training(config, tmp_path, steps=2, shape=shape)
    printed = capsys.readouterr().out
    assert abs(result["head_share"] - by_hand) < 1e-9 and f"({by_hand:.1%} of the matmul weights" in printed
    by = {r["side"]: r for r in result["rows"]}
    assert list(by) == ["trl-defaults", "trl-expert", "multitune"]
    assert {s: len(r["runs_tokens_per_s"]) for s, r in by.items()} == {"trl-defaults": 1, "trl-expert": 2, "multitune": 2}
    assert all(r["vs_trl-defaults"] > 0 and r["vs_trl-expert"] > 0 for r in by.values())
    lines = head_share_lines({"training_8b_head_share": result})
    assert len(lines) == 2 and all(f"head share ({by_hand:.1%})" in line for line in lines)


def test_gpu_check_writes_every_section_at_a_tiny_shape(assets, tmp_path):
    """`make gpu-check`'s script, every section (a-e) at a tiny shape on this CPU: each writes its JSON."""
    given = _check_assets(assets, tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--assets", str(given), "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sections = {n: json.loads((out / f"section-{n}.json").read_text()) for n in "abcde"}
    failed = {n: (r.get("error"), r["steps"][-1:]) for n, r in sections.items() if not r["ok"]}
    assert not failed, failed
    a = {r["side"]: r for r in sections["a"]["results"]["rows"]}
    assert list(a) == ["multitune", "trl-expert", "trl-defaults"]
    assert [t["target"] for t in sections["a"]["results"]["targets"]] == ["gpu_vs_trl_expert", "gpu_tokens_per_s", "gpu_memory_vs_plan"]
    assert all(r["mfu_measured"] > 0 and r["adapter_params"] > 0 for r in a.values())
    assert a["trl-expert"]["adapter_params"] == a["multitune"]["adapter_params"]  # the same LoRA on both sides
    # each optimizer step in 2 micro-batches on every side (how 8B fits an 80 GB card without checkpointing): what each
    # side's Trainer ran with, and the same tokens per optimizer step (packed rows hold about as many as 6 examples)
    assert {side: r["grad_accum"] for side, r in a.items()} == dict.fromkeys(a, 2) and a["trl-defaults"]["batch_size"] == 3
    per_step = {side: r["tokens"] / r["timed_steps"] for side, r in a.items()}
    assert max(per_step.values()) < 2 * min(per_step.values()), per_step
    assert all(r["plan_gib"] > 0 for r in a.values())  # the memory model's prediction beside each measured side
    assert [r["side"] for r in sections["b"]["results"]["rows"]] == ["qlora"]
    # the model is built once (by a) and loaded by b, from the shared models folder
    assert sections["a"]["results"]["model_built_here"] and not sections["b"]["results"]["model_built_here"]
    assert sections["a"]["results"]["model_dir"] == sections["b"]["results"]["model_dir"]
    # auto-fit on the same model: the choice is printed and what trained makes the global batch asked for (16)
    fit = sections["b"]["auto_fit"]
    assert any("micro-batch" in line for line in fit["said"]), fit
    assert fit["trained"]["per_device_train_batch_size"] * fit["trained"]["gradient_accumulation_steps"] == 16
    assert set(sections["c"]["summary"]) == {"multitune+grouped tokens/s", "multitune+grouped memory"}  # tiny: no Liger, no flex
    assert all(r["liger"] is False for r in sections["c"]["results"]["rows"])  # none applied on a CPU
    for n in "de":  # SIGTERM stopped the first run at a checkpoint, the same command resumed and finished
        facts = sections[n]["stop_resume"]
        assert facts["first"]["sigterm_sent"] and facts["resumed"] and facts["done"]
    assert sections["e"]["adapter_tensors"] > 0
    # every child's output is a file under the output folder (what comes back from a device call, even a killed one)
    for n, r in sections.items():
        assert all((out / "logs" / step["log"]).stat().st_size > 0 for step in r["steps"] if "log" in step), n
    assert {p.name for p in (out / "logs" / "a-sides").iterdir()} == {f"side-{s}.log" for s in a}
    summary = json.loads((out / "summary-runx.json").read_text())
    assert summary["sections"] == list("abcde") and "versions" in summary["environment"]
    assert "section" in proc.stdout.splitlines()[-6]  # the table comes last
