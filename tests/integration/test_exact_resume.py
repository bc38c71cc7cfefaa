"""A run killed with SIGKILL and relaunched ends bitwise equal to one never interrupted: 1 process,
2-process DDP, and 2-process FSDP2 through the shipped accelerate config (CPU, gloo)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fault_injection.py"
sys.path.insert(0, str(SCRIPT.parent))  # its helpers (fault_run, fault_matrix, processes), as when it runs as a script


@pytest.mark.parametrize("nproc,fsdp", [(1, False), (2, False), (2, True)], ids=["1proc", "ddp", "fsdp2"])
def test_kill_and_resume_is_bitwise_identical(tmp_path, capsys, nproc, fsdp):
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--cycles", "1", "--seed", "3", "--workdir", str(tmp_path), "--nproc", str(nproc), *(["--fsdp"] if fsdp else [])]) == 0
    out = capsys.readouterr().out
    assert "1/1 resumed identical" in out and "weights identical" in out
