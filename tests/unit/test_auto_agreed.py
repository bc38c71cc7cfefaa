"""What `auto` decides at launch is decided once for every rank: auto-fit's micro-batch and checkpointing, and the
attention kernel and Liger that `model.attn_implementation: auto` and `train.liger: auto` load.

Two simulated ranks run in two threads behind the collectives (:class:`Lockstep`): each all-reduce and all_gather
waits for both ranks and answers both alike, as torch.distributed does, while each rank sees its own node (what
imports there). A rank that made a collective the other did not would leave it waiting: the barrier's guard fails
the test instead of hanging it."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest

from multitune import distributed
from multitune.config import load_config
from multitune.launch import autofit
from multitune.launch.plan import DataStats, GiB, Gpu, Layout, count, fit_on
from multitune.modeling import load, speed
from tests.conftest import REPO


class Lockstep:
    """``n`` ranks as threads; ``rank()`` is the calling thread's."""

    def __init__(self, n: int):
        self.n, self.values, self.local = n, [None] * n, threading.local()
        self.barrier = threading.Barrier(n, timeout=600)  # a guard against a hang, not a measured time

    def rank(self) -> int:
        return self.local.rank

    def exchange(self, value) -> list:
        self.values[self.rank()] = value
        self.barrier.wait()
        out = list(self.values)
        self.barrier.wait()  # every rank has read before the next exchange writes
        return out

    def max(self, value: int) -> int:
        return max(self.exchange(value))

    def install(self, monkeypatch, *modules) -> Lockstep:
        monkeypatch.setattr(distributed, "all_gather", self.exchange)
        monkeypatch.setattr(distributed, "max_over_ranks", self.max)
        for module in modules:
            monkeypatch.setattr(module, "max_over_ranks", self.max)
        return self

    def run(self, fn) -> list:
        """``fn()`` on every rank; each rank's result (an exception is raised here)."""
        out: list = [None] * self.n

        def body(r):
            self.local.rank = r
            try:
                out[r] = ("ok", fn())
            except BaseException as e:  # noqa: BLE001 - handed to the test's thread
                out[r] = ("error", e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for kind, value in out:
            if kind == "error" and not isinstance(value, threading.BrokenBarrierError):
                raise value
        assert all(kind == "ok" for kind, _ in out), out
        return [value for _, value in out]


def prepared_with(answers: list[int], length: int):
    return SimpleNamespace(train={"labels": [[-100] * (length - a) + [7] * a for a in answers]})


# ---------------------------------------------------------------- auto-fit's choice (item 1)


def test_ranks_that_model_different_kernels_train_the_same_micro_batch(monkeypatch):
    """The reviewer's case: Llama 3 8B LoRA, train.liger auto, a 70 GiB card, 48 examples a rank; liger-kernel on rank 1
    only. Each rank's own model chooses differently (Liger keeps less); every rank must end with the same micro-batch,
    accumulation and checkpointing: the smaller micro-batch (checkpointing on if either needs it), which fits both."""
    world = Lockstep(2).install(monkeypatch, autofit)
    monkeypatch.setattr(speed, "liger_available", lambda: world.rank() == 1)  # this node's install (plan.step_for)
    monkeypatch.setenv(autofit.BUDGET_ENV, "70")
    cfg = load_config(REPO / "configs" / "llama3-8b-lora.yaml", ["train.liger=auto", "train.global_batch_size=96"])
    prepared = prepared_with([40, 120, 300], 512)

    # each node alone (no agreement), independently of the launch: what fit_on chooses with and without Liger
    counts, data = count(cfg), DataStats(3, 512.0, "rows", 300)
    own = {}
    for liger in (False, True):
        monkeypatch.setattr(speed, "liger_available", lambda liger=liger: liger)
        _, micro, ckpt, _, fits = fit_on(counts, cfg, Gpu("card", 70 * GiB, 0.0), 2, 1, 48, data, Layout("x", 1))
        assert fits
        own[liger] = (micro, ckpt)
    assert own[False] != own[True], own  # the two nodes' models disagree: the case this test is about
    safe_micro = min(own[False][0], own[True][0])
    safe = (safe_micro, 48 // safe_micro, own[False][1] or own[True][1])

    monkeypatch.setattr(speed, "liger_available", lambda: world.rank() == 1)
    # one build at a time: transformers sets torch's process-wide default dtype while it builds the meta model, which
    # two threads would leave at bf16 (ranks are processes, each with its own)
    lock = threading.Lock()

    def counted(*a, **k):
        with lock:
            return count(*a, **k)

    monkeypatch.setattr(autofit, "count", counted)
    results = world.run(lambda: autofit.at_launch(cfg, prepared, 2, True))
    for resolved, fit in results:
        assert (resolved.train.batch_size, resolved.train.grad_accum, resolved.train.gradient_checkpointing) == safe
        assert (fit.micro_batch, fit.checkpointing) == (safe[0], safe[2]) and fit.ladder[0] == (safe[0], safe[2])


def test_the_agreement_takes_the_smallest_micro_batch_and_checkpointing_if_any(monkeypatch):
    """Rank 0 chose 8 rows without checkpointing, rank 1 12 rows with it: both run 8 rows with checkpointing, and the
    probe's ladder starts there on both."""
    world = Lockstep(2).install(monkeypatch, autofit)
    ladder = tuple(autofit.ladder(48))
    own = [(8, False), (12, True)]

    def choose():
        micro, ckpt = own[world.rank()]
        fit = autofit.AutoFit(micro, ckpt, 48, ladder[ladder.index((micro, ckpt)):], {m: m for m, _ in ladder})
        return autofit.agreed(fit)

    for fit in world.run(choose):
        assert (fit.micro_batch, fit.checkpointing) == (8, True) and fit.ladder[0] == (8, True)
        assert fit.ladder[-1] == (1, True)


# ---------------------------------------------------------------- auto's kernels (item 2)


def test_auto_takes_flash_attention_only_when_every_rank_has_it(monkeypatch, tmp_path):
    """Packed rows on GPUs: flash-attn runs on rank 0 and not on rank 1, liger-kernel is on rank 0 only. Each node's own
    choice differs (flash on rank 0); the agreed node checks give both ranks FlexAttention and no Liger, the same
    kernels that auto-fit then models."""
    from multitune.config import config_from_dict
    from multitune.training.stages import agreed_kernels

    world = Lockstep(2).install(monkeypatch)
    monkeypatch.setattr(load.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(load, "flash_attn_imports", lambda: world.rank() == 0)
    monkeypatch.setattr(load, "flash_attn_runs", lambda: world.rank() == 0)
    monkeypatch.setattr(load, "liger_available", lambda: world.rank() == 0)
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": "m"}, "peft": {"method": "lora"},
                            "tasks": [{"name": "claims", "dataset": "d"}],
                            "train": {"packing": True, "liger": "auto", "batch_size": 4}})
    args = SimpleNamespace(n_gpu=1)

    def each_rank():
        own = load.attention(cfg, for_training=True)  # this node alone
        kernels = agreed_kernels(cfg, args)
        loaded = load.for_kernels(cfg, kernels)
        return own, loaded.model.attn_implementation, loaded.train.liger

    (own0, attn0, liger0), (own1, attn1, liger1) = world.run(each_rank)
    assert (own0, own1) == ("flash_attention_2", "flex_attention")  # without the agreement the ranks differ
    assert attn0 == attn1 == "flex_attention" and liger0 is liger1 is False
    assert cfg.model.attn_implementation == "auto" and cfg.train.liger == "auto"  # the recorded config is untouched


def test_every_rank_with_flash_attention_takes_it(monkeypatch):
    every = [load.Kernels(cuda=True, flash=True, liger=True)] * 2
    assert load.Kernels.common(every) == load.Kernels(True, True, True)
    assert load.Kernels.common([*every, load.Kernels(True, True, False)]) == load.Kernels(True, True, False)


def test_launch_json_records_the_attention_kernel_and_liger(assets):
    """launch.json's kernel facts are read from the model as loaded (through its PEFT wrapper)."""
    import peft
    from transformers import AutoModelForCausalLM

    from multitune.training.stages import kernels_of

    model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation="eager")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert kernels_of(wrapped) == {"attn_implementation": "eager", "liger": False}
    model._multitune_liger = True  # what apply_liger marks
    assert kernels_of(wrapped)["liger"] is True


