"""train.keep_best under 2-process FSDP2 on CPU: the ranks agree on the kept step (a disagreement would hang or
save on one rank only), every rank loads its whole adapter checkpoint, and final/ is that checkpoint's adapter;
each task's training loss is summed over the ranks."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.distributed.conftest import accelerate_fsdp, config, edit

pytestmark = pytest.mark.slow


def test_fsdp_ranks_keep_the_same_best_step_and_final_holds_its_adapter(assets, tmp_path):
    path = edit(config(assets, tmp_path, "kb", batch_size=4), eval_steps=2, save_steps=100, save_total_limit=2,
                eval_rows_during_training=8, keep_best="task:claims", learning_rate=1e-2)
    proc = accelerate_fsdp(str(path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "kb"
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    scored = [(r["eval_claims_accuracy"], r["step"]) for r in history if "eval_claims_accuracy" in r]
    best = max(scored, key=lambda a_s: (a_s[0], -a_s[1]))[1]
    assert json.loads((run / "metrics.json").read_text())["claims"]["checkpoint_step"] == best
    final = load_file(str(run / "final" / "adapter_model.safetensors"))
    kept = load_file(str(run / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors"))
    assert final.keys() == kept.keys() and all((final[k] == kept[k]).all() for k in final)
    rows = [r for r in history if "loss" in r]
    assert rows and all("loss/claims" in r or "loss/banking77" in r for r in rows)
