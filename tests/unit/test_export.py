"""Merging: QLoRA's adapter goes into the dequantised 4-bit base (what it was trained against), and the
merged model computes what base + adapter computed. Push refuses clearly without a token or a repo."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.rundir import RunDir


def _adapter_run(tmp_path, assets, method):
    """A run dir holding an adapter with non-zero weights (no training needed to test merging)."""
    from multitune.modeling.load import apply_peft, load_model

    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(assets["model"])},
                            "peft": {"method": method, "r": 4, "alpha": 8}, "tasks": [{"name": "claims", "dataset": str(assets["claims"])}]})
    run = RunDir(tmp_path / "run")
    torch.manual_seed(0)
    model = apply_peft(load_model(cfg), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(str(run.final))
    return cfg, run, model.eval()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_model_computes_what_base_plus_adapter_computed(tmp_path, assets, method, capsys):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from multitune.publishing.weights import merged_model

    cfg, run, adapted = _adapter_run(tmp_path, assets, method)
    merged = merged_model(run, cfg).eval()
    out = capsys.readouterr().out
    assert ("dequantising the 4-bit base model to float32" in out) == (method == "qlora")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged.config, "quantization_config")
    ids = torch.tensor([[5, 17, 99, 140, 33, 7, 250, 12]])
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
    if method == "lora":
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    else:
        # bitsandbytes' CPU 4-bit matmul is not fp32-exact (~2e-3 a layer against dequantise-then-matmul), so: the
        # same predictions as the 4-bit model, and fp32-exact against the adapter on the dequantised base, unmerged
        import peft

        from multitune.modeling.load import load_model

        assert torch.allclose(got, want, atol=3e-2) and torch.equal(got.argmax(-1), want.argmax(-1))
        unmerged = peft.PeftModel.from_pretrained(load_model(cfg).dequantize(dtype=torch.float32), str(run.final)).eval()
        with torch.no_grad():
            exact = unmerged(ids).logits
        assert torch.allclose(got, exact, atol=1e-5), (got - exact).abs().max()
    base = __import__("multitune.modeling.load", fromlist=["load_model"]).load_model(cfg, quantize=False)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, want, atol=1e-3)  # the adapter really changes the output


def test_prompt_tuning_cannot_be_merged(tmp_path, assets):
    from multitune.publishing.weights import merged_model

    cfg = config_from_dict({"model": {"name_or_path": str(assets["model"])}, "peft": {"method": "prompt_tuning"},
                            "tasks": [{"name": "claims", "dataset": str(assets["claims"])}]})
    with pytest.raises(UserError, match="nothing to merge"):
        merged_model(RunDir(tmp_path), cfg)


@pytest.fixture
def finished_run(tmp_path, assets):
    """A run directory that `push` accepts: config, final adapter, splits."""
    import json

    from multitune.modeling.load import load_tokenizer
    from multitune.tasks import build_task

    cfg, run, _ = _adapter_run(tmp_path, assets, "lora")
    cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"repo_id": "me/from-config", "private": False})})
    run.config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    load_tokenizer(cfg.model, None).save_pretrained(str(run.final))
    task = build_task(cfg.tasks[0])
    task.load(None)
    run.splits.mkdir()
    (run.splits / "claims.json").write_text(json.dumps({"train": [], "val": [], "task_state": task.state()}))
    run.mark_done()
    return run


def _cli(monkeypatch, capsys, *args):
    from multitune.cli import main

    monkeypatch.setattr(sys, "argv", ["multitune", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(code=code, out=out.out, err=out.err)


def test_push_without_a_token_is_one_clear_error_and_uploads_nothing(finished_run, monkeypatch, capsys, tmp_path):
    from tests.fake_hub import FakeHub, install

    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    res = _cli(monkeypatch, capsys, "push", finished_run.root)
    assert res.code == 2 and res.err.startswith("error: no Hugging Face token") and "Traceback" not in res.err
    assert hub.repos == {} and hub.commits == []


@pytest.mark.parametrize("flag, private", [(None, False), ("--private", True), ("--public", False)])
def test_push_visibility_defaults_to_the_config(finished_run, monkeypatch, capsys, tmp_path, flag, private):
    """hub.private from the run's config is the default (issue 9: push used to override it with True)."""
    from tests.fake_hub import FakeHub, install

    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    res = _cli(monkeypatch, capsys, "push", finished_run.root, *([flag] if flag else []))
    assert res.code == 0, res.err
    assert hub.repos == {"me/from-config": private}
    [(repo, ops, _)] = hub.commits  # one commit
    assert repo == "me/from-config" and "README.md" in {o.path_in_repo for o in ops}


