"""Non-finite numbers never reach a metrics file, and a checkpoint of non-finite weights is never resumed (the
one before it is, with a warning)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.rundir import RunDir
from multitune.results.report import write_results
from multitune.training.args import sft_config
from multitune.training.manifest import write_marker
from multitune.training.stages import plan_launch


def strict_load(text: str):
    """What a strict JSON reader (JavaScript's JSON.parse, jq, Go) accepts: no NaN or Infinity literals."""
    def refuse(literal):
        raise ValueError(f"not JSON: {literal}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_json_holds_no_nan_literal(tmp_path):
    results = {"chat": {"kind": "chat", "n": 3, "loss": math.nan, "perplexity": math.inf}}
    write_results(tmp_path, results, "header")
    metrics = strict_load((tmp_path / "metrics.json").read_text())
    assert metrics == {"chat": {"kind": "chat", "n": 3, "loss": None, "perplexity": None}}


def _run_with_checkpoint(tmp_path, weights: torch.Tensor, step: int = 4):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": "m"},
                            "tasks": [{"name": "claims", "dataset": "d"}], "train": {"batch_size": 4, "grad_accum": 1}})
    run = RunDir(tmp_path / "run")
    if not run.config.exists():
        run.prepare(cfg, resuming=False)  # an unfinished run as `train` records it
    folder = run.checkpoints / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"base_model.model.layer.lora_A.weight": torch.ones(4, 4), "base_model.model.layer.lora_B.weight": weights},
              str(folder / "adapter_model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"python": None}, folder / "rng_state.pth")
    # complete as multitune's own save marks it: the layout and a manifest of every file (training.manifest)
    write_marker(folder, {"global_step": step, "world_size": 1, "batch_size": 4, "grad_accum": 1})
    return cfg, run, folder


def test_a_checkpoint_whose_weights_hold_nan_is_skipped_for_the_one_before_with_a_warning(tmp_path, capsys):
    """A relaunch (a pod start script reruns it) never stops on it, as on a damaged checkpoint: it resumes from the
    previous complete one, and the NaN one, written by an older version or damaged, is kept."""
    _, _, previous = _run_with_checkpoint(tmp_path, torch.zeros(4, 4), step=2)
    w = torch.zeros(4, 4)
    w[1, 2] = math.nan
    cfg, run, folder = _run_with_checkpoint(tmp_path, w, step=4)
    launch = plan_launch(cfg, run, sft_config(cfg, run), resume=True, overwrite=False)
    assert launch.mode == "resume" and launch.checkpoint == previous
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:") and str(folder) in line]
    assert warning and "lora_B" in warning[0] and "NaN" in warning[0]
    assert (folder / "adapter_model.safetensors").exists()  # skipped, not deleted


def test_a_lone_checkpoint_whose_weights_hold_nan_is_not_resumed(tmp_path, capsys):
    w = torch.zeros(4, 4)
    w[1, 2] = math.inf
    cfg, run, folder = _run_with_checkpoint(tmp_path, w)
    launch = plan_launch(cfg, run, sft_config(cfg, run), resume=True, overwrite=False)
    assert launch.checkpoint is None and str(folder) in capsys.readouterr().out
    assert (folder / "adapter_model.safetensors").exists()


def test_a_checkpoint_with_finite_weights_resumes(tmp_path):
    cfg, run, folder = _run_with_checkpoint(tmp_path, torch.zeros(4, 4))
    launch = plan_launch(cfg, run, sft_config(cfg, run), resume=True, overwrite=False)
    assert launch.mode == "resume" and launch.checkpoint == folder


def test_a_run_whose_final_weights_hold_nan_is_never_pushed(tmp_path):
    from multitune.publishing.publish import push

    w = torch.zeros(4, 4)
    w[0, 0] = math.inf
    cfg, run, folder = _run_with_checkpoint(tmp_path, w)
    folder.rename(run.final)  # a run finished by a version that kept NaN weights
    run.mark_done()
    cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"repo_id": "me/tuned"})})
    with pytest.raises(UserError, match="non-finite"):
        push(run, cfg, dry_run=tmp_path / "upload")
    assert not (tmp_path / "upload").exists()
