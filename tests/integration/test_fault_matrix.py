"""One fault of `scripts/fault_injection.py --matrix`, through the real CLI on the tests' tiny model: the wiring
from a kind to its verdict line (the whole matrix is `python scripts/fault_injection.py --matrix`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_config

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import fault_matrix


def test_a_diverging_learning_rate_is_survived(assets, tmp_path, capsys):
    bench = fault_matrix.Bench(tmp_path, tiny_config(assets, tmp_path / "unused"), seed=1)
    assert fault_matrix.run(bench, ["nan"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.startswith("FAULT nan: survived (diverged at step ") and "1/1 faults survived" in out
