"""Training memory at its peak on one GPU: measured from the real model code, plus what only a GPU does.

What a training step holds beyond its static tensors (weights, trainable parameters, gradients, AdamW) is
measured, not guessed: :func:`measure` runs the real code (transformers' Llama layers, multitune's PEFT
wrappers and fp32 adapters, bf16 autocast, dropout, multitune's supervised-positions loss or the model's
own all-positions loss) for one forward and backward on the CPU, and :class:`LivePeak` counts the bytes
of every tensor storage the step creates, live now and at their peak (the CPU analogue of
``torch.cuda.max_memory_allocated``). :func:`measure_coefficients` derives per-token, per-layer bytes
from a slice of 1 and 2 decoder layers at two lengths, at 1/8 of Llama 3 8B's width (d=512, I=1792, 4
heads, 1 KV head, head_dim 128: every width divided by 8); bytes per token grow linearly with every width,
so :data:`LLAMA3_8B_MEASURED` is stored per unit of hidden width (the rank-r LoRA activations, <0.2% at
r=16, are scaled with the rest). tests/unit/test_memory.py re-measures them.

Modelled, because the CPU cannot show it (each said where it is used):
- the attention kernel: SDPA on a GPU runs flash / memory-efficient kernels that keep O(T) per row, as the
  CPU's flash kernel does; an explicit mask (padding, or packed sequences in one padding-free row) is
  converted to a bf16 [rows, 1, T, T] bias that each layer keeps for backward (seen on the CPU, the same
  conversion in PyTorch's SDPA front end); flash_attention_2 (cu_seqlens) and flex_attention (a BlockMask: one
  int32 index per 128 x 128 tile, under 0.1 MiB at T = 8192) keep no T x T term; eager keeps the T x T scores;
- Liger's RMSNorm and SwiGLU kernels (CUDA only) keep the bf16 input and the gate and up projections
  instead of the fp32 normalised copy and the SiLU output: 4d + 2I bytes less per token and layer;
- dropout: CUDA's fused kernel keeps a 1-byte mask per dropped element where the CPU keeps its noise tensor
  (bf16 or fp32, the input's dtype; measured apart as ``dropout_noise``);
- TRL's fused LM head (Triton devices) scores only labelled positions in [4096 x 32768] tiles;
- bitsandbytes 4-bit layers dequantise one weight at a time to bf16 for each matmul (forward and backward).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

GiB = 1024**3
SCALE = 8  # measured at 1/SCALE of the model's widths
# Llama 3 8B / 8: the widths of the measured slice
SLICE = {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128}
TOKEN_TILE, VOCAB_TILE = 4096, 32768  # TRL 1.16's chunked log-prob head (trl/kernels/chunked_logprob.py)


class LivePeak(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while the mode is active: live now, and the peak.

    Storages that existed before (``existing``: parameters, gradients, inputs) are not counted; a storage
    counts once however many views share it, and stops counting when PyTorch frees it.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for t in existing:
            self._seen[t.untyped_storage()] = None

    def _freed(self, n: int, _ref) -> None:
        self.live -= n

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = (weakref.ref(st, lambda r, n=n: self._freed(n, r)), self._op, n)
        self.live += n
        self.peak = max(self.peak, self.live)

    def live_from(self, op: str) -> int:
        """Live bytes of the storages that ops named ``op`` created (e.g. "empty_like": CPU dropout draws its noise into one)."""
        return sum(v[2] for v in self._seen.values() if v is not None and op in v[1])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = str(func)
        tree_map_only(torch.Tensor, self._track, out)
        return out


def _peft_cfg(method: str, r: int, dropout: float, target_modules="all-linear"):
    from multitune.config import config_from_dict

    return config_from_dict({"model": {"name_or_path": "slice"}, "tasks": [{"name": "claims"}],
                             "peft": {"method": method, "r": r, "alpha": 2 * r, "dropout": dropout, "target_modules": target_modules}})


def _slice_model(method: str, r: int, dropout: float, layers: int, vocab: int, widths: dict, checkpointing: bool):
    """A Llama slice with random weights, wrapped as multitune trains it (PEFT adapters kept in fp32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from multitune.modeling import load as mt_model

    torch.manual_seed(0)
    hf = LlamaConfig(**widths, num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=False, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32 if method == "full" else torch.bfloat16)
    if method != "full":
        resolve = mt_model.hub.resolve
        mt_model.hub.resolve = lambda *a, **k: None  # no tokenizer needed: the adapter is built from the model
        try:
            model = mt_model.apply_peft(model, _peft_cfg(method, r, dropout))
        finally:
            mt_model.hub.resolve = resolve
        mt_model.adapters_in_fp32(model)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return model.train()


def measure(method: str, *, layers: int, tokens: int, sequences: int = 1, supervised: int = 1, r: int = 16, dropout: float = 0.0,
            checkpointing: bool = False, loss: str = "supervised", vocab: int = 32, widths: dict | None = None) -> dict[str, int]:
    """Bytes one training micro-batch of ``tokens`` tokens creates on the CPU: kept after the forward, and the peak.

    One row; ``sequences`` > 1 packs that many equal sequences padding-free (position_ids restart, as TRL's
    padding-free collator does), which makes transformers build a block-diagonal mask. Gradients exist
    before the step (they are static memory), so accumulating into them counts nothing.
    """
    from multitune.modeling.loss import supervised_loss

    model = _slice_model(method, r, dropout, layers, vocab, widths or SLICE, checkpointing)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[0, tokens - supervised:] = ids[0, tokens - supervised:]
    inputs = {"input_ids": ids, "labels": labels}
    if sequences > 1:
        inputs["position_ids"] = torch.arange(tokens // sequences).repeat(sequences)[None]
    existing = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None), *model.buffers(), *inputs.values()]
    with LivePeak(existing) as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if loss == "supervised":
                value = supervised_loss(model, inputs)[0]
            else:
                value = model(**inputs, use_cache=False).loss
        kept, noise = live.live, live.live_from("empty_like")
        value.backward()
        del value
    return {"kept": kept, "peak": live.peak, "dropout_noise": noise}