# ---------------------------------------------------------------- the probe supervises what the model charges (item 4)


class _Probed(autofit.OomBackoff):
    """A trainer as confirm_on sees it; the probe's forward and backward are replaced by recording the batch."""

    def __init__(self):
        self.model = SimpleNamespace(get_input_embeddings=lambda: SimpleNamespace(num_embeddings=1024),
                                     zero_grad=lambda set_to_none: None)
        self.args = SimpleNamespace(device="cpu", activation_checkpointing=False, train_batch_size=0)
        self.callback_handler = SimpleNamespace(callbacks=[])


@pytest.mark.parametrize("packing", [True, False])
def test_the_probe_supervises_as_many_tokens_as_the_memory_model_charges(assets, monkeypatch, packing):
    """Rows of 100 tokens, the longest answer 9, model.max_length 128, micro-batch 8 (a 64 GiB card). By hand: packed,
    the memory model charges a row of 8 x 128 tokens at the data's answer share, ceil(8 x 128 x 9 / 100) = 93
    supervised tokens; padded, each of the 8 rows its longest answer, 8 x 9 = 72. The probe's batch labels as many."""
    import multitune.training.autofit as training_autofit
    from multitune.config import config_from_dict

    seen = []
    monkeypatch.setattr(training_autofit, "_forward_backward", lambda trainer, batch, ddp: seen.append(batch))
    monkeypatch.setenv(autofit.BUDGET_ENV, "64")
    cfg = config_from_dict({"model": {"name_or_path": str(assets["model"]), "max_length": 128},
                            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "tasks": [{"name": "claims"}],
                            "train": {"batch_size": "auto", "global_batch_size": 8, "packing": packing}})
    resolved, fit = autofit.at_launch(cfg, prepared_with([3, 9, 5], 100), 1, False)
    assert fit.micro_batch == 8
    autofit.confirm_on(_Probed(), fit, resolved)
    (batch,) = seen
    expected = math.ceil(8 * 128 * 9 / 100) if packing else 8 * 9
    assert int((batch["labels"] != -100).sum()) == expected
    assert tuple(batch["input_ids"].shape) == ((1, 8 * 128) if packing else (8, 128))


