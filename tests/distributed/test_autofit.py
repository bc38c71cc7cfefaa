"""train.batch_size: auto under 2-process DDP when only one rank runs out of memory: every rank takes the same
decision (the probe's step down, or the back-off at step 3), none is left waiting in a collective, and the run
ends where the uninterrupted 1-process run with the same global batch of 8 ends."""

from __future__ import annotations

import json
import sys

import pytest

from tests.distributed.conftest import HERE, config, free_port, launch
from tests.distributed.test_resume import assert_ends_like

pytestmark = pytest.mark.slow
SHIM = HERE / "injected_oom.py"


def torchrun_with_oom(cfg, oom: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(SHIM),
           "train", str(cfg)]
    # steps 5 and 6 of 6 run past the watched ones: DDP's own reduction again, each micro-batch as two halves
    return launch(cmd, {"MULTITUNE_TEST_OOM": oom, "MULTITUNE_GPU_MEMORY_GIB": "64", "MULTITUNE_TEST_WATCH_STEPS": "4"})


@pytest.mark.parametrize("oom,expected", [
    ("1:2:1", "auto-fit probe: out of memory at micro-batch 4"),  # rank 1's probe fails at 4 rows: both step down to 2
    ("1:2:4", "out of memory at step 3 (micro-batch 4 x 1 accumulation): continuing at micro-batch 2 x 2"),
], ids=["probe", "step-3"])
def test_one_rank_out_of_memory_is_every_rank_s_decision(assets, tmp_path, single_run, oom, expected):
    cfg = config(assets, tmp_path, "auto", batch_size="auto", global_batch_size=8)  # 4 examples a rank a step
    proc = torchrun_with_oom(cfg, oom)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "micro-batch 4 x 1 accumulation x 2 process(es)" in proc.stdout and expected in proc.stdout
    facts = json.loads((tmp_path / "auto" / "launch.json").read_text())
    assert (facts["per_device_train_batch_size"], facts["gradient_accumulation_steps"], facts["world_size"]) == (2, 2, 2)
    assert_ends_like(tmp_path / "auto", single_run)
