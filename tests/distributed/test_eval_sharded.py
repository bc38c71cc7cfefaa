"""Evaluation shared out over the ranks: under DDP (a full replica per rank) and under FSDP2 (a sharded
model, where every forward pass is a collective), each rank scores about half the rows, every rank makes
the same number of forward passes, and the gathered predictions are exactly those of one process.

tests/distributed/eval_ranks.py evaluates single_run's adapter: the label likelihoods (one trie pass),
the label-trie search (data-dependent decoding and rescoring), generation, constrained decoding and the
detailed evaluation (every label scored, per-row probabilities, calibration) on 9 rows (5 and 4), the
chat loss, and a task with one row, which leaves rank 1 without any.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.distributed.conftest import HERE, free_port, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(assets, single_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    script = [str(HERE / "eval_ranks.py"), str(single_run), "--chat", str(assets["chat"])]
    one = launch([sys.executable, script[0], str(out / "one"), *script[1:]])
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                  script[0], str(out / "two"), *script[1:]])
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    read = lambda name: json.loads((out / f"{name}.json").read_text())  # noqa: E731
    return {"one": read("one/replica-rank0"), **{s: [read(f"two/{s}-rank{r}") for r in (0, 1)] for s in ("replica", "fsdp2")}}


@pytest.mark.parametrize("setting", ["replica", "fsdp2"], ids=["ddp", "fsdp2"])
def test_two_ranks_predict_exactly_what_one_process_does(records, setting):
    one = records["one"]
    for rank in records[setting]:
        assert rank["world_size"] == 2
        assert rank["predictions"] == one["predictions"]  # every task, every mode, row for row
        for mode, results in one["results"].items():
            if mode == "search_rescored":
                continue
            for task, r in results.items():
                mine = rank["results"][mode][task]
                if r["kind"] == "chat":
                    assert mine["n"] == r["n"] and mine["loss"] == pytest.approx(r["loss"], rel=1e-6)
                else:
                    assert (mine["accuracy"], mine["confusion_matrix"]) == (r["accuracy"], r["confusion_matrix"])
                if mode == "detail":  # each row's text, gold, prediction and probability, in the one process's order
                    assert [(p["text"], p["gold"], p["predicted"]) for p in mine["predictions"]] == \
                        [(p["text"], p["gold"], p["predicted"]) for p in r["predictions"]]
                    assert [p["score"] for p in mine["predictions"]] == pytest.approx([p["score"] for p in r["predictions"]], abs=2e-4)
                    assert mine["ece"] == pytest.approx(r["ece"], abs=1e-3)
    assert one["results"]["search_rescored"] > 0  # the search's data-dependent rescoring ran


@pytest.mark.parametrize("setting", ["replica", "fsdp2"], ids=["ddp", "fsdp2"])
def test_each_rank_scores_half_the_rows_in_as_many_forward_passes(records, setting):
    one, ranks = records["one"], records[setting]
    assert ranks[0]["forwards"] == ranks[1]["forwards"]  # under FSDP, a difference is a hang
    assert ranks[0]["forwards"] < 0.75 * one["forwards"]  # evaluation gets faster with more GPUs
    for kind, counts in one["rows"].items():
        per_rank = [r["rows"][kind] for r in ranks]
        assert [a + b for a, b in zip(*per_rank, strict=True)] == counts
        assert all(abs(a - b) <= 1 for a, b in zip(*per_rank, strict=True))
    assert 0 in ranks[1]["rows"]["labels"]  # the one-row task: rank 1 had nothing to score and kept pace
