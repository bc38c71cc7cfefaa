"""What a relaunch does with its run directory: resume, say it is finished, or refuse a change that alters the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.rundir import RunDir
from multitune.training.stages import refuse_unresumable


def _cfg(tmp_path, **changes):
    raw = {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": "m"}, "tasks": [{"name": "claims", "dataset": "d"}]}
    cfg = config_from_dict(raw)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={key: value})})
    return cfg


def _recorded(tmp_path, finished: bool) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.write_config(_cfg(tmp_path))  # as `train` records it
    if finished:
        run.mark_done()
    return run


HARMLESS = [
    {"eval__batch_size": 4}, {"eval__mode": "generate"}, {"train__logging_steps": 1}, {"train__save_steps": 7},
    {"train__save_minutes": 5.0}, {"train__save_total_limit": 5}, {"train__report_to": "wandb"}, {"hub__private": False},
    {"train__eval_steps": 3}, {"train__eval_rows_during_training": 0}, {"train__dataloader_workers": 2},
    {"model__attn_implementation": "eager"},  # the same attention, another kernel: rounding only
]
RESULT_CHANGING = [{"train__learning_rate": 1.0}, {"train__epochs": 9.0}, {"peft__r": 4}, {"model__max_length": 64}]


@pytest.mark.parametrize("changes", HARMLESS, ids=lambda c: next(iter(c)))
def test_an_unfinished_run_resumes_despite_harmless_changes(tmp_path, changes):
    run = _recorded(tmp_path, finished=False)
    relaunch = run.check(_cfg(tmp_path, **changes), resume=True, overwrite=False)
    assert relaunch.mode == "resume" and relaunch.changed == (next(iter(changes)).replace("__", "."),)


@pytest.mark.parametrize("changes", RESULT_CHANGING, ids=lambda c: next(iter(c)))
def test_a_change_to_what_is_trained_is_refused(tmp_path, changes):
    run = _recorded(tmp_path, finished=False)
    with pytest.raises(UserError, match="different config"):
        run.check(_cfg(tmp_path, **changes), resume=True, overwrite=False)
    finished = RunDir(tmp_path / "done")
    finished.root.mkdir()
    finished.config.write_text(run.config.read_text())
    finished.mark_done()
    with pytest.raises(UserError, match="holds a finished run with a different config"):
        finished.check(_cfg(tmp_path, **changes).model_copy(update={"run_dir": finished.root}), resume=True, overwrite=False)


def test_the_batch_layout_may_change_when_resuming(tmp_path):
    # checked against the checkpoint's global batch in train.py (grad_accum_for_resume)
    run = _recorded(tmp_path, finished=False)
    assert run.check(_cfg(tmp_path, train__batch_size=4, train__grad_accum=2), resume=True, overwrite=False).mode == "resume"


def test_relaunching_a_finished_run_is_a_no_op(tmp_path):
    run = _recorded(tmp_path, finished=True)
    assert run.check(_cfg(tmp_path), resume=True, overwrite=False).mode == "finished"
    assert run.check(_cfg(tmp_path, eval__batch_size=4, train__report_to="wandb"), resume=True, overwrite=False).mode == "finished"
    assert run.check(_cfg(tmp_path, train__learning_rate=1.0), resume=True, overwrite=True).mode == "new"
    with pytest.raises(UserError, match="holds a finished run"):  # --no-resume asks to train again: --overwrite says so
        run.check(_cfg(tmp_path), resume=False, overwrite=False)


def test_a_moved_run_directory_still_resumes(tmp_path):
    run = _recorded(tmp_path, finished=False)
    moved = tmp_path / "moved"
    run.root.rename(moved)
    assert RunDir(moved).check(_cfg(tmp_path).model_copy(update={"run_dir": moved}), resume=True, overwrite=False).mode == "resume"


@pytest.mark.parametrize("changes,fragment", [
    ({"peft__method": "prompt_tuning"}, "cannot run under FSDP"),
    ({"peft__method": "prefix_tuning"}, "cannot run under FSDP"),
    ({"peft__method": "full", "train__save_on_each_node": True}, "save_on_each_node with FSDP full fine-tuning cannot resume"),
])
def test_fsdp_combinations_that_cannot_resume_are_refused(tmp_path, monkeypatch, changes, fragment):
    cfg = _cfg(tmp_path, **changes)
    refuse_unresumable(cfg)  # without FSDP: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=fragment):
        refuse_unresumable(cfg)
    refuse_unresumable(_cfg(tmp_path, train__save_on_each_node=True))  # an adapter: each node keeps a whole copy


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_recorded_before_a_config_key_existed_relaunches(tmp_path, finished):
    """A key added since the run was recorded (data.drop_unlabelled) at its default is no change: the same
    command still resumes, or says the run is finished."""
    import yaml

    run = _recorded(tmp_path, finished=finished)
    raw = yaml.safe_load(run.config.read_text())
    del raw["data"]["drop_unlabelled"]
    run.config.write_text(yaml.safe_dump(raw))  # as an earlier version wrote it: no header line, beside its split
    run.splits.mkdir()
    relaunch = run.check(_cfg(tmp_path), resume=True, overwrite=False)
    assert relaunch.mode == ("finished" if finished else "resume") and relaunch.changed == ()
    with pytest.raises(UserError, match=r"different config \(data.drop_unlabelled\)"):
        run.check(_cfg(tmp_path, data__drop_unlabelled=False), resume=True, overwrite=False)


OLD_RUN = Path(__file__).parent / "data" / "run_4e5d656"


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_the_version_at_4e5d656_recorded_relaunches_with_the_same_command(tmp_path, capsys, finished):
    """A run in flight when multitune was upgraded: its config.yaml as that version wrote it (no key added since,
    model.attn_implementation sdpa, the default then; auto now), relaunched with the same config file. It resumes
    (a notice says the attention kernel changed), or says it is finished; a change to what it trains is still refused."""
    from multitune.config import load_config
    from multitune.tasks import resolve_tasks
    from multitune.training.args import sft_config
    from multitune.training.stages import plan_launch

    run = RunDir(tmp_path / "myrun")
    run.splits.mkdir(parents=True)
    run.config.write_text((OLD_RUN / "config.yaml").read_text())
    if finished:
        run.mark_done()
    cfg = resolve_tasks(load_config(OLD_RUN / "config.user.yaml", [f"run_dir={run.root}"]))  # the same command today
    assert cfg.model.attn_implementation == "auto"
    relaunch = run.check(cfg, resume=True, overwrite=False)
    assert relaunch.mode == ("finished" if finished else "resume")
    assert set(relaunch.changed) == {"run_dir", "model.attn_implementation"}
    if not finished:
        assert plan_launch(cfg, run, sft_config(cfg, run), resume=True, overwrite=False).mode == "resume"
        assert "notice: model.attn_implementation=auto differs" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"different config \(train.learning_rate\)"):
        run.check(cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1.0})}), resume=True, overwrite=False)
