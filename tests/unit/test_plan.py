"""`plan`'s parameter, weight, gradient and optimizer byte counts equal a real tiny model's after a real
optimizer step (the independent oracle: what PyTorch, bitsandbytes, PEFT and TRL actually allocate)."""

import math
from pathlib import Path

import pytest
import torch

from multitune.config import config_from_dict
from multitune.launch.plan import GPUS, LLAMA3_8B, GiB, Layout, count, memory, nf4_bytes
from multitune.modeling.load import adapters_in_fp32, apply_peft, load_model, load_tokenizer, resolve_dtype

REPO = Path(__file__).resolve().parents[2]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def real_counts(model, method: str) -> dict[str, int]:
    """Bytes the live model holds: each base tensor once, with bitsandbytes' 4-bit statistics."""
    storages = {}
    for p in model.parameters():
        if p.requires_grad and method != "full":
            continue
        storages[p.data_ptr()] = _tensor_bytes(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            extra = [qs.absmax, qs.code, qs.offset] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
            storages |= {t.data_ptr(): _tensor_bytes(t) for t in extra}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"weights": sum(storages.values()), "trainable": sum(p.numel() for p in trainable), "tensors": len(trainable)}


@pytest.mark.parametrize("method,dtype", [("lora", "auto"), ("qlora", "auto"), ("qlora", "bfloat16"), ("dora", "auto"),
                                          ("prompt_tuning", "auto"), ("full", "auto")])
