"""train.batch_size: auto: the config rules, the choice on a simulated budget, the resume rule, the batch split.

The training behaviour (the probe, the back-off from an injected out-of-memory) is in
tests/integration/test_autofit.py."""

from types import SimpleNamespace

import pytest
import torch

from multitune.config import config_from_dict
from multitune.errors import UserError
from multitune.launch import autofit
from multitune.launch.plan import CUDA_CONTEXT, FRAGMENTATION, GiB, Layout, count, memory
from multitune.training.autofit import OomBackoff, split_batch
from multitune.training.checkpoints import write_marker


def cfg_with(assets=None, **train):
    model = {"name_or_path": str(assets["model"]) if assets else "m", "max_length": 128}
    return config_from_dict({"model": model, "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                             "tasks": [{"name": "claims"}], "train": train})


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("train,message", [
    ({"batch_size": "auto"}, "train.batch_size=auto needs the global batch: set train.global_batch_size"),
    ({"batch_size": "auto", "global_batch_size": 64, "grad_accum": 4}, "set train.grad_accum or train.global_batch_size, not both"),
    ({"batch_size": 8, "global_batch_size": 12}, "train.global_batch_size=12 is not a multiple of train.batch_size=8"),
    ({"batch_size": "many"}, "invalid config at train.batch_size"),
    ({"batch_size": 0}, "invalid config at train.batch_size"),
])
def test_batch_config_errors_are_one_line(train, message):
    with pytest.raises(UserError, match=message) as e:
        cfg_with(**train)
    assert "\n" not in str(e.value)


def test_auto_and_a_recorded_config_round_trip():
    """The run records the user's config (batch_size auto, grad_accum 1, the global batch) and reads it back."""
    import yaml

    from multitune.config import dump_config

    cfg = cfg_with(batch_size="auto", global_batch_size=192)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.train.batch_size == "auto" and again.train.global_batch_size == 192 and again.eval.rows == 16


def test_cli_validate_refuses_auto_without_global_batch(run_cli, tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "tasks": [{"name": "claims"}], "train": {"batch_size": "auto"}}))
    out = run_cli("validate", path)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert "train.global_batch_size" in out.stderr and "Traceback" not in out.stderr


def test_global_batch_must_split_over_the_processes():
    with pytest.raises(UserError, match="train.global_batch_size=10 does not split over 4 processes"):
        autofit.at_launch(cfg_with(batch_size="auto", global_batch_size=10), None, 4, False)
    with pytest.raises(UserError, match="6 examples each, not a multiple of train.batch_size=4"):
        autofit.at_launch(cfg_with(batch_size=4, global_batch_size=12), None, 2, False)


def test_a_fixed_micro_batch_takes_its_accumulation_from_the_global_batch():
    cfg, fit = autofit.at_launch(cfg_with(batch_size=4, global_batch_size=48), None, 3, False)
    assert fit is None and (cfg.train.batch_size, cfg.train.grad_accum) == (4, 4)  # 4 x 4 x 3 = 48


# ---------------------------------------------------------------- the choice on a simulated budget


def prepared_with(answers: list[int], length: int = 100):
    """Training rows of ``length`` tokens, the last ``a`` of each supervised."""
    return SimpleNamespace(train={"labels": [[-100] * (length - a) + [7] * a for a in answers]})


def oracle_choice(assets, cfg, budget: int, per_rank: int, answer: int, mean_tokens: float):
    """Independently of the search: the step's bytes are static + rows x per-row (every activation, mask and logit
    term is linear in rows at a fixed length), so the largest divisor of ``per_rank`` under the budget is read off
    a straight line through 1 and 2 rows; checkpointing only when no divisor fits without."""
    c = count(cfg, torch.float32)
    for ckpt in (False, True):
        one, two = (sum(memory(c, cfg, Layout("x", 1), n, 128, 1, ckpt, answer, mean_tokens).values()) for n in (1, 2))
        per_row, static = two - one, 2 * one - two
        ok = [m for m in range(1, per_rank + 1) if per_rank % m == 0
              and (static + m * per_row) * (1 + FRAGMENTATION) + CUDA_CONTEXT <= budget]
        if ok:
            return max(ok), ckpt
    return 1, True


