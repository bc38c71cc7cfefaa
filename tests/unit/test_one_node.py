"""One node must not hang the others (issue 16, item 10).

A check that fails on one node only (a package, a GPU, a token it lacks), or a signal that reaches one node
only, must reach every rank through one agreement that every rank enters. In one process the agreement
helpers are no-ops, so these tests put a fake second rank behind them (multitune.distributed.all_gather,
max_over_ranks) and record what this rank brings to the agreement. tests/distributed/ runs real ranks.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from multitune import distributed
from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.training import checkpoints


@pytest.fixture
def world(monkeypatch):
    """A second rank behind the collectives: ``world.other`` is its outcome (None: it found nothing wrong)
    and ``world.signal`` its signal number (0: none); ``world.gathered`` is what this rank brought."""
    w = SimpleNamespace(other=None, signal=0, gathered=[])

    def all_gather(obj):
        w.gathered.append(obj)
        # an agreement's outcome (None: fine, or a refusal) is the other rank's own; what else is gathered (the
        # kernels a node has) the other rank brings alike
        return [obj, w.other if obj is None or isinstance(obj, str) else obj]

    def max_over_ranks(value):
        return max(value, w.signal)

    monkeypatch.setattr(distributed, "all_gather", all_gather)
    monkeypatch.setattr(distributed, "max_over_ranks", max_over_ranks)
    monkeypatch.setattr(checkpoints, "max_over_ranks", max_over_ranks)
    monkeypatch.setattr(checkpoints, "any_rank", lambda flag: bool(max_over_ranks(int(flag))))
    return w


def _cfg(tmp_path, **update):
    d = {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": "m"}, "peft": {"method": "lora"},
         "tasks": [{"name": "claims", "dataset": "d"}]}
    for key, value in update.items():
        d[key] = {**d.get(key, {}), **value}
    return config_from_dict(d)


# ---------------------------------------------------------------- checks that can fail on one node only


def _no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no stored login either


def _lacks_flash_attn(monkeypatch, tmp_path):
    from multitune.training import stages

    def missing(cfg):
        raise UserError("model.attn_implementation=flash_attention_2 needs the flash-attn package")

    monkeypatch.setattr(stages, "check_requirements", missing)
    return {}, "needs the flash-attn package"


def _four_gpus(monkeypatch, tmp_path):
    from trl import SFTConfig

    monkeypatch.setattr(SFTConfig, "n_gpu", property(lambda self: 4))
    return {}, "4 GPUs are visible to one process"


def _liger_without_cuda(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("Liger can run here: this node would not refuse")
    return {"train": {"liger": True}}, "train.liger=true needs a CUDA GPU"


def _hub_checkpoints_without_token(monkeypatch, tmp_path):
    _no_token(monkeypatch, tmp_path)
    return {"train": {"hub_checkpoints": True}, "hub": {"repo_id": "me/tuned"}}, "train.hub_checkpoints needs a Hugging Face token"


@pytest.mark.parametrize("lacking", [_lacks_flash_attn, _four_gpus, _liger_without_cuda, _hub_checkpoints_without_token])
def test_a_check_that_fails_on_this_node_only_goes_through_the_agreement(tmp_path, monkeypatch, world, lacking):
    """The other rank passed its checks and waits in the agreement: this rank's refusal must reach it there."""
    from multitune.launch.runner import train

    update, message = lacking(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=message):
        train(_cfg(tmp_path, **update))
    assert any(isinstance(g, str) and message in g for g in world.gathered), world.gathered
    assert not (tmp_path / "run").exists()


def test_the_hub_fetch_takes_a_missing_token_to_the_agreement(tmp_path, monkeypatch, world):
    from multitune.rundir import RunDir
    from multitune.training.hub_checkpoints import fetch_newest_checkpoint

    _no_token(monkeypatch, tmp_path)
    cfg = _cfg(tmp_path, train={"hub_checkpoints": True}, hub={"repo_id": "me/tuned"})
    with pytest.raises(UserError, match="needs a Hugging Face token"):
        fetch_newest_checkpoint(cfg, RunDir(tmp_path / "run"), SimpleNamespace(is_local_main_process=True))
    assert len(world.gathered) == 1 and "needs a Hugging Face token" in world.gathered[0]


# ---------------------------------------------------------------- a signal that reaches one node only


def _fake_trainer(stop, *, signal_after_last_step: bool):
    """Trainer's callback order for a run of two steps; the signal lands after the last step's agreement."""
    args, state, control = SimpleNamespace(), SimpleNamespace(global_step=0), SimpleNamespace()

    def train(resume_from_checkpoint=None):
        stop.on_train_begin(args, state, control)
        for _ in range(2):
            state.global_step += 1
            control.should_save = control.should_training_stop = False
            stop.on_step_end(args, state, control)
            if control.should_training_stop:
                break
        if signal_after_last_step:
            os.kill(os.getpid(), signal.SIGTERM)
        stop.on_train_end(args, state, control)

    return SimpleNamespace(train=train, callback_handler=SimpleNamespace(callbacks=[stop]), state=state)


@pytest.fixture
def launch_stop():
    """The launch's hold on the signal handlers, as multitune.launch.runner keeps it."""
    with checkpoints.STOP.held():
        yield checkpoints.STOP


def test_a_signal_after_the_last_step_on_one_node_does_not_skip_the_final_save(world):
    """The other rank got no signal: it finished training and enters the final save's collectives; so must this one."""
    from multitune.training.stages import fit

    trainer = _fake_trainer(checkpoints.GracefulStop(), signal_after_last_step=True)
    assert fit(trainer, None) is True
    assert trainer.state.global_step == 2