def test_dry_run_refuses_a_non_empty_folder(finished_run, monkeypatch, capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    res = _cli(monkeypatch, capsys, "push", finished_run.root, "--dry-run", tmp_path / "out")
    assert res.code == 2 and "exists and is not empty" in res.err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("command", [["push", "--dry-run", "OUT"], ["export", "OUT"], ["eval"]])
def test_an_unfinished_run_is_refused_by_push_export_and_eval(finished_run, monkeypatch, capsys, tmp_path, command):
    """final/ exists but DONE does not (killed while saving it): the adapter may be truncated (issue 16, item 7)."""
    finished_run.done.unlink()
    out = tmp_path / "out"
    args = [command[0], finished_run.root, *[out if a == "OUT" else a for a in command[1:]]]
    res = _cli(monkeypatch, capsys, *args)
    assert res.code == 2 and "Traceback" not in res.err, res.err
    assert res.err.count("\n") == 1 and res.err.startswith("error: ") and "DONE" in res.err and "multitune train" in res.err
    assert not out.exists() and not finished_run.metrics.exists()


def _pushed(hub, monkeypatch, capsys, run, *flags):
    res = _cli(monkeypatch, capsys, "push", run.root, *flags)
    assert res.code == 0, res.err
    return res


def test_push_removes_files_an_earlier_push_published_and_nothing_else(finished_run, monkeypatch, capsys, tmp_path):
    """A merged push, a file the owner added by hand, then an adapter push: the merged weights go, the
    owner's file stays, and the repo holds exactly the adapter folder plus the owner's file."""
    from huggingface_hub import CommitOperationAdd

    from tests.fake_hub import FakeHub, install

    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    _pushed(hub, monkeypatch, capsys, finished_run, "--merged")
    assert "model.safetensors" in hub.files("me/from-config")
    (tmp_path / "mine.md").write_text("the owner's notes")
    hub.create_commit("me/from-config", [CommitOperationAdd(path_in_repo="notes/mine.md", path_or_fileobj=str(tmp_path / "mine.md"))])
    _pushed(hub, monkeypatch, capsys, finished_run)
    dry = tmp_path / "dry"
    _cli(monkeypatch, capsys, "push", finished_run.root, "--dry-run", dry)
    wanted = {p.relative_to(dry).as_posix() for p in dry.rglob("*") if p.is_file()}
    assert "model.safetensors" not in wanted and "adapter_model.safetensors" in wanted
    assert set(hub.files("me/from-config")) == wanted | {"notes/mine.md"}
    assert len(hub.commits[-1][1]) == len(wanted) + sum(1 for op in hub.commits[-1][1] if not isinstance(op, CommitOperationAdd))


@pytest.mark.parametrize("existing, flag", [(False, "--private"), (True, "--public")])
def test_push_prints_the_visibility_the_repo_really_has(finished_run, monkeypatch, capsys, tmp_path, existing, flag):
    """An existing repo keeps its visibility (create_repo with exist_ok changes nothing): say what it is."""
    from tests.fake_hub import FakeHub, install

    hub = install(monkeypatch, FakeHub(tmp_path / "hub"))
    hub.create_repo("me/from-config", private=existing)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    res = _pushed(hub, monkeypatch, capsys, finished_run, flag)
    shown = "private" if existing else "public"
    assert hub.repos["me/from-config"] is existing
    assert f"({shown})" in res.out and f"({'public' if existing else 'private'})" not in res.out


def test_published_config_names_no_local_path(finished_run, monkeypatch, capsys, tmp_path, assets):
    """multitune.yaml in the upload hides the build machine's paths as the card does, and still validates."""
    res = _cli(monkeypatch, capsys, "push", finished_run.root, "--dry-run", tmp_path / "dry")
    assert res.code == 0, res.err
    text = (tmp_path / "dry" / "multitune.yaml").read_text()
    for local in (str(tmp_path), str(assets["model"]), str(assets["claims"]), str(Path(assets["model"]).parent)):
        assert local not in text
    cfg = config_from_dict(yaml.safe_load(text))
    assert cfg.model.name_or_path == Path(assets["model"]).name and cfg.tasks[0].dataset == Path(assets["claims"]).name


@pytest.mark.parametrize("command", [["export", "OUT"], ["export", "OUT", "--merged"], ["push", "--dry-run", "OUT"],
                                     ["push", "--repo-id", "me/tuned"]])
def test_final_weights_holding_nan_are_never_exported_or_pushed(finished_run, monkeypatch, capsys, tmp_path, command):
    """A run finished by a version that kept NaN weights (issue 16, item 2): export refuses as push does, one line,
    exit 2, nothing at the destination; the weights are named before a missing token is."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file either
    from safetensors.torch import load_file, save_file

    weights = finished_run.final / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights))
    out = tmp_path / "out"
    res = _cli(monkeypatch, capsys, command[0], finished_run.root, *[out if a == "OUT" else a for a in command[1:]])
    assert res.code == 2 and "Traceback" not in res.err, res.err
    assert res.err.count("\n") == 1 and res.err.startswith("error: ") and "non-finite" in res.err and "learning_rate" in res.err
    assert not out.exists()