@dataclass(frozen=True)
class Coefficients:
    """Bytes per token per unit of hidden width (multiply by d), per decoder layer and per micro-batch."""

    kept_per_layer: float  # kept for backward by one decoder layer
    working: float  # on top of every layer's kept bytes at the peak: embeddings, final norm, backward temporaries
    ckpt_kept_per_layer: float  # with gradient checkpointing: what a layer keeps (its input)
    ckpt_working: float  # with checkpointing: one layer recomputed and its backward, embeddings, temporaries
    mask_per_layer: float  # bytes per mask element ([rows, 1, T, T]) each layer keeps: the bf16 converted bias
    mask_working: float  # the boolean mask itself, built once per forward
    logit_peak: float  # bytes per supervised logit (positions x vocab) at the loss's peak: bf16 logits, fp32 copies, grads
    logit_peak_all: float  # the same for the model's own loss on every position (train.loss_positions: all)
    per_trainable_param: float  # bytes per trainable parameter of a layer, kept whatever the length (autocast's bf16 copies)
    dropout_noise: float = 0.0  # of kept_per_layer: CPU dropout's noise tensors (the input's dtype; a GPU keeps 1-byte masks)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


def measure_coefficients(method: str, dropout: float = 0.0, r: int = 16, tokens: tuple[int, int] = (128, 256)) -> Coefficients:
    """Fit :class:`Coefficients` from measured steps of a 1- and 2-layer slice at two lengths (10 small steps)."""
    d = SLICE["hidden_size"]
    a, b = tokens
    runs = {(L, n, c): measure(method, layers=L, tokens=n, r=r, dropout=dropout, checkpointing=c)
            for L in (1, 2) for n in tokens for c in (False, True)}

    def per_layer(key: str, c: bool) -> float:
        return (runs[2, b, c][key] - runs[1, b, c][key] - runs[2, a, c][key] + runs[1, a, c][key]) / (b - a) / d

    def working(c: bool, kept: float) -> float:
        return (runs[1, b, c]["peak"] - runs[1, a, c]["peak"]) / (b - a) / d - kept

    kept, ckpt_kept = per_layer("kept", False), per_layer("kept", True)
    noise = per_layer("dropout_noise", False)
    packed = measure(method, layers=2, tokens=b, sequences=2, r=r, dropout=dropout)
    mask = (packed["kept"] - runs[2, b, False]["kept"]) / 2 / b**2
    mask_working = (packed["peak"] - runs[2, b, False]["peak"]) / b**2 - 2 * mask
    vocab, positions = 4096, 64
    logits = [measure(method, layers=1, tokens=positions + 1, supervised=s, vocab=vocab, r=r, dropout=dropout)["peak"] for s in (1, positions)]
    every = [measure(method, layers=1, tokens=n, vocab=vocab, r=r, dropout=dropout, loss="all")["peak"] for n in (positions, 2 * positions)]
    fixed = runs[2, a, False]["kept"] - runs[1, a, False]["kept"] - kept * d * a
    layer = _slice_model(method, r, dropout, 1, 32, SLICE, False).get_decoder().layers[0]
    layer_params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return Coefficients(kept, working(False, kept), ckpt_kept, working(True, ckpt_kept), mask, mask_working,
                        (logits[1] - logits[0]) / (positions - 1) / vocab, (every[1] - every[0]) / positions / vocab,
                        fixed / layer_params, noise)