def test_the_handler_stays_for_the_launch_and_the_stop_waits_for_the_next_boundary(world, launch_stop):
    from multitune.training.stages import fit

    assert fit(_fake_trainer(checkpoints.GracefulStop(), signal_after_last_step=True), None) is True
    # the handler is still there after training (a signal in the final save must not kill silently) ...
    assert signal.getsignal(signal.SIGTERM) == launch_stop._handle
    # ... and the stop is decided where every rank asks: the next stage boundary
    assert launch_stop.agreed() is True


def test_a_signal_on_the_other_node_stops_this_one_at_the_same_boundary(world, launch_stop):
    from multitune.training.stages import fit

    assert fit(_fake_trainer(checkpoints.GracefulStop(), signal_after_last_step=False), None) is True
    assert launch_stop.agreed() is False
    world.signal = signal.SIGTERM  # the other node got one after its last step
    assert launch_stop.agreed() is True


def test_a_signal_during_training_on_the_other_node_stops_both_with_a_checkpoint(world, launch_stop):
    from multitune.training.stages import fit

    world.signal = signal.SIGTERM
    trainer = _fake_trainer(checkpoints.GracefulStop(), signal_after_last_step=False)
    assert fit(trainer, None) is False
    assert trainer.state.global_step == 1


def test_a_signal_in_the_final_stages_stops_the_launch_cleanly_before_the_report(tmp_path, monkeypatch, world, capsys):
    """A signal while the last part is saved or evaluated: that stage finishes, the report is not started,
    the launch returns (status 0) saying how to continue, and the handlers are given back."""
    from multitune.launch import runner
    from multitune.training.stages import Launch

    reported, before = [], signal.getsignal(signal.SIGTERM)

    def fake_train_part(kind, cfg, part, launch, setup, *chosen, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # during the final save
        return "model"

    kind = SimpleNamespace(check=lambda cfg: None, before_prepare=lambda cfg: None, prepared=lambda s: s,
                           evaluate=lambda *a: {"claims": {"accuracy": 1.0}})
    monkeypatch.setattr(runner, "part_kind", lambda cfg: kind)
    monkeypatch.setattr(runner, "plan_launch", lambda *a, **k: Launch("new", None, 1))
    monkeypatch.setattr(runner, "prepare_run", lambda *a, **k: SimpleNamespace(prepared=None))  # no auto batch: unread
    monkeypatch.setattr(runner, "train_part", fake_train_part)
    monkeypatch.setattr(runner, "trained_step", lambda part: 2)
    monkeypatch.setattr(runner, "report", lambda *a, **k: reported.append(a) or {"claims": {}})
    caught = []
    signal.signal(signal.SIGTERM, lambda *a: caught.append(a))  # what was there before the launch
    try:
        assert runner.train(_cfg(tmp_path)) == {}
        assert not reported
        assert "run the same command again" in capsys.readouterr().out
        assert not caught  # the launch's handler had it, not the one before
        assert signal.getsignal(signal.SIGTERM) not in (checkpoints.STOP._handle, signal.SIG_DFL)  # given back
    finally:
        signal.signal(signal.SIGTERM, before)


# ---------------------------------------------------------------- uploads never stop training


def test_a_failure_while_staging_an_upload_is_a_warning(tmp_path, monkeypatch, capsys):
    from multitune.rundir import RunDir
    from multitune.training import hub_checkpoints

    run = RunDir(tmp_path / "myrun")
    cfg = _cfg(tmp_path, train={"hub_checkpoints": True}, hub={"repo_id": "me/tuned"})
    monkeypatch.setattr(hub_checkpoints, "read_marker", lambda folder: {})  # a complete checkpoint, as far as on_save asks

    def full_disk(folder, staging):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub_checkpoints, "_stage", full_disk)
    cb = hub_checkpoints.HubCheckpoints(cfg, run)
    control = SimpleNamespace()
    assert cb.on_save(SimpleNamespace(output_dir=str(run.checkpoints)), SimpleNamespace(global_step=4, is_world_process_zero=True),
                      control) is control
    out = capsys.readouterr().out
    assert "warning:" in out and "checkpoint-4" in out and "No space left on device" in out


# ---------------------------------------------------------------- files a crash must not leave half written


def _crash_mid_write(monkeypatch):
    """Every file write dies half way through (the process killed while writing): Path.write_text, and the file
    objects multitune.files opens for its atomic writes."""
    import builtins

    from multitune import files

    real_write_text, real_open = Path.write_text, builtins.open

    def half(self, text, *a, **k):
        real_write_text(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half)
    monkeypatch.setattr(files, "open", lambda *a, **k: HalfFile(real_open(*a, **k)), raising=False)


def test_a_split_is_never_left_half_written(tmp_path, monkeypatch):
    """A relaunch keeps a split file that exists: a truncated one would break every later resume."""
    from multitune.data.load import save_splits

    td = SimpleNamespace(task=SimpleNamespace(name="claims"), split={"train": list(range(50)), "validation": [50, 51]})
    _crash_mid_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_splits([td], tmp_path / "splits")
    monkeypatch.undo()
    assert not (tmp_path / "splits" / "claims.json").exists()
    save_splits([td], tmp_path / "splits")  # the relaunch
    assert json.loads((tmp_path / "splits" / "claims.json").read_text()) == td.split


def test_metrics_are_never_left_half_written(tmp_path, monkeypatch):
    from multitune.results import report

    old = {"claims": {"accuracy": 0.5}}
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    monkeypatch.setattr(report, "write_plots", lambda *a: {})
    _crash_mid_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        report.write_results(tmp_path, {"claims": {"kind": "classification", "accuracy": 0.9, "per_class": {}}}, "run")
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == old