@pytest.mark.parametrize("head", ["lm", "classifier"])
def test_the_trainers_load_the_kernels_every_rank_agreed(monkeypatch, tmp_path, head):
    """What the agreement decided is what each trainer loads: kernels that every rank has (flash-attn here, which
    this CPU lacks) reach the model loader through the launch's Setup, for the LM and the classifier trainer alike."""
    from multitune.config import config_from_dict
    from multitune.rundir import RunDir
    from multitune.training import classifier, lm
    from multitune.training.stages import Setup

    raw = {"model": {"name_or_path": "m"}, "tasks": [{"name": "claims", "dataset": "d"}],
           "train": {"packing": head == "lm", "liger": "auto"}, "head": head}
    cfg = config_from_dict(raw)
    agreed = load.Kernels(cuda=True, flash=True, liger=True)
    expected = load.for_kernels(cfg, agreed).model.attn_implementation  # packed rows on every rank's GPU: flash-attn
    seen = []

    class Loaded(Exception):
        pass

    def loader(c, *a, **k):
        seen.append((c.model.attn_implementation, c.train.liger))
        raise Loaded

    monkeypatch.setattr(lm, "load_model", loader)
    monkeypatch.setattr(classifier, "build_model", loader)
    setup = Setup(tokenizer=None, formatter=None, prepared=SimpleNamespace(data=[]), kernels=agreed)
    with pytest.raises(Loaded):
        if head == "lm":
            lm.build_trainer(cfg, RunDir(tmp_path), SimpleNamespace(), setup)
        else:
            classifier.build_trainer(cfg, SimpleNamespace(), setup, [], heads=None)
    assert seen == [(expected, True)] and cfg.model.attn_implementation == "auto"
    assert head == "classifier" or expected == "flash_attention_2"