@pytest.mark.parametrize("rows_that_fit", [5, 12, 48])
def test_auto_fit_chooses_the_largest_micro_batch_under_a_simulated_budget(assets, monkeypatch, rows_that_fit):
    cfg = cfg_with(assets, batch_size="auto", global_batch_size=48)
    c = count(cfg, torch.float32)
    one, two = (sum(memory(c, cfg, Layout("x", 1), n, 128, 1, False, 9, 100.0).values()) for n in (1, 2))
    budget = int((2 * one - two + (rows_that_fit + 0.5) * (two - one)) * (1 + FRAGMENTATION) + CUDA_CONTEXT)
    monkeypatch.setenv(autofit.BUDGET_ENV, str(budget / GiB))
    resolved, fit = autofit.at_launch(cfg, prepared_with([3, 9, 5]), 1, False)
    expected = oracle_choice(assets, cfg, budget, 48, 9, 100.0)
    assert (fit.micro_batch, fit.checkpointing) == expected
    assert expected[0] == max(m for m in (1, 2, 3, 4, 6, 8, 12, 16, 24, 48) if m <= rows_that_fit)  # the budget's intent
    assert (resolved.train.batch_size, resolved.train.grad_accum) == (expected[0], 48 // expected[0])
    assert fit.supervised[expected[0]] == 9 * expected[0] and fit.ladder[0] == expected and fit.ladder[-1] == (1, True)


def test_checkpointing_comes_on_only_when_one_row_does_not_fit_without(assets, monkeypatch):
    cfg = cfg_with(assets, batch_size="auto", global_batch_size=8)
    c = count(cfg, torch.float32)
    without = sum(memory(c, cfg, Layout("x", 1), 1, 128, 1, False, 9, 100.0).values())
    with_ckpt = sum(memory(c, cfg, Layout("x", 1), 1, 128, 1, True, 9, 100.0).values())
    assert with_ckpt < without
    budget = int((with_ckpt + without) / 2 * (1 + FRAGMENTATION) + CUDA_CONTEXT)
    monkeypatch.setenv(autofit.BUDGET_ENV, str(budget / GiB))
    _, fit = autofit.at_launch(cfg, prepared_with([9]), 1, False)
    assert fit.checkpointing and (fit.micro_batch, True) == oracle_choice(assets, cfg, budget, 8, 9, 100.0)


def test_plan_prints_what_the_launch_chooses(assets, monkeypatch, tmp_path, run_cli):
    """`plan --gpu G` and the launch on a card of G's memory run the same choice (launch.plan.fit_on)."""
    import re

    import yaml

    from multitune.launch.plan import GPUS, DataStats, make_plan

    cfg = cfg_with(assets, batch_size="auto", global_batch_size=2**16)
    data = DataStats(1000, 100.0, "given", 9)
    plan = make_plan(cfg, gpus=1, nodes=1, gpu="rtx4090", data=data, counts=count(cfg, torch.float32))
    monkeypatch.setenv(autofit.BUDGET_ENV, str(GPUS["rtx4090"].memory / GiB))
    _, fit = autofit.at_launch(cfg, prepared_with([9]), 1, False)
    assert (fit.micro_batch, fit.checkpointing) == (plan.micro_batch, plan.checkpointing)
    assert 1 < plan.micro_batch < 2**16  # a real choice, not an end of the range
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = run_cli("plan", path, "--gpu", "rtx4090", "--examples", "1000", "--tokens-per-example", "100").stdout
    assert re.search(r"auto-fit: micro-batch \d+ x 128 tokens", out) and "train.batch_size=auto chooses it at launch" in out


def test_the_smallest_card_wins(monkeypatch):
    """Every rank's card goes through one max-reduction of its negated memory: the smallest is every rank's answer."""
    seen = []
    monkeypatch.setattr(autofit, "max_over_ranks", lambda v: (seen.append(v), max(v, -40 * GiB))[1])  # another rank: 40 GiB
    monkeypatch.setenv(autofit.BUDGET_ENV, "80")
    gpu = autofit.card()
    assert seen == [-80 * GiB] and gpu.memory == 40 * GiB and gpu.name == "the smallest card of the launch"


def test_expandable_segments_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    autofit.expandable_segments()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    autofit.expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


# ---------------------------------------------------------------- resume compares the global batch


def checkpoint_of(tmp_path, world, micro, accum):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    write_marker(folder, {"global_step": 4, "world_size": world, "batch_size": micro, "grad_accum": accum})
    return folder


def test_resume_with_the_same_global_batch_on_another_card(tmp_path):
    """Trained 12 GPUs x 8 x 2 = 192; relaunched with auto on 1 GPU: the micro-batch follows the card, the global
    batch is the checkpoint's, so it resumes (grad_accum from the global batch)."""
    from multitune.rundir import training_differences
    from multitune.training.stages import _resume_grad_accum

    before = cfg_with(batch_size=8, grad_accum=2)
    now = cfg_with(batch_size="auto", global_batch_size=192)
    assert training_differences(before.model_dump(mode="json"), now) == []
    args = SimpleNamespace(world_size=1)
    assert _resume_grad_accum(now, args, checkpoint_of(tmp_path, 12, 8, 2), False) is None
    with pytest.raises(UserError, match=r"global batch of 192 .* set train.global_batch_size=192"):
        _resume_grad_accum(cfg_with(batch_size="auto", global_batch_size=96), args, tmp_path / "checkpoint-4", False)


# ---------------------------------------------------------------- halving a micro-batch


def test_split_rows_keeps_every_row_once_in_order():
    inputs = {"input_ids": torch.arange(15).reshape(5, 3), "labels": torch.arange(15).reshape(5, 3) + 100,
              "attention_mask": torch.ones(5, 3, dtype=torch.long)}
    halves = split_batch(inputs, 2)
    assert [h["input_ids"].shape[0] for h in halves] == [2, 3]  # round(5/2) rows first
    assert torch.equal(torch.cat([h["labels"] for h in halves]), inputs["labels"])


def test_split_a_packed_row_at_a_sequence_start():
    """One padding-free row of sequences of 4, 3, 5 and 2 tokens: cut at the start nearest the middle (7), with each
    half's flash-attention boundaries its own."""
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    inputs = {"input_ids": torch.arange(14)[None], "labels": torch.arange(14)[None], "position_ids": pos,
              "cu_seq_lens_q": torch.tensor([0, 4, 7, 12, 14], dtype=torch.int32), "max_length_q": 5}
    inputs["cu_seq_lens_k"], inputs["max_length_k"] = inputs["cu_seq_lens_q"], 5
    a, b = split_batch(inputs, 2)
    assert a["input_ids"].tolist() == [list(range(7))] and b["input_ids"].tolist() == [list(range(7, 14))]
    assert a["cu_seq_lens_q"].tolist() == [0, 4, 7] and a["max_length_q"] == 4
    assert b["cu_seq_lens_k"].tolist() == [0, 5, 7] and b["max_length_k"] == 5


def test_a_single_sequence_cannot_be_halved():
    inputs = {"input_ids": torch.arange(6)[None], "position_ids": torch.arange(6)[None]}
    with pytest.raises(UserError, match="cannot be halved"):
        split_batch(inputs, 2)


class _Steps:
    """The Trainer under OomBackoff: records the micro-batches it runs."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.ran.append(inputs["input_ids"].shape[0])
        return torch.tensor(1.0)


class _Backed(OomBackoff, _Steps):
    def __init__(self):
        import contextlib

        self.ran, self.current_gradient_accumulation_steps, self.oom_split = [], 1, 2
        self.state = SimpleNamespace(global_step=5)
        self.accelerator = SimpleNamespace(no_sync=lambda m: contextlib.nullcontext(), sync_gradients=True)


def test_a_batch_another_rank_cannot_halve_is_every_rank_s_error(monkeypatch):
    """After the back-off, a packed row of one sequence cannot be halved on one rank: this rank, which can halve its
    own, answers the agreement and raises the same error instead of running its halves into DDP's collectives."""
    import multitune.training.autofit as training_autofit

    asked = []
    monkeypatch.setattr(training_autofit, "any_rank", lambda flag: (asked.append(flag), True)[1])  # the other rank cannot
    trainer = _Backed()
    with pytest.raises(UserError, match="cannot be halved"):
        trainer.training_step(None, {"input_ids": torch.zeros(4, 3, dtype=torch.long)})
    assert trainer.ran == [] and asked == [False]


def test_the_rank_that_cannot_halve_joins_the_agreement(monkeypatch):
    import multitune.training.autofit as training_autofit

    asked = []
    monkeypatch.setattr(training_autofit, "any_rank", lambda flag: (asked.append(flag), flag)[1])
    with pytest.raises(UserError, match="cannot be halved"):
        _Backed().training_step(None, {"input_ids": torch.arange(6)[None], "position_ids": torch.arange(6)[None]})
    assert asked == [True]


def test_a_global_batch_that_does_not_split_is_refused_before_the_data(monkeypatch, tmp_path):
    """4 processes: refused from the config before the data is prepared or the run directory locked."""
    from multitune.launch import runner

    monkeypatch.setattr(runner, "sft_config", lambda cfg, run: SimpleNamespace(world_size=4))
    monkeypatch.setattr(runner, "prepare_run", lambda *a, **k: pytest.fail("the data was prepared"))
    cfg = cfg_with(batch_size="auto", global_batch_size=10).model_copy(update={"run_dir": str(tmp_path / "run")})
    with pytest.raises(UserError, match="train.global_batch_size=10 does not split over 4 processes"):
        runner.train(cfg)
    assert not (tmp_path / "run").exists()


def test_another_rank_s_refused_card_is_every_rank_s_error(monkeypatch):
    """Rank 1's MULTITUNE_GPU_MEMORY_GIB is not a number: this rank, whose own is, raises the same error at the same
    collective instead of going on into the all-reduce of the cards."""
    from multitune import distributed

    monkeypatch.setenv(autofit.BUDGET_ENV, "64")
    monkeypatch.setattr(distributed, "all_gather", lambda obj: [obj, "MULTITUNE_GPU_MEMORY_GIB='x' is not a number"])
    monkeypatch.setattr(autofit, "max_over_ranks", lambda v: pytest.fail("the cards' all-reduce before the agreement"))
    with pytest.raises(UserError, match="rank 1 refused: MULTITUNE_GPU_MEMORY_GIB='x'"):
        autofit.at_launch(cfg_with(batch_size="auto", global_batch_size=8), prepared_with([3]), 1, False)


# ---------------------------------------------------------------- length grouping by the global batch


def grouped_steps(world: int, micro: int, accum: int, lengths: list[int], global_batch: int | None, epoch: int = 0):
    """The examples of each optimizer step with train.group_by_length on ``world`` processes: the trainer's sampler,
    cut by accelerate's own per-process batch sampler (BatchSamplerShard, as Trainer's data loader is prepared)."""
    import datasets
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from multitune.training.lm import MultitaskTrainer

    trainer = object.__new__(MultitaskTrainer)
    trainer.args = SimpleNamespace(train_sampling_strategy="group_by_length", train_batch_size=micro, world_size=world,
                                   gradient_accumulation_steps=accum, length_column_name="length", data_seed=3, seed=3)
    trainer.train_dataset = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    trainer.processing_class = None
    trainer.mt_cfg = cfg_with(batch_size=micro, **({"global_batch_size": global_batch} if global_batch else {"grad_accum": accum}))
    sampler = trainer._get_train_sampler()
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    shards = []
    for r in range(world):  # each process its own, equally seeded, global generator (transformers' sampler draws from it)
        torch.manual_seed(0)
        shards.append(list(BatchSamplerShard(BatchSampler(sampler, micro, False), world, r)))
    steps = len(shards[0]) // accum
    return [sorted(i for shard in shards for batch in shard[k * accum:(k + 1) * accum] for i in batch) for k in range(steps)]


def test_length_grouping_gives_each_step_the_same_examples_on_any_number_of_processes():
    """Global batch 8: 1 process x 4 x 2 and 2 processes x 2 x 2 train the same examples in each optimizer step, in the
    same order of steps, each epoch; the steps group by length (a step's lengths are closer than a random step's)."""
    lengths = [int(v) for v in torch.randint(5, 400, (120,), generator=torch.Generator().manual_seed(1))]
    for epoch in (0, 1):
        one = grouped_steps(1, 4, 2, lengths, 8, epoch)
        two = grouped_steps(2, 2, 2, lengths, 8, epoch)
        assert len(one) == 15 and one == two
    assert grouped_steps(1, 4, 2, lengths, 8, 0) != grouped_steps(1, 4, 2, lengths, 8, 1)  # a new order each epoch
    spread = sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in one) / len(one)
    assert spread < 0.5 * (400 - 5)


