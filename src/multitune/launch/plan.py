"""`multitune plan`: will this config fit these GPUs, how should it be launched, how long and what will it cost.

Parameter counts are exact: the model is instantiated on PyTorch's ``meta`` device (no memory) from its
config, and the adapter is applied by PEFT with multitune's own adapter config, so every architecture and
PEFT method is counted as it will really be built. Bytes follow from how training holds them: the frozen base
in the compute dtype (bf16 on a bf16 GPU) or in NF4 with double-quantised statistics (QLoRA); full fine-tuning
in fp32 (model.weights_dtype), so 16 bytes a trainable parameter with its gradient and AdamW's moments; every
adapter in fp32 (model.adapters_in_fp32, QLoRA's too), AdamW's two moments in the parameter dtype plus one
fp32 step counter per tensor. tests/unit/test_plan.py checks these byte counts against a real tiny model
after a real optimizer step. Activations, the attention mask and the loss's logits come from
:mod:`multitune.launch.memory` (measured per token and layer from the real model code); throughput is an
estimate (``README.md``, MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from multitune.config import Config
from multitune.errors import UserError
from multitune.launch.runpod import ADAPTER_METHODS, accelerate_config_for

MiB, GiB = 1024**2, 1024**3
BLOCK, BLOCK2 = 64, 256  # bitsandbytes NF4 block size, and the block size of its double quantisation


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes, as nvidia-smi reports the card's total
    bf16_flops: float  # dense bf16 tensor-core peak


GPUS = {
    "a100-40gb": Gpu("NVIDIA A100 40GB", 40960 * MiB, 312e12),
    "a100-80gb": Gpu("NVIDIA A100 80GB", 81920 * MiB, 312e12),
    "h100-80gb": Gpu("NVIDIA H100 80GB SXM", 81559 * MiB, 989e12),
    "h100-pcie": Gpu("NVIDIA H100 80GB PCIe", 81559 * MiB, 756e12),
    "h200": Gpu("NVIDIA H200 141GB", 143771 * MiB, 989e12),
    "l40s": Gpu("NVIDIA L40S 48GB", 46068 * MiB, 362e12),
    "a6000": Gpu("NVIDIA RTX A6000 48GB", 49140 * MiB, 155e12),
    "rtx4090": Gpu("NVIDIA RTX 4090 24GB", 24564 * MiB, 165e12),
}
# Published architecture of the Llama 3 / 3.1 8B models, for planning offline (the Hub serves the same config.json).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=500000.0)
KNOWN_SHAPES = {f"meta-llama/{name}": LLAMA3_8B for name in
                ("Llama-3.1-8B-Instruct", "Llama-3.1-8B", "Meta-Llama-3-8B-Instruct", "Meta-Llama-3-8B")}
DEFAULT_MFU = {"qlora": 0.25, "other": 0.35}  # assumptions until measured on a GPU (pass --mfu)
CUDA_CONTEXT = 1 * GiB  # CUDA context, cuBLAS/NCCL workspaces: outside torch's allocator
FRAGMENTATION = 0.10  # allocator slack over the peak of live tensors


def nf4_bytes(numel: int) -> int:
    """Bytes of one bitsandbytes NF4 weight with double quantisation (bnb_4bit_use_double_quant=True):
    4-bit codes, one uint8 absmax per 64 weights, one fp32 absmax per 256 of those, a 16-entry fp32 NF4
    code book, a 256-entry fp32 code book for the absmax and one fp32 offset."""
    blocks = math.ceil(numel / BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / BLOCK2) + 16 * 4 + 256 * 4 + 4


@dataclass
class Counts:
    """What the planner knows about the model as it will be trained (exact, from the meta-device build)."""

    params: int  # base model parameters (tied weights once)
    matmul_params: int  # P in the MFU formula: every matmul weight, the output head included, not the embedding
    weight_bytes: int  # the base model as loaded (compute dtype, or NF4 for QLoRA)
    trainable: int
    trainable_tensors: int
    trainable_bytes: int  # one copy of the trainable parameters (and so of their gradients)
    largest_layer_bytes: int  # one decoder layer's parameters: what FSDP gathers at a time
    layer_trainable: int  # trainable parameters of one decoder layer
    adapted_inputs: int  # per token and layer, input elements of the adapted linear layers (what LoRA dropout drops)
    largest_weight: int  # elements of the largest decoder linear weight
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    notes: list[str] = field(default_factory=list)

    @property
    def optimizer_bytes(self) -> int:
        """AdamW: exp_avg and exp_avg_sq in the parameter dtype, plus a 4-byte step counter per tensor."""
        return 2 * self.trainable_bytes + 4 * self.trainable_tensors


def model_config(cfg: Config):
    """The base model's transformers config: local dir, mirror, Hub; or the published shape when offline."""
    from transformers import AutoConfig, LlamaConfig

    from multitune.hub import mirror_root, resolve

    ref = cfg.model.name_or_path
    try:
        return AutoConfig.from_pretrained(resolve(ref, "model", mirror_root(cfg.hub_mirror)), revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code), None
    except (OSError, ValueError) as e:
        if ref in KNOWN_SHAPES:
            return LlamaConfig(**KNOWN_SHAPES[ref]), f"{ref}'s config.json unreachable ({type(e).__name__}): used its published shape"
        raise UserError(f"cannot read the config of model {ref} ({str(e).splitlines()[0]}); plan needs its shape: "
                        "pass a local directory or go online") from None


