"""`multitune plan`: will this config fit these GPUs, how should it be launched, how long and what will it cost.

Parameter counts are exact: the model is instantiated on PyTorch's ``meta`` device (no memory) from its
config, and the adapter is applied by PEFT with multitune's own adapter config, so every architecture and
PEFT method is counted as it will really be built. Bytes follow from how training holds them: the frozen base
in the compute dtype (bf16 on a bf16 GPU) or in NF4 with double-quantised statistics (QLoRA), the adapter in
fp32 (PEFT upcasts it) except under QLoRA, where TRL casts it to bf16, AdamW's two moments in the parameter
dtype plus one fp32 step counter per tensor. tests/unit/test_plan.py checks these byte counts against a real
tiny model after a real optimizer step. Activations, logits and throughput are estimates, with their formulas
stated in :func:`activation_bytes` and ``README.md`` (MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from multitune.config import Config
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
        from multitune.errors import UserError

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
        # multitune's own adapter setup; for QLoRA it includes PEFT's prepare_model_for_kbit_training, which
        # upcasts every parameter that is not 4-bit (embeddings, norms, output head) to fp32
        trained = apply_peft(model, cfg, False) if cfg.peft.method != "full" else model
    weight_bytes = sum(nf4_bytes(p.numel()) if key in nf4 else p.numel() * p.element_size() for key, p in base.items())
    trainable = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]
    if cfg.peft.method == "qlora":
        # TRL's SFTTrainer casts a quantised model's trainable parameters to bf16, DoRA magnitudes excepted
        dtype_of = {n: (p.dtype if "lora_magnitude_vector" in n else torch.bfloat16) for n, p in trainable}
    else:
        dtype_of = {n: p.dtype for n, p in trainable}
    tcfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = tcfg.num_attention_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads
    return Counts(
        params=sum(p.numel() for p in base.values()), matmul_params=matmul, weight_bytes=weight_bytes,
        trainable=sum(p.numel() for _, p in trainable), trainable_tensors=len(trainable),
        trainable_bytes=sum(p.numel() * (torch.finfo(dtype_of[n]).bits // 8) for n, p in trainable),
        largest_layer_bytes=layer_bytes, layers=tcfg.num_hidden_layers, hidden=tcfg.hidden_size,
        intermediate=getattr(tcfg, "intermediate_size", 4 * tcfg.hidden_size),
        kv_dim=getattr(tcfg, "num_key_value_heads", heads) * head_dim, vocab=tcfg.vocab_size, notes=notes,
    )


def activation_bytes(c: Counts, cfg: Config, tokens: int, checkpointing: bool) -> int:
    """Estimated activation memory for ``tokens`` (micro-batch x sequence length) tokens, bf16.

    Per token and decoder layer: attention ~ 6d + 2·kv values, the SwiGLU MLP ~ d + 4·I, the two RMSNorms
    upcast to fp32 (4 more d-sized values), and for LoRA with dropout one dropped-out copy of each adapted
    projection's input plus its mask (~6d + I values at 3 bytes). SDPA/flash attention keep no s x s matrix.
    With checkpointing only each layer's input is kept, and one layer is recomputed at a time.
    """
    d, i, kv = c.hidden, c.intermediate, c.kv_dim
    per_token_layer = 2 * (6 * d + 2 * kv) + 2 * (d + 4 * i) + 2 * 4 * d
    if cfg.peft.method in ("lora", "qlora", "dora", "rslora") and cfg.peft.dropout > 0:
        per_token_layer += 3 * (6 * d + i)
    if checkpointing:
        return tokens * (c.layers * 2 * d + per_token_layer)
    return tokens * c.layers * per_token_layer


def logits_bytes(c: Counts, tokens: int) -> int:
    """bf16 logits, their fp32 copy for the loss, and the fp32 log-softmax kept for backward: 10 bytes a logit."""
    return tokens * c.vocab * (2 + 4 + 4)


@dataclass
class Layout:
    accelerate_config: str
    shards: int  # how many GPUs share one copy of weights/gradients/optimizer (1: replicated)


def memory(c: Counts, cfg: Config, layout: Layout, micro_batch: int, seq: int, world: int, checkpointing: bool) -> dict[str, int]:
    """Per-GPU bytes by component (peak of live tensors, comparable to torch.cuda.max_memory_allocated)."""
    shard = layout.shards
    out = {
        "weights": c.weight_bytes // shard + (2 * c.largest_layer_bytes if shard > 1 else 0),
        "trainable params": c.trainable_bytes // shard if cfg.peft.method != "full" else 0,
        "gradients": c.trainable_bytes // shard,
        "optimizer (AdamW)": c.optimizer_bytes // shard,
        "activations": activation_bytes(c, cfg, micro_batch * seq, checkpointing),
        "logits": logits_bytes(c, micro_batch * seq),
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


def data_stats(cfg: Config, sample: int = 200) -> DataStats:
    """Count the training examples and measure their length (the tokenizer's, else ~4 characters a token)."""
    from multitune.errors import UserError
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
    total, weighted_len = 0, 0.0
    try:
        for tcfg in cfg.tasks:
            task = build_task(tcfg)
            ds = task.load(mirror, cfg.data.drop_unlabelled)
            n = min(len(ds), task.cfg.max_rows or len(ds))
            n_train = max(1, round(round(n * (1 - cfg.data.val_fraction)) * task.cfg.weight))
            rows = ds.shuffle(seed=cfg.seed).select(range(min(sample, len(ds))))
            examples = [task.example(r) for r in rows]
            if formatter is not None:
                lengths = [len(ids) for ids in formatter.encode(examples)["input_ids"]]
            else:  # ~4 characters a token, plus ~5 template tokens a message
                lengths = [sum(len(m["content"]) for m in ex.messages) / 4 + len(ex.target) / 4 + 5 * (len(ex.messages) + 1)
                           for ex in examples]
            total += n_train
            weighted_len += n_train * sum(lengths) / len(lengths)
    except UserError as e:
        return DataStats(None, None, f"datasets not readable here ({e}); pass --examples and --tokens-per-example")
    return DataStats(total, weighted_len / total, how)


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
    from multitune.errors import UserError

    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown; choose one of {', '.join(GPUS)}")
    if gpus < 1 or nodes < 1:
        raise UserError("--gpus and --nodes must be at least 1")
    card, world, seq = GPUS[gpu], gpus * nodes, cfg.model.max_length
    c = counts or count(cfg)
    target = global_batch or cfg.train.batch_size * cfg.train.grad_accum * world
    if target % world:
        raise UserError(f"a global batch of {target} does not split over {world} GPUs; pass --global-batch as a multiple of {world}")
    plan = None
    for checkpointing in ([cfg.train.gradient_checkpointing] + ([True] if not cfg.train.gradient_checkpointing else [])):
        layout = choose_layout(c, cfg, gpus, nodes, card, seq, checkpointing)
        for micro in (32, 16, 8, 4, 2, 1):
            if (target // world) % micro:
                continue
            parts = memory(c, cfg, layout, micro, seq, world, checkpointing)
            if total_with_overhead(parts) <= card.memory or micro == 1:
                plan = Plan(c, card, nodes, gpus, layout, micro, target // world // micro, checkpointing, parts,
                            total_with_overhead(parts) <= card.memory, DataStats(None, None, ""), 0.0)
                break
        if plan.fits:
            break
    plan.data = data or data_stats(cfg)
    plan.mfu = mfu or DEFAULT_MFU["qlora" if cfg.peft.method == "qlora" else "other"]
    return plan


def _gib(n: float) -> str:
    return f"{n / GiB:7.2f} GiB"


def report(cfg: Config, plan: Plan, price: float | None, config_name: str) -> str:
    c, p, seq = plan.counts, plan, cfg.model.max_length
    out = [f"plan for {config_name} on {p.nodes} node(s) x {p.gpus} {p.gpu.name} ({p.gpu.memory / GiB:.1f} GiB each)"]
    out += [f"note: {n}" for n in c.notes]
    method = cfg.peft.method + (f" r={cfg.peft.r}" if cfg.peft.method in ("lora", "qlora", "dora", "rslora") else "")
    out.append(f"model: {cfg.model.name_or_path}, {c.params / 1e9:.2f}B parameters; {method}: {c.trainable / 1e6:.1f}M trainable "
               f"({100 * c.trainable / c.params:.2f}%)")
    ckpt = "on" if p.checkpointing else "off"
    out.append(f"\nper-GPU memory, micro-batch {p.micro_batch} x {seq} tokens (model.max_length), gradient checkpointing {ckpt}:")
    for name, value in p.parts.items():
        out.append(f"  {name:24s}{_gib(value)}")
    other = activation_bytes(c, cfg, p.micro_batch * seq, not p.checkpointing)
    out.append(f"  ({'without' if p.checkpointing else 'with'} checkpointing the activations would be {other / GiB:.2f} GiB)")
    total = total_with_overhead(p.parts)
    out.append(f"  {'total':24s}{_gib(total)}  (+{FRAGMENTATION:.0%} allocator slack, +{CUDA_CONTEXT / GiB:.0f} GiB CUDA context) "
               f"of {p.gpu.memory / GiB:.1f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}")
    if not p.fits:
        out.append("  to fit: peft.method=qlora, a shorter model.max_length, more GPUs (FSDP shards the weights), or a larger GPU")
    if p.checkpointing and not cfg.train.gradient_checkpointing:
        out.append("  needs train.gradient_checkpointing=true")
    if p.world == 1:
        why = "one process"
    elif p.layout.shards == 1:
        why = "replicated: only the trainable parameters' gradients are exchanged"
    else:
        why = f"weights, gradients and optimizer sharded over the {p.layout.shards} GPUs of a node"
    out.append(f"\nlaunch: configs/accelerate/{p.layout.accelerate_config} ({why})")
    out.append(f"batch: global {p.micro_batch * p.grad_accum * p.world} = micro-batch {p.micro_batch} x {p.grad_accum} accumulation "
               f"x {p.world} GPU(s)  ->  train.batch_size={p.micro_batch} train.grad_accum={p.grad_accum}")
    if p.data.examples is None:
        out.append(f"data: {p.data.source}")
        return "\n".join(out) + "\n"
    global_batch = p.micro_batch * p.grad_accum * p.world
    steps = math.ceil(math.ceil(p.data.examples / (p.micro_batch * p.world)) / p.grad_accum) * cfg.train.epochs
    out.append(f"data: {p.data.examples:,} training examples x {cfg.train.epochs:g} epochs, {p.data.tokens:.0f} tokens each "
               f"on average ({p.data.source})")
    fires = []
    for what, every in (("evaluation", cfg.train.eval_steps), ("checkpoint", cfg.train.save_steps)):
        if every:
            n = int(steps // every)
            fires.append(f"{what} every {every} steps -> {n}" + ("  (NEVER: lower it)" if n == 0 else ""))
    out.append(f"schedule: ~{steps:.0f} optimizer steps of {global_batch} examples; " + "; ".join(fires))
    flops = flops_per_token(c, cfg, round(p.data.tokens))
    tps = p.mfu * p.world * p.gpu.bf16_flops / flops
    tokens = p.data.examples * cfg.train.epochs * p.data.tokens
    hours = tokens / tps / 3600
    out.append(f"speed: {flops:.2e} FLOPs a token; at MFU {p.mfu:.2f} (assumed; --mfu) on {p.world} x "
               f"{p.gpu.bf16_flops / 1e12:.0f} TFLOP/s: {tps:,.0f} tokens/s")
    out.append(f"time: {tokens / 1e6:.1f}M tokens -> {hours * 60:.0f} min of training steps (loading, evaluation and "
               "checkpoints not included; padding adds more)")
    if price is not None:
        out.append(f"cost: {p.world} GPU(s) x {hours:.2f} h x ${price:.2f}/GPU-hour = ${p.world * hours * price:.2f}")
    else:
        out.append("cost: pass --price DOLLARS_PER_GPU_HOUR")
    return "\n".join(out) + "\n"