def test_plan_counts_equal_a_real_model_after_a_real_step(assets, tmp_path, method, dtype):
    """dtype auto is fp32 on this CPU; QLoRA in bf16 as on a GPU: its embeddings and norms stay bf16 (prepare_4bit)."""
    pytest.importorskip("bitsandbytes") if method == "qlora" else None
    import datasets
    from trl import SFTConfig, SFTTrainer

    cfg = config_from_dict({"model": {"name_or_path": str(assets["model"]), "dtype": dtype}, "peft": {"method": method, "r": 4, "alpha": 8},
                            "tasks": [{"name": "claims", "dataset": str(assets["claims"])}]})
    planned = count(cfg, compute_dtype=resolve_dtype(cfg.model.dtype))

    torch.manual_seed(0)
    model = apply_peft(load_model(cfg), cfg)
    rows = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9, 10]] * 4})
    trainer = SFTTrainer(model=model, train_dataset=rows, processing_class=load_tokenizer(cfg.model, None),
                         args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                                        per_device_train_batch_size=2, max_steps=1))
    model = trainer.model  # after TRL's own preparation (it casts QLoRA adapters to bf16)
    adapters_in_fp32(model)  # and multitune's, as MultitaskTrainer does: every adapter trains in fp32
    real = real_counts(model, method)
    base = load_model(cfg, quantize=False)  # 4-bit tensors report packed sizes
    assert planned.params == sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    assert planned.weight_bytes == real["weights"]
    assert planned.trainable == real["trainable"] and planned.trainable_tensors == real["tensors"]

    optimizer = trainer.create_optimizer()
    batch = {k: v.to(model.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}
    model(**batch).loss.backward()
    grads = sum(_tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    optimizer.step()
    states = sum(_tensor_bytes(t) for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
    assert planned.trainable_bytes == grads
    assert planned.optimizer_bytes == states


def test_nf4_bytes_follow_bitsandbytes(assets):
    """One 4-bit weight: bytes of every tensor bitsandbytes keeps for it, against the formula."""
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(192, 320)
    q = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")._quantize("cpu")
    qs = q.quant_state
    held = [q, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    assert nf4_bytes(weight.numel()) == sum(_tensor_bytes(t) for t in held)


def test_llama3_8b_shape_and_the_adapter_size_from_the_issue():
    cfg = config_from_dict({"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}, "peft": {"method": "lora", "r": 16},
                            "tasks": [{"name": "claims"}]})
    c = count(cfg)
    assert c.params == 8_030_261_248  # Llama-3.1-8B's published parameter count
    assert c.trainable == 41_943_040 and c.trainable_bytes == 167_772_160  # the "~170 MB of adapter gradients"
    parts = memory(c, cfg, Layout("ddp-3x4.yaml", 1), micro_batch=8, seq=512, world=12, checkpointing=True)
    assert parts["weights"] == c.params * 2 and parts["DDP gradient buckets"] == c.trainable_bytes
    assert sum(parts.values()) < GPUS["a100-80gb"].memory


@pytest.fixture(scope="module")
def seed_data_stats(mirror):
    from multitune.config import load_config
    from multitune.launch.plan import data_stats

    cfg = load_config(REPO / "configs" / "llama3-8b-lora.yaml", [f"hub_mirror={mirror}"])
    # the seed datasets only: the chat task's databricks-dolly-15k is not in the mirror (its rows only add steps)
    return data_stats(cfg.model_copy(update={"tasks": [t for t in cfg.tasks if t.name != "chat"]}))


@pytest.mark.mirror
@pytest.mark.parametrize("name", ["llama3-8b-lora.yaml", "llama3-8b-qlora.yaml"])
def test_llama_schedule_fires_at_a_192_global_batch(seed_data_stats, name):
    """2 epochs at 192 examples a step are ~170 optimizer steps: evaluation and checkpoints must fire in them."""
    from multitune.config import load_config

    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.batch_size == "auto" and cfg.train.global_batch_size == 192  # on any number of GPUs
    # the seed datasets' train rows (mirror README: 10,003 + 9,741 + 240), 80% of each for training
    assert seed_data_stats.examples == round(10003 * 0.8) + round(9741 * 0.8) + round(240 * 0.8)
    steps = math.ceil(seed_data_stats.examples / 192) * cfg.train.epochs
    assert 160 <= steps <= 180
    assert steps // cfg.train.eval_steps >= 3 and steps // cfg.train.save_steps >= 6


def test_plan_command_offline_on_the_tiny_model(assets, tmp_path, capsys, monkeypatch):
    import sys

    import yaml

    from multitune.cli import main

    cfg = {"model": {"name_or_path": str(assets["model"]), "max_length": 128}, "peft": {"method": "lora"},
           "tasks": [{"name": "claims", "dataset": str(assets["claims"])}], "train": {"batch_size": 4, "grad_accum": 2, "save_steps": 5}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["multitune", "plan", str(tmp_path / "c.yaml"), "--gpus", "4", "--price", "2"])
    main()
    out = capsys.readouterr().out
    assert "fits" in out and "ddp-1x4.yaml" in out and "measured with the model's tokenizer" in out
    n_train = round(72 * 0.8)  # the generated claims data: 72 rows
    assert f"data: {n_train:,} training examples" in out
    assert "global 32 = micro-batch" in out and "cost: 4 GPU(s)" in out


def test_full_fine_tuning_counts_16_bytes_a_trainable_parameter():
    """Full fine-tuning loads fp32 weights (model.weights_dtype): fp32 weight + gradient + two Adam moments."""
    cfg = config_from_dict({"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}, "peft": {"method": "full"},
                            "tasks": [{"name": "claims"}]})
    c = count(cfg)
    parts = memory(c, cfg, Layout("ddp-1x4.yaml", 1), micro_batch=1, seq=512, world=1, checkpointing=True)
    static = parts["weights"] + parts["trainable params"] + parts["gradients"] + parts["optimizer (AdamW)"]
    assert abs(static - 16 * c.params) <= 4 * c.trainable_tensors  # + AdamW's 4-byte step counter per tensor


def test_qlora_adapters_and_their_adam_moments_are_fp32():
    cfg = config_from_dict({"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}, "peft": {"method": "qlora", "r": 16},
                            "tasks": [{"name": "claims"}]})
    c = count(cfg)
    assert c.trainable == 41_943_040 and c.trainable_bytes == 4 * 41_943_040
    assert c.optimizer_bytes == 2 * 4 * 41_943_040 + 4 * c.trainable_tensors


def test_plan_memory_matches_the_recorded_2_layer_gpu_peak():
    """benchmarks/results/2026-11-27T0200-h100-gpu-check.json, section c: a 2-layer model of the 8B width, LoRA r=16
    (dropout 0), 4 packed rows of 2048 tokens a micro-batch, no checkpointing, Liger off: 7.62 GiB allocated at the
    peak. Its examples average 150.2 tokens (the record) with ~4 answer tokens each (182-226 supervised positions in
    ~8,000 tokens: tests/unit/data/gpu_record_shapes_2026-11-27.json). The old plan charged logits at every position
    and said 15.5 GiB."""
    from transformers import LlamaConfig

    from multitune.launch.plan import DataStats, make_plan

    hf = LlamaConfig(**(dict(LLAMA3_8B) | {"num_hidden_layers": 2, "max_position_embeddings": 8192}))
    cfg = config_from_dict({"model": {"name_or_path": "random-8b-2l", "max_length": 2048, "attn_implementation": "sdpa"},
                            "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                            "train": {"packing": True, "liger": False, "batch_size": 4, "grad_accum": 1}, "tasks": [{"name": "claims"}]})
    c = count(cfg, hf_config=hf)
    parts = memory(c, cfg, Layout("1gpu.yaml", 1), micro_batch=4, seq=2048, world=1, checkpointing=False,
                   answer_tokens=226 / 49, tokens_per_example=150.2)
    assert abs(sum(parts.values()) / GiB - 7.62) <= 0.1 * 7.62
    plan = make_plan(cfg, gpus=1, nodes=1, gpu="h100-80gb", counts=c, data=DataStats(100, 150.2, "given", 226 / 49))
    assert plan.fits and not plan.checkpointing and plan.micro_batch == 4


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention", "auto"])
def test_packed_rows_pay_for_a_t_by_t_mask_only_on_sdpa(attn):
    """One padding-free row of 8 x 512 tokens at 8B width: SDPA keeps a bf16 [T, T] mask in each of the 32 layers (as
    measured on the CPU: test_memory.test_packed_rows_keep_a_bf16_mask_in_every_layer), 1 GiB at T = 4096; flash-attn
    and FlexAttention take the sequence boundaries, and auto picks one of them for packed rows on a GPU."""
    def parts(implementation: str) -> dict[str, int]:
        cfg = config_from_dict({"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct", "attn_implementation": implementation},
                                "train": {"packing": True}, "tasks": [{"name": "claims"}]})
        return memory(count(cfg), cfg, Layout("1gpu.yaml", 1), micro_batch=8, seq=512, world=1, checkpointing=False)

    T = 8 * 512
    sdpa, other = parts("sdpa"), parts(attn)
    assert sdpa["attention mask"] >= 32 * 2 * T * T
    assert "attention mask" not in other
    assert other == {k: v for k, v in sdpa.items() if k != "attention mask"}


@pytest.mark.parametrize("gpu", ["a100-40gb", "h100-80gb"])
def test_plan_prints_the_auto_fit_micro_batch_and_checkpointing(gpu, capsys, monkeypatch):
    """The largest micro-batch (dividing the examples per GPU) whose peak fits the card less the margin, and
    checkpointing only when no micro-batch fits without it."""
    import re
    import sys

    from multitune.cli import main
    from multitune.config import load_config
    from multitune.launch.plan import total_with_overhead

    monkeypatch.setattr(sys, "argv", ["multitune", "plan", str(REPO / "configs" / "llama3-8b-lora.yaml"), "--gpu", gpu,
                                     "--examples", "1000", "--tokens-per-example", "150"])  # answers unknown: every position
    main()
    out = capsys.readouterr().out
    m = re.search(r"auto-fit: micro-batch (\d+) x 512 tokens, gradient checkpointing (on|off)", out)
    assert m, out
    micro, ckpt = int(m.group(1)), m.group(2) == "on"
    cfg = load_config(REPO / "configs" / "llama3-8b-lora.yaml")
    per_gpu = cfg.train.global_batch_size  # one GPU
    c, card = count(cfg), GPUS[gpu].memory

    def fits(n, checkpointing):
        return total_with_overhead(memory(c, cfg, Layout("1gpu.yaml", 1), n, 512, 1, checkpointing)) <= card

    assert fits(micro, ckpt)
    bigger = [n for n in range(micro + 1, per_gpu + 1) if per_gpu % n == 0]
    assert not any(fits(n, ckpt) for n in bigger)
    if ckpt and not cfg.train.gradient_checkpointing:  # train.gradient_checkpointing: true keeps it on
        assert not fits(1, False)
    assert f"micro-batch {micro} x {per_gpu // micro} accumulation" in out and "train.batch_size=auto chooses it" in out


def test_examples_without_tokens_where_the_data_is_unreadable_is_one_error_line(tmp_path, capsys, monkeypatch):
    """--examples alone: the mean length is measured from the data, which cannot be read here (a missing file;
    the Hub is offline): one error line, not a TypeError."""
    import sys

    from multitune.cli import main

    missing = tmp_path / "not-here" / "claims.csv"
    monkeypatch.setattr(sys, "argv", ["multitune", "plan", str(REPO / "configs" / "llama3-8b-lora.yaml"),
                                      f"tasks=[{{name: claims, dataset: {missing}}}]", "--examples", "1000"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--tokens-per-example" in err


def _readme_plan_lines():
    """README's `multitune plan ... --gpu G  # auto-fit: N x 512 ..., on|off: X GiB` lines."""
    import re

    pattern = re.compile(r"^multitune plan (\S+) --gpu (\S+)\s+# auto-fit: (\d+) x 512[^,]*, (?:checkpointing )?(on|off): "
                         r"([\d.]+) GiB", re.MULTILINE)
    return pattern.findall((REPO / "README.md").read_text())


def test_readme_lists_the_plan_figures_of_the_8b_configs():
    assert len(_readme_plan_lines()) >= 5  # the oracle below must have lines to check


@pytest.mark.parametrize("config,gpu,micro,ckpt,total", _readme_plan_lines())
def test_readme_plan_figures_are_what_plan_prints(config, gpu, micro, ckpt, total, capsys, monkeypatch):
    """The documented auto-fit choice and peak of each 8B config are what `multitune plan` prints today."""
    import re
    import sys

    from multitune.cli import main

    monkeypatch.setattr(sys, "argv", ["multitune", "plan", str(REPO / config), "--gpu", gpu])
    main()
    out = capsys.readouterr().out
    fit = re.search(r"auto-fit: micro-batch (\d+) x 512 tokens, gradient checkpointing (on|off)", out)
    peak = re.search(r"^\s+total\s+([\d.]+) GiB", out, re.MULTILINE)
    assert fit and peak, out
    assert (fit.group(1), fit.group(2), peak.group(1)) == (micro, ckpt, total)