def test_a_grouped_run_with_a_global_batch_resumes_on_another_number_of_processes(tmp_path):
    from multitune.training.stages import _resume_grad_accum

    cfg = cfg_with(batch_size="auto", global_batch_size=8, group_by_length=True)
    assert _resume_grad_accum(cfg, SimpleNamespace(world_size=2), checkpoint_of(tmp_path, 1, 4, 2), False) is None
    fixed = cfg_with(batch_size=4, grad_accum=2, group_by_length=True)  # without the global batch: the refusal stands
    with pytest.raises(UserError, match=r"without train.global_batch_size .* resume on 1 process\(es\)"):
        _resume_grad_accum(fixed, SimpleNamespace(world_size=2), tmp_path / "checkpoint-4", False)


# ---------------------------------------------------------------- nothing fits and no probe can check it


@pytest.mark.parametrize("case", ["fsdp", "classifier", "full-fsdp"])
def test_nothing_fits_without_a_probe_is_refused_before_the_model_loads(assets, monkeypatch, case):
    """Under FSDP (no probe) or with a classifier head (no back-off), a card on which even micro-batch 1 with
    checkpointing does not fit by the memory model is one error with the plan's advice, at launch (before loading)."""
    cfg = cfg_with(assets, batch_size="auto", global_batch_size=8)
    if case == "classifier":
        cfg = cfg.model_copy(update={"head": "classifier"})
    else:
        monkeypatch.setattr(autofit, "fsdp_launch", lambda: True)
    if case == "full-fsdp":
        cfg = cfg.model_copy(update={"peft": cfg.peft.model_copy(update={"method": "full"})})
    monkeypatch.setenv(autofit.BUDGET_ENV, "0.001")
    with pytest.raises(UserError, match="does not fit .* even at micro-batch 1 with gradient checkpointing") as e:
        autofit.at_launch(cfg, prepared_with([9]), 1, False)
    assert "\n" not in str(e.value) and "to fit: " in str(e.value) and "a shorter model.max_length" in str(e.value)
    assert ("FSDP over more GPUs" in str(e.value)) == (case == "full-fsdp")


