"""Hub checkpoints: the exact commit operations of an upload, and who uploads (main process only)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from safetensors.torch import save_file

from multitune.training import hub_checkpoints
from multitune.config import config_from_dict, dump_config
from multitune.training.checkpoints import CompleteMarker, is_complete, latest_complete
from multitune.errors import UserError
from multitune.training.hub_checkpoints import HubCheckpoints, commit_operations, wait_for_uploads
from multitune.rundir import RunDir
from tests.fake_hub import FakeHub, install


# a run that the version at commit 4e5d656 recorded and uploaded: the user's config, and that version's record of it
OLD_RUN = Path(__file__).parent / "data" / "run_4e5d656"


def fake_run(tmp_path: Path, steps=(4,), *, cfg=None, manifest=False, recorded: str | None = None) -> RunDir:
    """A run directory with checkpoints at ``steps``, its config that of ``cfg`` (default: :func:`_cfg`), or the
    text ``recorded`` (as an earlier version wrote it).

    manifest: marked by multitune's CompleteMarker (with the manifest); otherwise as before the manifest."""
    run = RunDir(tmp_path / "myrun")
    (run.splits).mkdir(parents=True)
    run.config.write_text(recorded or dump_config(cfg or _cfg(tmp_path)))
    (run.splits / "claims.json").write_text("{}")
    (run.root / "wandb_id").write_text("abc123")
    for step in steps:
        add_checkpoint(run, step, manifest=manifest)
    return run


def add_checkpoint(run: RunDir, step: int, *, manifest: bool) -> Path:
    ck = run.checkpoints / f"checkpoint-{step}"
    (ck / "sub").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(ck / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "rng_state.pth", "scheduler.pt"):  # whole torch files: what is_complete checks
        torch.save({"step": step, "moments": torch.randn(256)}, ck / name)
    (ck / "sub/x.bin").write_bytes(b"\0" * 8)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if manifest:
        args = SimpleNamespace(output_dir=str(run.checkpoints), should_save=True, world_size=1,
                               per_device_train_batch_size=4, gradient_accumulation_steps=1)
        CompleteMarker().on_save(args, SimpleNamespace(global_step=step), None)
    else:
        (ck / "COMPLETE").write_text("{}")
    return ck


@pytest.mark.parametrize("started_over", [True, False])
def test_upload_is_exactly_these_operations(tmp_path, started_over):
    run = fake_run(tmp_path, steps=(6,))
    ck = run.checkpoints / "checkpoint-6"
    # resumed: 9 is this run's own newer checkpoint (kept until the run gets there), 2 is beyond the newest 3.
    # The first upload of a run started over (--no-resume, --overwrite): 2, 4, 5 and 9 are all the earlier run's;
    # kept, a fresh pod of this run would resume one of them (the newest, or an older one when 6 is damaged) with the
    # earlier run's weights, optimizer and data position
    ops = commit_operations(run, ck, 6, remote_steps=[2, 4, 5, 9], keep=3, started_over=started_over)
    p = "myrun/checkpoints/checkpoint-6"
    expected = [
        ("add", "myrun/config.yaml", run.config), ("add", "myrun/splits/claims.json", run.splits / "claims.json"),
        ("add", "myrun/wandb_id", run.root / "wandb_id"),
        ("add", f"{p}/adapter_model.safetensors", ck / "adapter_model.safetensors"), ("add", f"{p}/optimizer.pt", ck / "optimizer.pt"),
        ("add", f"{p}/rng_state.pth", ck / "rng_state.pth"), ("add", f"{p}/scheduler.pt", ck / "scheduler.pt"),
        ("add", f"{p}/sub/x.bin", ck / "sub/x.bin"), ("add", f"{p}/trainer_state.json", ck / "trainer_state.json"),
        ("add", f"{p}/COMPLETE", ck / "COMPLETE"),  # last, although a commit is atomic anyway
        ("delete", "myrun/checkpoints/checkpoint-2/", None),  # resumed: newest 3 kept: 6, 5, 4
    ] + ([("delete", f"myrun/checkpoints/checkpoint-{s}/", None) for s in (4, 5, 9)] if started_over else [])
    got = [("add", o.path_in_repo, Path(o.path_or_fileobj)) if isinstance(o, CommitOperationAdd) else ("delete", o.path_in_repo, None)
           for o in ops]
    assert got == expected
    assert all(o.is_folder for o in ops if isinstance(o, CommitOperationDelete))


