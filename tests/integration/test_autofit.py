"""train.batch_size: auto on the CPU with an injected CUDA out-of-memory (torch.OutOfMemoryError raised by the model's
embedding for micro-batches of more than 4 rows): the probe steps down before step 1; an out-of-memory at step 3
backs off once and continues at the same step, and either way the run ends where an uninterrupted run with half the
micro-batch and twice the accumulation ends (the same examples each step, in the same order)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.config import config_from_dict
from multitune.launch import autofit
from multitune.launch.runner import train
from tests.conftest import tiny_config

STEPS = 5


def run_config(assets, run_dir, **train_keys) -> dict:
    raw = tiny_config(assets, run_dir, **{"max_steps": STEPS, "save_steps": 100, "logging_steps": 1,
                                          "eval_rows_during_training": 0, **train_keys})
    raw["train"]["eval_steps"] = 1000
    raw["tasks"] = [{**t, "max_rows": 60} for t in raw["tasks"][:2]]
    return raw


class InjectedOom:
    """The embedding's forward (training only: gradients on) raises CUDA's out-of-memory for more than ``rows`` rows,
    on the forward calls numbered in ``at`` (1: the first; None: every one); ``cublas``: as cuBLAS's allocation
    failure does, a plain RuntimeError."""

    def __init__(self, rows: int, at: set[int] | None, crash_at: int | None = None, cublas: bool = False):
        self.rows, self.at, self.crash_at, self.calls, self.raised, self.cublas = rows, at, crash_at, 0, 0, cublas
        self.forward = torch.nn.Embedding.forward

    def install(self, monkeypatch) -> "InjectedOom":
        monkeypatch.setattr(torch.nn.Embedding, "forward", lambda module, ids: self.call(module, ids))
        return self

    def call(self, module, ids):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.crash_at:  # the process dies (a reclaimed pod): the next launch resumes
                raise RuntimeError("injected crash")
            if ids.shape[0] > self.rows and (self.at is None or self.calls in self.at):
                self.raised += 1
                if self.cublas:
                    raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {ids.shape[0]} rows)")
        return self.forward(module, ids)


def losses(run_dir) -> list[float]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h and "step" in h]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def halved(assets, tmp_path_factory):
    """The oracle: micro-batch 4 x 2 accumulation from the first step, no out-of-memory anywhere."""
    run_dir = tmp_path_factory.mktemp("halved") / "run"
    train(config_from_dict(run_config(assets, run_dir, batch_size=4, global_batch_size=8)))
    return run_dir


def assert_same_training(run_dir, oracle_dir):
    assert losses(run_dir) == pytest.approx(losses(oracle_dir), rel=1e-5) and len(losses(run_dir)) == STEPS
    a, b = weights(run_dir), weights(oracle_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cublas", [False, True], ids=["cuda-oom", "cublas-alloc"])
def test_oom_at_step_3_backs_off_and_continues_at_the_same_step(assets, tmp_path, monkeypatch, capsys, halved, cublas):
    """Forward 1 is the probe (micro-batch 8 fits), 2 and 3 are steps 1 and 2; forward 4, step 3, runs out of memory
    (CUDA's OutOfMemoryError, or cuBLAS's allocation failure: a RuntimeError)."""
    monkeypatch.setenv("MULTITUNE_GPU_MEMORY_GIB", "64")  # every micro-batch fits by the model: 8 x 1
    monkeypatch.setattr(autofit, "WATCH_STEPS", 4)  # step 5 runs past the watched steps, as halves
    oom = InjectedOom(4, at={4}, cublas=cublas).install(monkeypatch)
    train(config_from_dict(run_config(assets, tmp_path / "run", batch_size="auto", global_batch_size=8)))
    out = capsys.readouterr().out
    assert "micro-batch 8 x 1 accumulation" in out and oom.raised == 1
    assert "out of memory at step 3 (micro-batch 8 x 1 accumulation): continuing at micro-batch 4 x 2" in out
    launch = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert (launch["per_device_train_batch_size"], launch["gradient_accumulation_steps"]) == (4, 2)
    assert (launch["attn_implementation"], launch["liger"]) == ("sdpa", False)  # auto on a CPU: what was loaded
    assert_same_training(tmp_path / "run", halved)


def test_the_probe_steps_down_before_step_1(assets, tmp_path, monkeypatch, capsys, halved):
    monkeypatch.setenv("MULTITUNE_GPU_MEMORY_GIB", "64")
    oom = InjectedOom(4, at=None).install(monkeypatch)
    train(config_from_dict(run_config(assets, tmp_path / "run", batch_size="auto", global_batch_size=8)))
    out = capsys.readouterr().out
    assert "auto-fit probe: out of memory at micro-batch 8 x 192 tokens" in out and oom.raised == 1
    assert "auto-fit probe: micro-batch 4 x 2 accumulation" in out
    assert_same_training(tmp_path / "run", halved)


def test_a_second_oom_is_one_error_line(assets, tmp_path, monkeypatch, run_cli):
    """Backs off once: micro-batch 8 fails at step 1 (the probe passed), so does 4; one error, nothing saved."""
    monkeypatch.setenv("MULTITUNE_GPU_MEMORY_GIB", "64")
    InjectedOom(2, at=set(range(2, 100))).install(monkeypatch)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_config(assets, tmp_path / "run", batch_size="auto", global_batch_size=8)))
    out = run_cli("train", path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]  # progress bars share stderr
    assert len(errors) == 1 and "error: out of memory at step 1 even at micro-batch 4 (backed off from 8)" in errors[0], out.stderr[-2000:]
    assert not (tmp_path / "run" / "final").exists()


def test_a_resumed_launch_watches_its_own_first_steps_and_keeps_the_back_off(assets, tmp_path, monkeypatch, capsys, halved):
    """Launch 1 crashes in step 3 (checkpoint-2 saved); launch 2 resumes at step 2, past the watched steps of the run's
    start, and runs out of memory in its first step: it backs off (its own first steps are watched) and crashes in step 5
    (checkpoint-4 saved after the back-off); launch 3 resumes at step 4 with the halved micro-batch, so a micro-batch of
    8 rows, which ran out of memory on this card, is never tried. The run ends where the halved oracle ends."""
    monkeypatch.setenv("MULTITUNE_GPU_MEMORY_GIB", "64")
    monkeypatch.setattr(autofit, "WATCH_STEPS", 2)
    cfg = config_from_dict(run_config(assets, tmp_path / "run", batch_size="auto", global_batch_size=8, save_steps=2))
    InjectedOom(4, at=set(), crash_at=4).install(monkeypatch)  # forward 1 is the probe, 2 and 3 steps 1 and 2
    with pytest.raises(RuntimeError, match="injected crash"):
        train(cfg)
    # forward 2 is step 3 (8 rows: out of memory); its redo as halves is 3 and 4, step 4 is 5 and 6, step 5 starts at 7
    oom = InjectedOom(4, at={2}, crash_at=7).install(monkeypatch)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(cfg)
    assert oom.raised == 1 and "out of memory at step 3 (micro-batch 8 x 1 accumulation)" in capsys.readouterr().out
    oom = InjectedOom(4, at=set(range(2, 100))).install(monkeypatch)  # every training micro-batch of 8 rows, not the probe
    train(cfg)
    assert oom.raised == 0, "the resumed launch tried the micro-batch that had run out of memory"
    assert "keeps the checkpoint's out-of-memory back-off: micro-batch 4 x 2" in capsys.readouterr().out
    launch = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert (launch["per_device_train_batch_size"], launch["gradient_accumulation_steps"]) == (4, 2)
    assert_same_training(tmp_path / "run", halved)


def logged(run_dir, key: str) -> list[float]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [h[key] for h in history if "loss" in h and "step" in h]


@pytest.fixture(scope="module")
def halved_16(assets, tmp_path_factory):
    """The oracle for a global batch of 16: micro-batch 4 x 4 accumulation from the first step."""
    run_dir = tmp_path_factory.mktemp("halved16") / "run"
    train(config_from_dict(run_config(assets, run_dir, batch_size=4, global_batch_size=16)))
    return run_dir


def test_oom_on_the_second_micro_batch_of_a_step(assets, tmp_path, monkeypatch, capsys, halved_16):
    """Global batch 16 as micro-batch 8 x 2: the probe runs out of memory at 16 rows (forward 1) and fits 8 (2); step 3
    is forwards 7 and 8, and 8 (its second micro-batch) runs out of memory. The step is redone from its first
    micro-batch as four halves; the run ends where micro-batch 4 x 4 ends, and what the step's first micro-batch logged
    before the redo (each task's loss, the token count) is counted once, as in the oracle."""
    monkeypatch.setenv("MULTITUNE_GPU_MEMORY_GIB", "64")
    probe = InjectedOom(8, at={1})  # before the patch: it calls the embedding's own forward
    oom = InjectedOom(4, at={8}).install(monkeypatch)
    monkeypatch.setattr(oom, "forward", lambda module, ids: probe.call(module, ids))  # the probe's 16 rows, then the model
    train(config_from_dict(run_config(assets, tmp_path / "run", batch_size="auto", global_batch_size=16)))
    out = capsys.readouterr().out
    assert probe.raised == 1 and oom.raised == 1 and "auto-fit probe: micro-batch 8 x 2 accumulation" in out
    assert "out of memory at step 3 (micro-batch 8 x 2 accumulation): continuing at micro-batch 4 x 4" in out
    assert_same_training(tmp_path / "run", halved_16)
    for key in ("loss/claims", "loss/banking77"):  # sums over tokens (TRL's entropy is a mean of micro-batch means)
        assert logged(tmp_path / "run", key) == pytest.approx(logged(halved_16, key), rel=1e-4), key
    assert logged(tmp_path / "run", "num_tokens") == logged(halved_16, "num_tokens")