def test_nothing_fits_with_the_probe_leaves_it_to_the_probe(assets, monkeypatch, capsys):
    monkeypatch.setenv(autofit.BUDGET_ENV, "0.001")
    _, fit = autofit.at_launch(cfg_with(assets, batch_size="auto", global_batch_size=8), prepared_with([9]), 1, False)
    assert fit.ladder == ((1, True),) and "DOES NOT FIT: the probe decides" in capsys.readouterr().out


def test_the_card_is_its_free_memory_beside_another_process(monkeypatch):
    """The H100 record's out-of-memory errors came beside another process holding 15.74 GiB: the card auto-fit sizes
    for is what is free before the model loads, not the card's total, and both are printed."""
    monkeypatch.delenv(autofit.BUDGET_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * GiB, name="H100"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *d: (int(64.26 * GiB), 80 * GiB))
    gpu = autofit.card()
    assert gpu.memory == int(64.26 * GiB) and "64.3 GiB free of 80.0 GiB" in gpu.name and "H100" in gpu.name


# ---------------------------------------------------------------- eval.batch_size: auto


@pytest.mark.parametrize("rows_that_fit", [3, 20])
def test_eval_auto_chooses_the_scoring_batch_under_a_simulated_budget(assets, monkeypatch, rows_that_fit):
    """By hand: scoring (multitune.scoring.scorer._row_nll) runs one forward without gradients beside the training state
    (weights, fp32 adapters, their gradients, AdamW's two moments and a step counter per tensor); at its peak a row of
    model.max_length tokens holds the bf16 logits at every position, their fp32 copy (.float()) and cross-entropy's
    fp32 log-softmax: T x V x (2 + 4 + 4) bytes, larger on this model than a layer's MLP temporaries (3 x T x I x 2)."""
    cfg = cfg_with(assets, batch_size=4)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": "auto"})})
    c = count(cfg, torch.bfloat16)
    static = c.weight_bytes + 4 * c.trainable_bytes + 4 * c.trainable_tensors
    per_row = 128 * max(c.vocab * 10, 3 * c.intermediate * 2)
    assert per_row == 128 * c.vocab * 10
    budget = int((static + (rows_that_fit + 0.5) * per_row) * (1 + FRAGMENTATION) + CUDA_CONTEXT)
    monkeypatch.setenv(autofit.BUDGET_ENV, str(budget / GiB))
    resolved, _ = autofit.at_launch(cfg, prepared_with([9]), 1, True)
    assert resolved.eval.batch_size == max(r for r in autofit.EVAL_ROWS if r <= rows_that_fit)