def _cfg(tmp_path, **train):
    return config_from_dict({"run_dir": str(tmp_path / "myrun"), "model": {"name_or_path": "x"}, "tasks": [{"name": "claims"}],
                             "train": {"hub_checkpoints": True, "save_total_limit": 2, **train}, "hub": {"repo_id": "me/tuned"}})


def test_callback_uploads_complete_checkpoints_from_the_main_process_only(tmp_path, monkeypatch):
    run = fake_run(tmp_path, steps=(2, 4, 6))
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    cb = HubCheckpoints(_cfg(tmp_path), run)
    args = SimpleNamespace(output_dir=str(run.checkpoints))
    cb.on_save(args, SimpleNamespace(global_step=2, is_world_process_zero=False), None)  # another rank: nothing
    wait_for_uploads()
    assert hub.commits == []
    (run.checkpoints / "checkpoint-4" / "COMPLETE").unlink()  # not complete: not uploaded
    for step in (2, 4, 6):
        cb.on_save(args, SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    wait_for_uploads()
    assert hub.repos == {"me/tuned-checkpoints": True}  # private
    assert [c[2] for c in hub.commits] == ["myrun: checkpoint-2", "myrun: checkpoint-6"]
    files = hub.files("me/tuned-checkpoints")
    assert "myrun/checkpoints/checkpoint-6/COMPLETE" in files and "myrun/config.yaml" in files
    assert {f.split("/")[2] for f in files if "/checkpoints/" in f} == {"checkpoint-2", "checkpoint-6"}
    assert not (run.root / ".hub-upload" / "checkpoint-6").exists()  # staging cleaned up


def test_upload_survives_rotation_of_the_original(tmp_path, monkeypatch):
    """The staged hard links keep the files even when Trainer deletes the checkpoint before the upload runs."""
    run = fake_run(tmp_path, steps=(2,))
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    staged = hub_checkpoints._stage(run.checkpoints / "checkpoint-2", run.root / ".hub-upload")
    import shutil

    shutil.rmtree(run.checkpoints / "checkpoint-2")
    HubCheckpoints(_cfg(tmp_path), run)._upload(staged, 2)
    assert "myrun/checkpoints/checkpoint-2/optimizer.pt" in hub.files("me/tuned-checkpoints")


def test_a_failed_upload_is_a_warning_not_a_crash(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path, steps=(2,))

    class Down(FakeHub):
        def create_commit(self, *a, **k):
            raise ConnectionError("Hub unreachable")

    install(monkeypatch, Down(tmp_path / "hub"))
    HubCheckpoints(_cfg(tmp_path), run).on_save(SimpleNamespace(output_dir=str(run.checkpoints)),
                                                SimpleNamespace(global_step=2, is_world_process_zero=True), None)
    wait_for_uploads()
    assert "warning: uploading checkpoint-2 to me/tuned-checkpoints failed (ConnectionError: Hub unreachable)" in capsys.readouterr().out


def test_hub_checkpoints_need_a_repo_and_a_token(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="train.hub_checkpoints needs hub.repo_id"):
        config_from_dict({"model": {"name_or_path": "x"}, "tasks": [{"name": "claims"}], "train": {"hub_checkpoints": True}})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no stored login either
    state = SimpleNamespace(is_local_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(UserError, match="needs a Hugging Face token"):
        hub_checkpoints.fetch_newest_checkpoint(_cfg(tmp_path), RunDir(tmp_path / "myrun"), state)
    assert not (tmp_path / "myrun").exists()


@pytest.mark.parametrize("failing", ["listing", "download"])
def test_an_unreachable_hub_on_a_fresh_pod_is_an_error_not_a_fresh_start(tmp_path, monkeypatch, failing):
    """Starting from step 0 instead would make the first upload delete the Hub's newer checkpoints."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    lost = fake_run(tmp_path / "lost-pod", steps=(4,))
    HubCheckpoints(_cfg(tmp_path), lost).on_save(SimpleNamespace(output_dir=str(lost.checkpoints)),
                                                 SimpleNamespace(global_step=4, is_world_process_zero=True), None)
    wait_for_uploads()
    assert "myrun/checkpoints/checkpoint-4/COMPLETE" in hub.files("me/tuned-checkpoints")

    def unreachable(*a, local_dir=None, **k):
        if local_dir:  # a download cut off half way
            (Path(local_dir) / "myrun").mkdir(parents=True)
            (Path(local_dir) / "myrun" / "config.yaml").write_text("partial")
        raise ConnectionError("Hub unreachable")

    if failing == "listing":
        monkeypatch.setattr(hub, "list_repo_tree", unreachable)
    else:
        monkeypatch.setattr(hub_checkpoints, "snapshot_download", unreachable)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    fresh = RunDir(tmp_path / "fresh-pod" / "myrun")
    fresh.root.parent.mkdir(parents=True)
    with pytest.raises(UserError, match="ConnectionError: Hub unreachable.*relaunch"):
        hub_checkpoints.fetch_newest_checkpoint(_cfg(tmp_path), fresh, SimpleNamespace(is_local_main_process=True))
    assert not fresh.checkpoints.exists()
    assert list((tmp_path / "fresh-pod").iterdir()) == []  # no half download left behind


def _upload_all(cfg, run: RunDir) -> None:
    """The run's checkpoints, uploaded in step order by its training (the lost pod's)."""
    cb = HubCheckpoints(cfg, run)
    args = SimpleNamespace(output_dir=str(run.checkpoints))
    for step in sorted(int(p.name.split("-")[1]) for p in run.checkpoints.glob("checkpoint-*")):
        cb.on_save(args, SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    wait_for_uploads()


def _hub_steps(hub) -> set[int]:
    return {int(f.split("/")[2].split("-")[1]) for f in hub.files("me/tuned-checkpoints") if "/checkpoints/" in f}


def _fetch(tmp_path, run, cfg=None, **launch):
    state = SimpleNamespace(is_local_main_process=True, is_main_process=True)
    return hub_checkpoints.fetch_newest_checkpoint(cfg or _cfg(tmp_path), run, state, **launch)


def _save(cb: HubCheckpoints, run: RunDir, step: int) -> None:
    """The trainer's save of ``step`` reaching the callback, and its upload done."""
    cb.on_save(SimpleNamespace(output_dir=str(run.checkpoints)), SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    wait_for_uploads()


def test_a_volume_older_than_the_hub_resumes_from_the_hubs_newest(tmp_path, monkeypatch):
    """The volume kept checkpoint-100, the lost pod got to 300 on the Hub: resuming from 100 would redo 200 steps."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "lost-pod", steps=(100, 200, 300), manifest=True))
    assert _hub_steps(hub) == {200, 300}
    planted = hub.repo("me/tuned-checkpoints") / "myrun/checkpoints/checkpoint-300/extra.pkl"
    planted.write_bytes(b"not recorded by the save")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pod = fake_run(tmp_path / "pod", steps=(100,), manifest=True)
    got = _fetch(tmp_path / "pod", pod)
    assert got == pod.checkpoints / "checkpoint-300" and latest_complete(pod.checkpoints) == got
    assert not (got / "extra.pkl").exists()  # only the names the save recorded come down
    assert (pod.checkpoints / "checkpoint-100").is_dir()


def test_a_damaged_hub_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, capsys):
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "lost-pod", steps=(200, 300), manifest=True))
    optimizer = hub.repo("me/tuned-checkpoints") / "myrun/checkpoints/checkpoint-300/optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    optimizer.write_bytes(bytes(data))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pod = RunDir(tmp_path / "pod" / "myrun")
    assert _fetch(tmp_path / "pod", pod) == pod.checkpoints / "checkpoint-200"
    assert is_complete(pod.checkpoints / "checkpoint-200") and not (pod.checkpoints / "checkpoint-300").exists()
    assert "checkpoint-300" in capsys.readouterr().out


def test_uploads_after_an_older_resume_never_delete_the_hubs_newer_checkpoints(tmp_path, monkeypatch):
    """A Hub step above the one uploaded is this run's own newer checkpoint, not a run started over."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "lost-pod", steps=(100, 200, 300), manifest=True))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "pod", steps=(150,), manifest=True))  # resumed from 100
    assert _hub_steps(hub) == {150, 200, 300}


def test_an_old_layout_hub_folder_is_still_found(tmp_path, monkeypatch):
    """Checkpoints uploaded before the manifest (COMPLETE without a file list), in today's folder names."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "lost-pod", steps=(2, 4)))
    assert json.loads((hub.repo("me/tuned-checkpoints") / "myrun/checkpoints/checkpoint-4/COMPLETE").read_text()) == {}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pod = RunDir(tmp_path / "pod" / "myrun")
    assert _fetch(tmp_path / "pod", pod) == pod.checkpoints / "checkpoint-4"
    assert is_complete(pod.checkpoints / "checkpoint-4") and pod.config.read_text() == dump_config(_cfg(tmp_path / "lost-pod"))


@pytest.mark.parametrize("volume", [False, True], ids=["fresh-pod", "own-checkpoint"])
def test_two_runs_sharing_a_hub_folder_are_refused(tmp_path, monkeypatch, volume):
    """Same run_dir name, same hub.repo_id, another training: it must neither resume nor evict the first's checkpoints."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "first", steps=(2, 4), manifest=True))
    before = {f: (hub.repo("me/tuned-checkpoints") / f).read_bytes() for f in hub.files("me/tuned-checkpoints")}
    other = _cfg(tmp_path / "second", learning_rate=1e-5)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    second = fake_run(tmp_path / "second", steps=(2,), cfg=other, manifest=True) if volume else RunDir(tmp_path / "second" / "myrun")
    with pytest.raises(UserError, match=r"another run .*train.learning_rate") as err:
        _fetch(tmp_path / "second", second, other)
    assert "\n" not in str(err.value)
    assert not (second.checkpoints / "checkpoint-4").exists()
    if volume:  # a run that did start (the check at launch was skipped) does not upload over the first run either
        _upload_all(other, second)
    assert {f: (hub.repo("me/tuned-checkpoints") / f).read_bytes() for f in hub.files("me/tuned-checkpoints")} == before


def test_a_missing_token_on_one_node_is_an_error_on_every_rank(tmp_path, monkeypatch):
    """Raised on that node alone, the others would wait forever in the launch's next collective."""
    from multitune import distributed

    gathered = []

    def two_ranks(outcome):  # this rank, and another node's rank that has a token
        gathered.append(outcome)
        return [outcome, None]

    monkeypatch.setattr(distributed, "all_gather", two_ranks)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(UserError, match="needs a Hugging Face token"):
        _fetch(tmp_path, RunDir(tmp_path / "myrun"))
    assert len(gathered) == 1  # it joined the agreement the other ranks wait in


def _old_command(run_dir: Path):
    """Today's config from the command the 4e5d656 run was started with, as a launch resolves it."""
    from multitune.config import load_config
    from multitune.tasks import resolve_tasks

    return resolve_tasks(load_config(OLD_RUN / "config.user.yaml", [f"run_dir={run_dir}"]))


def test_a_hub_folder_an_earlier_version_uploaded_is_found_resumed_and_uploaded_to(tmp_path, monkeypatch, capsys):
    """The Hub folder of a run in flight when multitune was upgraded: its config.yaml, written by the version at
    4e5d656, lacks every key added since (data.drop_unlabelled, train.keep_best, train.global_batch_size) and
    records model.attn_implementation sdpa (the default then, auto now). The same command must resume it and go on
    uploading there, not call it another run (whose advice, starting over, would delete it)."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    recorded = (OLD_RUN / "config.yaml").read_text()
    assert "drop_unlabelled" not in recorded and "keep_best" not in recorded and "attn_implementation: sdpa" in recorded
    lost = fake_run(tmp_path / "lost-pod", steps=(2, 4), recorded=recorded)  # COMPLETE without a manifest, as then
    _upload_all(_old_command(lost.root), lost)
    assert (hub.repo("me/tuned-checkpoints") / "myrun/config.yaml").read_text() == recorded
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pod = RunDir(tmp_path / "pod" / "myrun")
    cfg = _old_command(pod.root)
    assert _fetch(tmp_path / "pod", pod, cfg) == pod.checkpoints / "checkpoint-4"
    assert pod.check(cfg, resume=True, overwrite=False).mode == "resume"
    pod.prepare(cfg, resuming=True)  # the launch records today's config
    add_checkpoint(pod, 6, manifest=True)
    _save(HubCheckpoints(cfg, pod), pod, 6)
    assert _hub_steps(hub) == {4, 6}
    assert "another run" not in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--no-resume", "--overwrite"])
def test_a_run_started_over_leaves_none_of_the_earlier_runs_checkpoints_on_the_hub(tmp_path, monkeypatch, flag):
    """Kept, the earlier run's checkpoints below this run's first upload would be resumed by a fresh pod of this run
    when the newest is damaged: the earlier run's weights and optimizer under this run's config."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "old", steps=(4, 5), manifest=True))
    new_cfg = _cfg(tmp_path) if flag == "--no-resume" else _cfg(tmp_path, learning_rate=1e-5)  # --overwrite: any config
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    new = fake_run(tmp_path / "new", steps=(), cfg=new_cfg, manifest=True)
    assert _fetch(tmp_path / "new", new, new_cfg, resume=False, overwrite=flag == "--overwrite") is None  # allowed
    add_checkpoint(new, 6, manifest=True)
    cb = HubCheckpoints(new_cfg, new, started_over=flag)
    _save(cb, new, 6)
    assert _hub_steps(hub) == {6}
    add_checkpoint(new, 8, manifest=True)
    _save(cb, new, 8)  # later uploads rotate as before: the newest save_total_limit=2
    assert _hub_steps(hub) == {6, 8}
    for step in (6, 8):  # both damaged: a fresh pod of the new run has nothing to resume, never the old run's 5
        optimizer = hub.repo("me/tuned-checkpoints") / f"myrun/checkpoints/checkpoint-{step}/optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:-7])
    pod = RunDir(tmp_path / "pod" / "myrun")
    assert _fetch(tmp_path / "pod", pod, new_cfg) is None and not pod.checkpoints.exists()


@pytest.mark.parametrize("flag", ["--no-resume", "--overwrite"])
def test_a_run_started_over_and_killed_before_its_first_upload_never_resumes_the_earlier_runs(tmp_path, monkeypatch, flag):
    """The earlier run's checkpoints go when the launch starts over, not at its first upload: killed before that
    upload, a relaunch (or a fresh pod) would otherwise resume the earlier run's newest step as this run's."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "old", steps=(4, 5), manifest=True))
    new_cfg = _cfg(tmp_path) if flag == "--no-resume" else _cfg(tmp_path, learning_rate=1e-5)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    new = fake_run(tmp_path / "new", steps=(), cfg=new_cfg, manifest=True)
    assert _fetch(tmp_path / "new", new, new_cfg, resume=False, overwrite=flag == "--overwrite") is None
    assert _hub_steps(hub) == set()  # killed here, before any checkpoint of the new run
    pod = RunDir(tmp_path / "pod" / "myrun")
    assert _fetch(tmp_path / "pod", pod, new_cfg) is None and not pod.checkpoints.exists()


def test_no_resume_does_not_replace_another_runs_hub_folder(tmp_path, monkeypatch, capsys):
    """--no-resume into a new run_dir whose last name is another run's Hub folder: one error line naming the repo,
    the folder and --overwrite, at launch; the upload checks again (the Hub may change after the launch's check)."""
    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "first", steps=(2, 4), manifest=True))
    before = {f: (hub.repo("me/tuned-checkpoints") / f).read_bytes() for f in hub.files("me/tuned-checkpoints")}
    other = _cfg(tmp_path / "second", learning_rate=1e-5)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    second = fake_run(tmp_path / "second", steps=(2,), cfg=other, manifest=True)
    with pytest.raises(UserError, match=r"me/tuned-checkpoints holds, in myrun/, the checkpoints of another run "
                                        r"\(its config differs in train.learning_rate\).*pass --overwrite") as err:
        _fetch(tmp_path / "second", second, other, resume=False)
    assert "\n" not in str(err.value)
    _save(HubCheckpoints(other, second, started_over="--no-resume"), second, 2)
    assert "warning: not uploading checkpoint-2: me/tuned-checkpoints holds, in myrun/" in capsys.readouterr().out
    assert {f: (hub.repo("me/tuned-checkpoints") / f).read_bytes() for f in hub.files("me/tuned-checkpoints")} == before
    assert _fetch(tmp_path / "second", second, other, resume=False, overwrite=True) is None  # --overwrite replaces it
    _save(HubCheckpoints(other, second, started_over="--overwrite"), second, 2)
    assert _hub_steps(hub) == {2}
    assert (hub.repo("me/tuned-checkpoints") / "myrun/config.yaml").read_text() == second.config.read_text()


def test_a_refusal_to_start_over_is_one_on_every_rank(tmp_path, monkeypatch):
    """Refused on the node that looked, it is what that node brings to the agreement the other ranks wait in."""
    from multitune import distributed

    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    _upload_all(_cfg(tmp_path), fake_run(tmp_path / "first", steps=(2,), manifest=True))
    gathered = []

    def two_ranks(outcome):  # this rank, and another that found nothing wrong
        gathered.append(outcome)
        return [outcome, None]

    monkeypatch.setattr(distributed, "all_gather", two_ranks)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    other = _cfg(tmp_path / "second", learning_rate=1e-5)
    with pytest.raises(UserError, match="another run"):
        _fetch(tmp_path / "second", RunDir(tmp_path / "second" / "myrun"), other, resume=False)
    assert len(gathered) == 1 and "another run" in gathered[0]
    assert _hub_steps(hub) == {2}


def test_auto_fits_choices_are_not_another_run(assets, tmp_path, monkeypatch, capsys):
    """train.batch_size auto chose the micro-batch and turned gradient checkpointing on: the trainer's config (which
    the callbacks get) differs from the recorded one there. A relaunch must go on uploading into the run's folder."""
    from multitune.launch import autofit
    from multitune.launch.plan import CUDA_CONTEXT, FRAGMENTATION, GiB, Layout, count, memory

    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    user = config_from_dict({
        "run_dir": str(tmp_path / "pod" / "myrun"), "model": {"name_or_path": str(assets["model"]), "max_length": 128},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "tasks": [{"name": "claims"}],
        "train": {"batch_size": "auto", "global_batch_size": 8, "hub_checkpoints": True, "save_total_limit": 2},
        "hub": {"repo_id": "me/tuned"}})
    c = count(user, torch.float32)  # a card on which one row fits with checkpointing only (tests/unit/test_autofit.py)
    without, with_ckpt = (sum(memory(c, user, Layout("x", 1), 1, 128, 1, ckpt, 9, 100.0).values()) for ckpt in (False, True))
    monkeypatch.setenv(autofit.BUDGET_ENV, str(((with_ckpt + without) / 2 * (1 + FRAGMENTATION) + CUDA_CONTEXT) / GiB))
    rows = SimpleNamespace(train={"labels": [[-100] * 91 + [7] * 9]})
    resolved, _ = autofit.at_launch(user, rows, 1, False)
    assert resolved.train.gradient_checkpointing and not user.train.gradient_checkpointing
    assert (resolved.train.batch_size, resolved.train.grad_accum) != (user.train.batch_size, user.train.grad_accum)
    lost = fake_run(tmp_path / "lost-pod", steps=(2,), cfg=user, manifest=True)  # the run records the user's config
    _upload_all(resolved, lost)
    pod = fake_run(tmp_path / "pod", steps=(2, 4), cfg=user, manifest=True)  # relaunched: resumed from 2, saved 4
    _save(HubCheckpoints(resolved, pod), pod, 4)
    assert _hub_steps(hub) == {2, 4}
    assert "another run" not in capsys.readouterr().out


def test_starting_over_a_finished_run_is_refused_before_the_hub_is_touched(tmp_path, monkeypatch):
    """--no-resume on a finished run: the run directory refuses (pass --overwrite), and the Hub folder's checkpoints
    are still there: the launch deletes them only once its own refusals have passed."""
    from multitune.launch import runner

    calls = []
    monkeypatch.setattr(runner, "fetch_newest_checkpoint", lambda *a, **k: calls.append(k))
    cfg = _cfg(tmp_path)
    run = RunDir(tmp_path / "myrun")
    run.prepare(cfg, resuming=False)
    run.mark_done()
    args = SimpleNamespace(world_size=1, should_save=True, gradient_accumulation_steps=1)
    with pytest.raises(UserError, match="holds a finished run.*--overwrite"):
        runner.run_stages(SimpleNamespace(), cfg, run, args, resume=False, overwrite=False)
    assert calls == []
