"""A run killed with SIGKILL and relaunched ends bitwise equal to one never interrupted (1 process, and
2-process DDP on CPU)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fault_injection.py"


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_and_resume_is_bitwise_identical(tmp_path, capsys, nproc):
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--cycles", "1", "--seed", "3", "--workdir", str(tmp_path), "--nproc", str(nproc)]) == 0
    out = capsys.readouterr().out
    assert "1/1 resumed identical" in out and "weights identical" in out