# ---------------------------------------------------------------- the probe runs the trainer's loss path


def probe_trainer(assets, task_losses=None):
    import contextlib

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    return SimpleNamespace(model=model, mt_cfg=cfg_with(assets, batch_size="auto", global_batch_size=8),
                           accelerator=SimpleNamespace(autocast=contextlib.nullcontext), args=SimpleNamespace(device="cpu"),
                           task_losses=task_losses)


def test_the_probe_runs_the_loss_path_s_log_statistics(assets, monkeypatch):
    """token_stats' fp32 log-softmax over [supervised x vocabulary] is part of every training step: an out-of-memory
    there (injected) is the probe's out-of-memory."""
    import multitune.modeling.loss as loss_module
    from multitune.training.autofit import probe

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected in token_stats)")

    monkeypatch.setattr(loss_module, "token_stats", oom)
    assert probe(probe_trainer(assets), 2, 32, 8, False)


def test_the_probe_runs_each_task_s_loss_and_leaves_its_sums(assets):
    """TaskLosses' fp32 cross-entropy copy runs in the probe (an out-of-memory there is the probe's); the window's sums
    that the probe's synthetic batch adds to are put back."""
    from multitune.modeling.loss import TaskLosses
    from multitune.training.autofit import probe

    class Failing(TaskLosses):
        def recorder(self, labels, tags):
            def record(logits, targets):
                raise torch.OutOfMemoryError("CUDA out of memory (injected in TaskLosses)")
            return record

    assert probe(probe_trainer(assets, Failing(["a", "b"], False)), 2, 32, 8, False)
    losses = TaskLosses(["a", "b"], False)
    losses.sums = torch.tensor([[3.0, 4.0], [5.0, 6.0]])
    assert not probe(probe_trainer(assets, losses), 2, 32, 8, False)
    assert losses.sums.tolist() == [[3.0, 4.0], [5.0, 6.0]]