# Measured with measure_coefficients() at SLICE (torch 2.13 CPU, transformers 5.24, peft 0.21.2; `python -m multitune.launch.memory`).
# Bytes per token per unit of hidden width, except mask_* (per mask element), logit_* (per logit), per_trainable_param.
LLAMA3_8B_MEASURED = {
    "lora": Coefficients(kept_per_layer=53.484, working=30.008, ckpt_kept_per_layer=2.0, ckpt_working=85.5, mask_per_layer=2.0,
                         mask_working=0.969, logit_peak=8.263, logit_peak_all=18.811, per_trainable_param=2.0),
    "lora+dropout": Coefficients(kept_per_layer=91.484, working=28.008, ckpt_kept_per_layer=2.0, ckpt_working=137.5, mask_per_layer=2.0,
                                 mask_working=0.969, logit_peak=8.263, logit_peak_all=18.811, per_trainable_param=2.0,
                                 dropout_noise=38.0),
    "full": Coefficients(kept_per_layer=59.047, working=6.0, ckpt_kept_per_layer=4.0, ckpt_working=61.062, mask_per_layer=5.0,
                         mask_working=0.0, logit_peak=8.263, logit_peak_all=18.811, per_trainable_param=1.999),
}
# The loss-path figures (logit_*) are the frozen-head LoRA measurement for every method: with a 4096-word vocabulary
# the full fine-tuning slice peaks elsewhere (its head's bf16 weight copy), so its own logit figure says nothing.
GPU_DROPOUT_MASK = 1  # bytes per dropped element: CUDA's fused native_dropout keeps a bool mask; the CPU's dropout
# (ATen's _dropout_impl) keeps a noise tensor of the input's dtype, measured as Coefficients.dropout_noise


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    layer_trainable: int  # trainable parameters of one decoder layer
    adapted_inputs: int  # per token and layer, the input elements that LoRA dropout acts on (sum of adapted in_features)
    largest_weight: int  # elements of the largest linear weight (what bitsandbytes dequantises at a time)


@dataclass(frozen=True)
class Step:
    """One micro-batch as it runs on the GPU."""

    rows: int  # rows in the micro-batch (padding-free packing: 1 row holding every sequence)
    length: int  # tokens per row, padding included
    supervised: int  # positions carrying loss (loss "all": every position)
    masked: bool  # an explicit mask reaches attention: padded rows, or several sequences in one padding-free row
    checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | flash_attention_2 | flex_attention | eager (multitune.modeling.load.attention)
    liger: bool = False
    loss: str = "supervised"  # supervised (multitune) | all (the model's own loss) | trl-fused (TRL's chunked head on a
    # GPU, labelled positions only) | trl-fused-all (the same head without Triton: every position)