def count(cfg: Config, compute_dtype: torch.dtype = torch.bfloat16, hf_config=None) -> Counts:
    """Exact parameter and byte counts for ``cfg`` trained in ``compute_dtype`` (bf16 on a bf16 GPU)."""
    from transformers import AutoModelForCausalLM

    from multitune.modeling.load import apply_peft

    notes = []
    if hf_config is None:
        hf_config, note = model_config(cfg)
        notes += [note] if note else []
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=compute_dtype, trust_remote_code=cfg.model.trust_remote_code)
    size = torch.finfo(compute_dtype).bits // 8
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    # bitsandbytes quantises every linear layer but the output head (transformers' get_keys_to_not_convert)
    nf4 = {id(m.weight) for m in linear.values() if m is not head} if cfg.peft.method == "qlora" else set()
    base = {id(p): p for p in model.parameters()}  # tied weights once
    matmul = sum(m.weight.numel() for m in linear.values() if m is not head) + (head.weight.numel() if head is not None else 0)
    layer = max(model.model.layers, key=lambda m: sum(p.numel() for p in m.parameters())) if hasattr(model, "model") else None
    layer_bytes = sum(p.numel() for p in layer.parameters()) * size if layer is not None else 0

    with torch.device("meta"):
        # multitune's own adapter setup; for QLoRA it includes model.prepare_4bit, which leaves every parameter that
        # is not 4-bit (embeddings, norms, output head) in the compute dtype
        trained = apply_peft(model, cfg, False) if cfg.peft.method != "full" else model
    weight_bytes = sum(nf4_bytes(p.numel()) if key in nf4 else p.numel() * p.element_size() for key, p in base.items())
    trainable = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]
    # adapters are kept in fp32 (model.adapters_in_fp32); full fine-tuning trains the weights as loaded for training,
    # fp32 unless model.dtype names another (model.weights_dtype)
    dtype_of = {n: torch.float32 for n, _ in trainable}
    if cfg.peft.method == "full":
        full = torch.float32 if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
        dtype_of = {n: full for n, _ in trainable}
        weight_bytes = sum(p.numel() for p in base.values()) * (torch.finfo(full).bits // 8)
    tcfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = tcfg.num_attention_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads
    return Counts(
        params=sum(p.numel() for p in base.values()), matmul_params=matmul, weight_bytes=weight_bytes,
        trainable=sum(p.numel() for _, p in trainable), trainable_tensors=len(trainable),
        trainable_bytes=sum(p.numel() * (torch.finfo(dtype_of[n]).bits // 8) for n, p in trainable),
        largest_layer_bytes=layer_bytes, layer_trainable=sum(p.numel() for n, p in trainable if ".layers.0." in n),
        adapted_inputs=sum(m.in_features for n, m in trained.named_modules() if ".layers.0." in n and hasattr(m, "lora_A")
                           and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)),
        largest_weight=max((m.weight.numel() for m in linear.values() if m is not head), default=0), layers=tcfg.num_hidden_layers, hidden=tcfg.hidden_size,
        intermediate=getattr(tcfg, "intermediate_size", 4 * tcfg.hidden_size),
        kv_dim=getattr(tcfg, "num_key_value_heads", heads) * head_dim, vocab=tcfg.vocab_size, notes=notes,
    )


def step_for(c: Counts, cfg: Config, micro_batch: int, seq: int, checkpointing: bool, answer_tokens: float | None = None,
             tokens_per_example: float | None = None):
    """The micro-batch as the trainer will run it: ``micro_batch`` rows of ``seq`` tokens (model.max_length, the worst
    case), or with train.packing one padding-free row of them; the loss on every position, or (train.loss_positions:
    supervised) on the answers: ``answer_tokens`` per example (the longest seen in the data), all positions if unknown."""
    from multitune.launch.memory import Step
    from multitune.modeling.load import attention
    from multitune.modeling.speed import liger_available

    packed = cfg.train.packing
    rows, length = (1, micro_batch * seq) if packed else (micro_batch, seq)
    supervised = micro_batch * seq
    if cfg.train.loss_positions == "supervised" and answer_tokens:
        share = min(1.0, answer_tokens / tokens_per_example) if packed and tokens_per_example else None
        supervised = math.ceil(micro_batch * seq * share) if share else micro_batch * min(seq, math.ceil(answer_tokens))
    liger = cfg.train.liger is True or (cfg.train.liger == "auto" and liger_available())
    return Step(rows, length, supervised, masked=True, checkpointing=checkpointing, attention=attention(cfg, for_training=True, cuda=True),
                liger=liger, loss="supervised" if cfg.train.loss_positions == "supervised" else "all")


def activation_parts(c: Counts, cfg: Config, step) -> dict[str, int]:
    """The step's activations, attention mask and logits at its peak (multitune.launch.memory: measured coefficients)."""
    from multitune.launch.memory import Arch, coefficients_for
    from multitune.launch.memory import activation_parts as parts

    coef, _ = coefficients_for(cfg.peft.method, cfg.peft.dropout)
    arch = Arch(c.hidden, c.intermediate, c.layers, c.vocab, c.layer_trainable, c.adapted_inputs, c.largest_weight)
    return parts(coef, arch, step, cfg.peft.method, cfg.peft.dropout)


@dataclass
class Layout:
    accelerate_config: str
    shards: int  # how many GPUs share one copy of weights/gradients/optimizer (1: replicated)


STATIC_PARTS = ("weights", "trainable params", "gradients", "optimizer (AdamW)", "DDP gradient buckets")  # not activations


def memory(c: Counts, cfg: Config, layout: Layout, micro_batch: int, seq: int, world: int, checkpointing: bool,
           answer_tokens: float | None = None, tokens_per_example: float | None = None) -> dict[str, int]:
    """Per-GPU bytes by component (peak of live tensors, comparable to torch.cuda.max_memory_allocated)."""
    shard = layout.shards
    out = {
        "weights": c.weight_bytes // shard + (2 * c.largest_layer_bytes if shard > 1 else 0),
        "trainable params": c.trainable_bytes // shard if cfg.peft.method != "full" else 0,
        "gradients": c.trainable_bytes // shard,
        "optimizer (AdamW)": c.optimizer_bytes // shard,
        **activation_parts(c, cfg, step_for(c, cfg, micro_batch, seq, checkpointing, answer_tokens, tokens_per_example)),
    }
    if shard == 1 and world > 1:
        out["DDP gradient buckets"] = c.trainable_bytes
    return out


def total_with_overhead(parts: dict[str, int]) -> int:
    return int(sum(parts.values()) * (1 + FRAGMENTATION)) + CUDA_CONTEXT


def choose_layout(c: Counts, cfg: Config, gpus: int, nodes: int, gpu: Gpu, seq: int, checkpointing: bool) -> Layout:
    """DDP for adapters when a replica fits one GPU (cheapest communication); else shard (FSDP2 / HSDP)."""
    world = gpus * nodes
    name = accelerate_config_for(cfg.peft.method, nodes, gpus)
    replicated = Layout(name, 1)
    if world == 1:
        return replicated
    if cfg.peft.method in ADAPTER_METHODS and total_with_overhead(memory(c, cfg, replicated, 1, seq, world, checkpointing)) <= gpu.memory:
        return replicated
    return Layout("fsdp2-1x4.yaml" if nodes == 1 else "hsdp-3x4.yaml", gpus)


def flops_per_token(c: Counts, cfg: Config, seq: int) -> float:
    """F in README's MFU formula: 6P (full) or 4P + 6P_adapter (frozen base), plus 6·L·s·d for attention."""
    attention = 6 * c.layers * seq * c.hidden
    if cfg.peft.method == "full":
        return 6 * c.matmul_params + attention
    return 4 * c.matmul_params + 6 * c.trainable + attention


@dataclass
class DataStats:
    examples: int | None  # training examples per epoch, after max_rows, the validation split and weights
    tokens: float | None  # mean tokens per training example (prompt + answer)
    source: str
    answer_tokens: float | None = None  # the most supervised (answer) tokens of one example in the sample


def data_stats(cfg: Config, sample: int = 200) -> DataStats:
    """Count the training examples and measure their length (the tokenizer's, else ~4 characters a token)."""
    from multitune.data.formatting import Formatter
    from multitune.hub import mirror_root
    from multitune.modeling.load import load_tokenizer
    from multitune.tasks import build_task

    mirror = mirror_root(cfg.hub_mirror)
    try:
        formatter = Formatter(load_tokenizer(cfg.model, mirror), cfg.model.max_length)
        how = "measured with the model's tokenizer"
    except (UserError, OSError, ValueError):
        formatter, how = None, "estimated at 4 characters a token (tokenizer not readable here)"
    total, weighted_len, answers = 0, 0.0, [0.0]
    try:
        for tcfg in cfg.tasks:
            task = build_task(tcfg)
            ds = task.load(mirror, cfg.data.drop_unlabelled)
            n = min(len(ds), task.cfg.max_rows or len(ds))
            n_train = max(1, round(round(n * (1 - cfg.data.val_fraction)) * task.cfg.weight))
            rows = ds.shuffle(seed=cfg.seed).select(range(min(sample, len(ds))))
            examples = [task.example(r) for r in rows]
            if formatter is not None:
                encoded = formatter.encode(examples)
                lengths = [len(ids) for ids in encoded["input_ids"]]
                answers += [sum(t != -100 for t in lab) for lab in encoded["labels"]]
            else:  # ~4 characters a token, plus ~5 template tokens a message
                lengths = [sum(len(m["content"]) for m in ex.messages) / 4 + len(ex.target) / 4 + 5 * (len(ex.messages) + 1)
                           for ex in examples]
                answers += [len(ex.target) / 4 + 5 for ex in examples]
            total += n_train
            weighted_len += n_train * sum(lengths) / len(lengths)
    except UserError as e:
        return DataStats(None, None, f"datasets not readable here ({e}); pass --examples and --tokens-per-example")
    return DataStats(total, weighted_len / total, how, max(answers))


@dataclass
class Plan:
    counts: Counts
    gpu: Gpu
    nodes: int
    gpus: int
    layout: Layout
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    parts: dict[str, int]
    fits: bool
    data: DataStats
    mfu: float
    lines: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus


def make_plan(cfg: Config, *, gpus: int, nodes: int, gpu: str, global_batch: int | None = None, mfu: float | None = None,
              data: DataStats | None = None, counts: Counts | None = None) -> Plan:
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown; choose one of {', '.join(GPUS)}")
    if gpus < 1 or nodes < 1:
        raise UserError("--gpus and --nodes must be at least 1")
    card, world = GPUS[gpu], gpus * nodes
    c = counts or count(cfg)
    target = global_batch or global_batch_of(cfg, world)
    if target % world:
        raise UserError(f"a global batch of {target} does not split over {world} GPUs; pass --global-batch as a multiple of {world}")
    data = data or data_stats(cfg)
    layout, micro, checkpointing, parts, fits = fit_on(c, cfg, card, gpus, nodes, target // world, data)
    return Plan(c, card, nodes, gpus, layout, micro, target // world // micro, checkpointing, parts, fits, data,
                mfu or DEFAULT_MFU["qlora" if cfg.peft.method == "qlora" else "other"])


def global_batch_of(cfg: Config, world: int) -> int:
    """Examples per optimizer step: train.global_batch_size, else batch_size x grad_accum x processes."""
    return cfg.train.global_batch_size or cfg.train.batch_size * cfg.train.grad_accum * world


def checkpointing_options(cfg: Config) -> tuple[bool, ...]:
    """train.gradient_checkpointing: true keeps it on; else auto-fit turns it on only when nothing fits without."""
    return (True,) if cfg.train.gradient_checkpointing else (False, True)


def fit_on(c: Counts, cfg: Config, card: Gpu, gpus: int, nodes: int, per_gpu: int, data: DataStats, layout: Layout | None = None):
    """Auto-fit (train.batch_size: auto, and `plan`): the largest micro-batch dividing ``per_gpu`` examples whose peak at
    model.max_length fits ``card`` less the margin (total_with_overhead), checkpointing only when none fits without;
    (layout, micro-batch, checkpointing, memory parts, fits). Nothing fits: micro-batch 1 with checkpointing, fits False.
    ``layout``: the launch's own (else the one `plan` would choose)."""
    seq, world = cfg.model.max_length, gpus * nodes
    for checkpointing in (checkpointing_options(cfg) if cfg.train.batch_size == "auto" else (False, True)):
        lay = layout or choose_layout(c, cfg, gpus, nodes, card, seq, checkpointing)
        for micro in sorted((m for m in range(1, per_gpu + 1) if per_gpu % m == 0), reverse=True):
            parts = memory(c, cfg, lay, micro, seq, world, checkpointing, data.answer_tokens, data.tokens)
            fits = total_with_overhead(parts) <= card.memory
            if fits or (checkpointing and micro == 1):
                return lay, micro, checkpointing, parts, fits
    raise AssertionError("unreachable: micro-batch 1 with checkpointing always returns")


def fit_advice(cfg: Config) -> str:
    """What makes a config that does not fit the card fit."""
    if cfg.peft.method == "full":
        return ("an adapter (peft.method=lora or qlora), a shorter model.max_length, FSDP over more GPUs (it shards the "
                "weights, gradients and optimizer state), or a larger GPU")
    return "peft.method=qlora, a shorter model.max_length, more GPUs (FSDP shards the weights), or a larger GPU"