# ---------------------------------------------------------------- allocation failures raised as a RuntimeError

CUBLAS_ALLOC = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"


@pytest.mark.parametrize("message", [CUBLAS_ALLOC, "CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA`"])
def test_an_allocation_failure_raised_as_a_runtime_error_is_the_probe_s_out_of_memory(assets, monkeypatch, message):
    """cuBLAS's handle or workspace, or a CUDA call outside the caching allocator, that cannot get memory raises a plain
    RuntimeError: the probe steps down from it like from torch.OutOfMemoryError (injected in the loss path)."""
    import multitune.modeling.loss as loss_module
    from multitune.training.autofit import probe

    def failed(*a, **k):
        raise RuntimeError(message)

    monkeypatch.setattr(loss_module, "token_stats", failed)
    assert probe(probe_trainer(assets), 2, 32, 8, False)


def test_any_other_runtime_error_in_the_probe_propagates(assets, monkeypatch):
    import multitune.modeling.loss as loss_module
    from multitune.training.autofit import probe

    def bug(*a, **k):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)")

    monkeypatch.setattr(loss_module, "token_stats", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        probe(probe_trainer(assets), 2, 32, 8, False)


class _FailingSteps:
    def training_step(self, model, inputs, num_items_in_batch=None):
        raise RuntimeError(self.message)


class _Watched(OomBackoff, _FailingSteps):
    def __init__(self, message: str):
        import contextlib

        self.message, self.current_gradient_accumulation_steps, self.oom_split = message, 1, 1
        self.accelerator = SimpleNamespace(no_sync=lambda m: contextlib.nullcontext())


def test_a_watched_step_s_cublas_allocation_failure_is_the_agreed_out_of_memory(monkeypatch):
    """In a watched step the RuntimeError goes to the agreement (every rank then backs off), like CUDA's OOM; any other
    RuntimeError propagates (a bug is not an out-of-memory)."""
    import multitune.training.autofit as training_autofit

    asked = []
    monkeypatch.setattr(training_autofit, "any_rank", lambda flag: (asked.append(flag), flag)[1])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(training_autofit.AgreedOom):
        _Watched(CUBLAS_ALLOC)._pieces(None, batch, None, agree=True)
    assert asked == [True]
    with pytest.raises(RuntimeError, match="device-side assert"):
        _Watched("CUDA error: device-side assert triggered")._pieces(None, batch, None, agree=True)