def coefficients_for(method: str, dropout: float) -> tuple[Coefficients, str]:
    key = "full" if method == "full" else ("lora+dropout" if dropout > 0 and method in ("lora", "qlora", "dora", "rslora") else "lora")
    note = {"dora": "DoRA's activations not measured: LoRA's used (DoRA keeps more)",
            "prompt_tuning": "prompt tuning's activations not measured: LoRA's used (an upper bound)",
            "prefix_tuning": "prefix tuning's activations not measured: LoRA's used",
            "qlora": "QLoRA's activations are LoRA's on a bf16 base (measured); the 4-bit dequantisation is modelled"}.get(method, "")
    return LLAMA3_8B_MEASURED[key], note


def activation_parts(coef: Coefficients, arch: Arch, step: Step, method: str = "lora", dropout: float = 0.0) -> dict[str, int]:
    """Bytes above the static tensors at the step's peak, by part (comparable with torch.cuda.max_memory_allocated)."""
    d, L, V, tokens = arch.hidden, arch.layers, arch.vocab, step.rows * step.length
    kept = coef.kept_per_layer * d
    if dropout > 0 and method != "full":  # modelled: CUDA's dropout keeps a 1-byte mask where the CPU kept its noise
        kept -= coef.dropout_noise * d - GPU_DROPOUT_MASK * arch.adapted_inputs
    if step.liger:  # modelled: Liger keeps the bf16 norm input (not its fp32 copy) and recomputes SiLU(gate)
        kept -= 4 * d + 2 * arch.intermediate
    # autocast caches a bf16 copy of every trainable fp32 weight until it exits after the loss, checkpointing or not
    copies = L * coef.per_trainable_param * arch.layer_trainable
    if step.checkpointing:  # every layer keeps its input; one layer at a time is recomputed for its backward
        layers = L * coef.ckpt_kept_per_layer * d * tokens + (kept - coef.kept_per_layer * d + coef.ckpt_working * d) * tokens + copies
        mask_layers = 1
    else:
        layers = L * kept * tokens + coef.working * d * tokens + copies
        mask_layers = L
    parts = {"activations": int(layers)}
    elements = step.rows * step.length**2
    if step.masked and step.attention == "sdpa":  # flash_attention_2 and flex_attention take the boundaries: no T x T
        parts["attention mask"] = int((mask_layers * coef.mask_per_layer + coef.mask_working) * elements)
    elif step.attention == "eager":  # modelled: fp32 scores and bf16 probabilities of every head, kept by each layer
        heads = d // 128
        parts["attention scores"] = int(mask_layers * heads * elements * 6)
    if step.loss.startswith("trl-fused"):  # modelled from TRL's code: one bf16 tile, the kept bf16 rows, their fp32 gradient
        scored = step.supervised if step.loss == "trl-fused" else tokens  # trl-fused-all: no Triton, every position scored
        parts["logits"] = 2 * min(scored, TOKEN_TILE) * min(V, VOCAB_TILE) + 6 * scored * d
    else:
        parts["logits"] = int((coef.logit_peak if step.loss == "supervised" else coef.logit_peak_all) * step.supervised * V)
    if method == "qlora":  # modelled: bitsandbytes dequantises one 4-bit weight to bf16 per matmul
        parts["4-bit dequantisation"] = 2 * arch.largest_weight
    return parts


def predict_peak(static: int, coef: Coefficients, arch: Arch, steps: list[Step], method: str = "lora", dropout: float = 0.0) -> int:
    """Peak allocated bytes over the steps: the static tensors plus the largest step's activations."""
    return static + max(sum(activation_parts(coef, arch, s, method, dropout).values()) for s in steps)


if __name__ == "__main__":  # re-measure the table above (a few minutes on 2 CPU cores)
    for name, (m, p) in {"lora": ("lora", 0.0), "lora+dropout": ("lora", 0.05), "full": ("full", 0.0)}.items():
        print(name, measure_coefficients(m, p).as_dict(), flush=True)
