"""scripts/fault_injection.py --matrix: its wiring (one line per kind, the count, the exit status) and the
oracles' reading of a launch, without training (tests/integration/test_fault_matrix.py runs a real kind)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import fault_injection
import fault_matrix
from fault_run import Bench, Launched, Lost, Outcome, clean_error, resumed, strict_json, trained_steps, whole


class Stub:
    """A bench that trains nothing: the wiring of run() alone."""

    root = Path("/nonexistent")

    def begin(self, kind):
        pass

    def end(self):
        pass


def _fine(bench):
    return "as it should"


def _lost(bench):
    raise Lost("the checkpoint was rotated away")


def _broken(bench):
    raise KeyError("no such file")


def test_every_kind_survived_is_status_0(capsys):
    assert fault_matrix.run(Stub(), ["a", "b"], {"a": _fine, "b": _fine}) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["FAULT a: survived", "FAULT b: survived", "2/2 faults survived"]


def test_one_kind_lost_is_status_1_and_the_others_still_run(capsys):
    table = {"a": _lost, "b": _broken, "c": _fine}
    assert fault_matrix.run(Stub(), ["a", "b", "c"], table) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAULT a: lost (the checkpoint was rotated away")
    assert lines[1].startswith("FAULT b: lost (the harness failed: KeyError")  # a failing harness is never "survived"
    assert lines[2].startswith("FAULT c: survived") and lines[3].startswith("1/3 faults survived")


def test_the_matrix_knows_every_fault_kind_of_the_issue():
    assert set(fault_matrix.KINDS) == {"nan", "nan-checkpoint", "disk-full", "damaged-optimizer", "truncated-rng", "concurrent",
                                       "sigterm-save", "sigterm-after-last-step", "hub-newer"}


@pytest.mark.parametrize("argv", [["--only", "nan"], ["--matrix", "--only", "no-such-kind"], ["--matrix", "--nproc", "2"]])
def test_option_mistakes_stop_before_anything_runs(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        fault_injection.main([*argv, "--workdir", str(tmp_path)])
    assert e.value.code == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("outcome,why", [
    (Outcome(1, "", "error: training diverged at step 2\n"), "exit status 1"),
    (Outcome(2, "", "Traceback (most recent call last):\n  ...\nerror: training diverged at step 2\n"), "traceback"),
    (Outcome(2, "", "error: training diverged at step 2\nerror: training diverged at step 2\n"), "2 error line"),
    (Outcome(2, "", "error: training diverged at step 2\nwarning: something after it\n"), "1 error line"),
    (Outcome(2, "", "error: the disk is full\n"), "lacks ['step']"),
])
def test_an_error_that_is_not_one_clean_line_is_lost(outcome, why):
    with pytest.raises(Lost, match=why.replace("[", r"\[").replace("]", r"\]")):
        clean_error(outcome, "step")


def test_one_clean_error_line_is_accepted():
    o = Outcome(2, "training...\n", "50%|##   | 3/6\rerror: training diverged at step 3: lower it\n")
    assert clean_error(o, "step 3") == "error: training diverged at step 3: lower it"


def test_whole_finds_a_cut_off_torch_file(tmp_path):
    torch.save({"exp_avg": torch.randn(4096)}, tmp_path / "optimizer.pt")
    (tmp_path / "trainer_state.json").write_text("{}")
    assert whole(tmp_path) is None
    data = (tmp_path / "optimizer.pt").read_bytes()
    (tmp_path / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert whole(tmp_path) == "optimizer.pt"


def test_strict_json_refuses_a_bare_nan(tmp_path):
    (tmp_path / "m.json").write_text('{"loss": NaN}')
    assert not strict_json(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"loss": 0.5}')
    assert strict_json(tmp_path / "m.json")


def _relaunch(resumed_from: str | None, steps: int) -> Outcome:
    lines = [f"resuming from {resumed_from}"] if resumed_from else []
    lines += [f"{{'loss': '2.5', 'grad_norm': '3.3', 'learning_rate': '0.001', 'epoch': '{i}'}}" for i in range(steps)]
    lines += ["{'eval_claims_loss': '1.287', 'epoch': '0.4'}", "{'train_runtime': '46.31', 'train_loss': '2.463'}"]
    return Outcome(0, "\n".join(lines) + "\n", "")


def test_a_relaunch_that_resumed_and_trained_the_rest_is_accepted(tmp_path):
    resumed(_relaunch(f"{tmp_path}/checkpoint-6", 6), tmp_path, 6, 12)
    resumed(_relaunch(None, 12), tmp_path, None, 12)


@pytest.mark.parametrize("outcome,step,why", [
    (_relaunch(None, 12), 6, "did not resume from checkpoint-6"),  # trained from step 0: ends identical all the same
    ("checkpoint-6", 6, "trained 12 step"),  # said it resumed, yet trained every step again
    ("checkpoint-4", 6, "did not resume from checkpoint-6"),
    ("checkpoint-6", None, "resumed, though no checkpoint"),
])
def test_a_relaunch_that_did_not_resume_where_it_should_is_lost(tmp_path, outcome, step, why):
    if isinstance(outcome, str):
        outcome = _relaunch(f"{tmp_path}/{outcome}", 12)
    with pytest.raises(Lost, match=why):
        resumed(outcome, tmp_path, step, 12)


def test_trained_steps_counts_only_the_training_log_lines():
    assert trained_steps(_relaunch(None, 5)) == 5
    assert trained_steps(Outcome(0, "final: trained by an earlier launch\n{'eval_claims_loss': '1.2'}\n", "")) == 0


def test_a_launch_left_running_by_a_lost_kind_is_killed_before_the_next(tmp_path, capsys):
    bench, left = Bench(tmp_path, {}), []

    def leaves_one_running(b):
        left.append(b.start_command(["sleep", "600"], tmp_path / "sleeper"))
        raise Lost("gave up waiting")

    def sees_none_running(b):
        fault_matrix.check(left[0].proc.poll() is not None, "the sleeper still runs")
        return "the sleeper was gone"

    assert fault_matrix.run(bench, ["a", "b"], {"a": leaves_one_running, "b": sees_none_running}) == 1
    assert "FAULT b: survived (the sleeper was gone" in capsys.readouterr().out


def test_a_launch_that_never_reaches_the_awaited_point_is_killed_and_lost_as_hung(tmp_path):
    sleeper = Launched(["sleep", "600"], tmp_path / "sleeper")
    with pytest.raises(Lost, match="hung: sleeper"):
        sleeper.wait_for(lambda: False, timeout=0.5)
    assert sleeper.proc.poll() is not None


def test_each_kind_draws_its_own_random_numbers(tmp_path):
    """`--only K --seed S` injects K's fault where the whole matrix with --seed S did."""
    bench = Bench(tmp_path, {}, seed=4803)
    bench.begin("a")
    alone = [bench.rng.random() for _ in range(3)]
    bench.begin("b")
    bench.rng.random()
    bench.begin("a")
    assert [bench.rng.random() for _ in range(3)] == alone
    bench.begin("b")
    assert bench.rng.random() != alone[0]
