"""FSDP2 with the shipped accelerate config, on 2 CPU processes (gloo) through the test-only shim.

accelerate runs its FSDP config as plain DDP on CPU; tests/distributed/fsdp_on_cpu.py lets it really
shard (fully_shard per decoder layer). Each test asserts that FSDP ran. The shared run (fsdp_run) is in
conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.training.checkpoints import is_complete
from multitune.data.load import load_tasks
from multitune.data.formatting import Formatter
from multitune.modeling.load import load_for_inference, load_tokenizer
from multitune.rundir import RunDir
from multitune.scoring.scorer import Scorer
from tests.distributed.conftest import accelerate_fsdp, cli, config, losses

pytestmark = pytest.mark.slow


def test_fsdp2_really_ran_and_matches_one_process(fsdp_run, single_run):
    facts = json.loads((fsdp_run / "launch.json").read_text())
    assert facts["distributed_type"] == "FSDP" and facts["is_fsdp"] and facts["world_size"] == 2
    assert facts["wrapped_model"].startswith("FSDP")  # FSDP2 swaps the class in place: FSDPPeftModelForCausalLM
    # 2 ranks x 4 = the single run's batch of 8: the same losses, up to float summation order
    assert losses(fsdp_run) == pytest.approx(losses(single_run), rel=1e-4)


def test_adapter_checkpoints_are_whole_and_equal_the_final_adapter(fsdp_run, single_run):
    # the trainable state is gathered whole into every checkpoint (not per-rank DCP shards): any node, any
    # number of processes can resume from it (tests/distributed/test_resume.py)
    ckpt = fsdp_run / "checkpoints" / "checkpoint-6"
    assert is_complete(ckpt) and not (ckpt / "pytorch_model_fsdp_0").exists()
    final = load_file(str(fsdp_run / "final" / "adapter_model.safetensors"))
    single = load_file(str(single_run / "final" / "adapter_model.safetensors"))
    assert final.keys() == single.keys() and len(final) > 0
    assert all(final[k].shape == single[k].shape for k in final)  # full tensors, not one rank's rows
    assert max((final[k] - single[k]).abs().max().item() for k in final) < 1e-5
    assert all(final[k].abs().sum() > 0 for k in final if "lora_B" in k)  # every B moved off its zero init
    gathered = load_file(str(ckpt / "adapter_model.safetensors"))
    # exact: the last checkpoint and final/ are two saves of the same parameters at the same step (copies, no arithmetic)
    assert gathered.keys() == final.keys() and all(torch.equal(gathered[k], final[k]) for k in final)
    # the optimizer's moments, gathered whole, in the layout Trainer loads without FSDP: one entry per tensor
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sorted(s["exp_avg"].numel() for s in optim["state"].values()) == sorted(t.numel() for t in final.values())


def test_timed_checkpoint_is_taken_by_both_ranks_at_the_same_step(fsdp_run):
    # rank 1 alone found a checkpoint due at step 1 (its clock skewed); the ranks agreed, and both saved
    first = fsdp_run / "checkpoints" / "checkpoint-1"
    assert (first / "rng_state_0.pth").exists() and (first / "rng_state_1.pth").exists() and is_complete(first)
    for ckpt in (fsdp_run / "checkpoints").glob("checkpoint-*"):
        assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}, ckpt


def test_saves_gather_only_the_trainable_parameters(fsdp_run):
    """An 8B model's full state dict is 16 GB, its LoRA adapter 84 MB: the saves gather the adapter only."""
    trainable = sum(t.numel() for t in load_file(str(fsdp_run / "final" / "adapter_model.safetensors")).values())
    model = sum(t.numel() for t in load_file(str(Path(yaml.safe_load((fsdp_run / "config.yaml").read_text())["model"]["name_or_path"])
                                                   / "model.safetensors")).values())
    assert model > 5 * trainable  # (the tiny model's adapter is relatively large)
    for rank in (0, 1):
        counts = json.loads((fsdp_run.parent / "gathered" / f"rank{rank}.json").read_text())
        assert counts["final"] == [trainable]
        # each checkpoint: the adapter plus Adam's two moments, whole
        assert counts["checkpoint"] and all(n == 3 * trainable for n in counts["checkpoint"]), counts


def _predictions(run_root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Each task's (predicted, gold) validation labels, from the saved adapter loaded in this one process."""
    run = RunDir(run_root)
    cfg = run.load_config()
    formatter = Formatter(load_tokenizer(cfg.model, None, source=str(run.final)), cfg.model.max_length)
    scorer = Scorer(load_for_inference(cfg, run.final), formatter, batch_size=32)
    return {td.task.name: (scorer.predict_labels(td.val, td.task.label_names, "likelihood")[0], [ex.label for ex in td.val])
            for td in load_tasks(cfg, run.splits, create=False)}


def test_adapter_reloads_in_one_process_to_the_same_predictions(fsdp_run, single_run):
    reloaded = _predictions(fsdp_run)
    assert reloaded == _predictions(single_run)
    # and to the scores the 2 ranks computed on the sharded model at the end of training
    during = json.loads((fsdp_run / "metrics.json").read_text())
    for name, (pred, gold) in reloaded.items():
        assert during[name]["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold))


def test_qlora_under_fsdp2_trains_like_one_process(assets, tmp_path):
    """4-bit weights stored in the compute dtype, so FSDP2 can shard them next to the bf16 ones."""
    runs = {}
    for name, batch in (("single", 8), ("fsdp", 4)):
        path = config(assets, tmp_path, name, batch_size=batch)
        raw = yaml.safe_load(path.read_text())
        raw["peft"]["method"] = "qlora"
        path.write_text(yaml.safe_dump(raw))
        proc = accelerate_fsdp(str(path)) if name == "fsdp" else cli(str(path))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        runs[name] = tmp_path / name
    assert json.loads((runs["fsdp"] / "launch.json").read_text())["distributed_type"] == "FSDP"
    # bf16 compute under 4-bit weights: equal up to bf16 rounding in the reductions
    assert losses(runs["fsdp"]) == pytest.approx(losses(runs["single"]), rel=1e-3)
    a = load_file(str(runs["single"] / "final" / "adapter_model.safetensors"))
    b = load_file(str(runs["fsdp"] / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-2


def test_supervised_positions_loss_equals_the_full_loss_under_fsdp2(assets, fsdp_run, tmp_path):
    """train.loss_positions: the fixture run (supervised, the default: the head runs inside the root forward
    on the gathered answer positions) against the same 2-process FSDP2 run on every position (TRL's path):
    the same losses and the same trained adapter, to 1e-5 in fp32."""
    proc = accelerate_fsdp(str(config(assets, tmp_path, "fsdp", batch_size=4, gradient_checkpointing=True, loss_positions="all")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    full = tmp_path / "fsdp"
    assert json.loads((full / "launch.json").read_text())["is_fsdp"]
    assert losses(fsdp_run) == pytest.approx(losses(full), rel=1e-5)
    ours = load_file(str(fsdp_run / "final" / "adapter_model.safetensors"))
    theirs = load_file(str(full / "final" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
