"""Loading the base model and tokenizer, and wrapping the model with the chosen PEFT method."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from multitune import hub
from multitune.config import Config, ModelConfig, PeftConfig
from multitune.errors import UserError
from multitune.modeling.speed import apply_liger, liger_available, use_liger

log = logging.getLogger(__name__)

TARGET_PRESETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": "all-linear",  # PEFT's own preset: every linear layer but the output head
}
IA3_PRESETS = {  # (IA)^3 scales keys, values and the MLP input of down_proj
    "attention": (["k_proj", "v_proj"], []),
    "mlp": (["down_proj"], ["down_proj"]),
    "all-linear": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported() -> bool:
    """A GPU that computes in bf16 natively (Ampere or newer). The one place this is decided.

    ``torch.cuda.is_bf16_supported()`` also says yes on V100/T4, where bf16 is emulated (slowly, and
    through fp32 without bf16 tensor cores); ``auto`` must not pick it there.
    """
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return getattr(torch, name)


def weights_dtype(cfg: Config, *, for_training: bool) -> torch.dtype:
    """The dtype the base weights are loaded in.

    Full fine-tuning trains with fp32 weights (and bf16 autocast through ``train.bf16``): AdamW on bf16
    weights has no fp32 master copy, and updates smaller than bf16's resolution (1/256 of a weight) are
    lost. Frozen weights under an adapter are only read, so they take the compute dtype.
    """
    if for_training and cfg.peft.method == "full" and cfg.model.dtype == "auto":
        return torch.float32
    return resolve_dtype(cfg.model.dtype)


def attention(cfg: Config, *, for_training: bool, cuda: bool | None = None, flash: bool | None = None) -> str:
    """The attention implementation the model is loaded with: model.attn_implementation, or what ``auto`` picks.

    Packed rows (train.packing, train.padding_free: several examples in one row, position_ids restarting at each)
    on SDPA make transformers build a block-diagonal [rows, 1, T, T] mask that every layer keeps, which rules out
    the flash kernel and copies the key/value heads. On a GPU ``auto`` gives them an attention that takes the
    sequence boundaries instead: flash-attn's variable-length kernel (cu_seqlens from position_ids) where flash-attn
    imports, else PyTorch's FlexAttention with a document BlockMask (transformers' masking_utils builds it from the
    position_ids; one block index per 128 x 128 tile). FlexAttention has no backward on the CPU (torch 2.13), so
    on the CPU, unpacked rows and inference, ``auto`` is SDPA. ``cuda``, ``flash``: decide for a GPU, for flash-attn
    (None: this machine; a launch decides once for every process, :func:`for_kernels`).
    """
    impl = cfg.model.attn_implementation
    if impl != "auto":
        return impl
    packed = for_training and (cfg.train.packing or cfg.train.padding_free)
    if not (packed and (torch.cuda.is_available() if cuda is None else cuda)):
        return "sdpa"
    return "flash_attention_2" if (flash_attn_imports() if flash is None else flash) else "flex_attention"


def flash_attn_imports() -> bool:
    import importlib

    try:  # installed but built for another torch or CUDA fails at import (undefined symbol, missing library): not usable
        importlib.import_module("flash_attn")
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def flash_attn_runs() -> bool:
    """flash-attn imports and its variable-length kernel (the one packed rows take) runs one tiny causal call on this
    GPU: a wheel that imports but was built for another GPU architecture fails only here ("no kernel image")."""
    if not (torch.cuda.is_available() and flash_attn_imports()):
        return False
    try:
        from flash_attn import flash_attn_varlen_func

        q = torch.zeros(4, 1, 64, dtype=torch.bfloat16, device="cuda")
        cu = torch.tensor([0, 2, 4], dtype=torch.int32, device="cuda")
        flash_attn_varlen_func(q, q, q, cu, cu, 2, 2, causal=True)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - any failure means "not usable here"; the launch falls back to FlexAttention
        return False
    return True


@dataclass(frozen=True)
class Kernels:
    """The optional kernels a process can run, between which ``auto`` chooses (model.attn_implementation, train.liger).

    A launch decides once for all its processes (multitune.training.stages.agreed_kernels): each node's own view
    (what imports there) would let nodes load different attention kernels or Liger, and model different activation
    memory, so choose different micro-batches (different collectives: a hang)."""

    cuda: bool
    flash: bool  # flash-attn imports and runs (checked only where auto could choose it)
    liger: bool  # liger-kernel is installed

    @classmethod
    def here(cls, cfg: Config) -> Kernels:
        """This process's kernels; flash-attn is run once only where ``auto`` would choose it (packed rows on a GPU)."""
        wants_flash = cfg.model.attn_implementation == "auto" and attention(cfg, for_training=True, cuda=True,
                                                                            flash=True) == "flash_attention_2"
        return cls(torch.cuda.is_available(), wants_flash and flash_attn_runs(), liger_available())

    @classmethod
    def common(cls, every: list[Kernels]) -> Kernels:
        """What every process has: a kernel is used under ``auto`` only when no process lacks it."""
        return cls(all(k.cuda for k in every), all(k.flash for k in every), all(k.liger for k in every))


def for_kernels(cfg: Config, kernels: Kernels | None) -> Config:
    """``cfg`` with model.attn_implementation and train.liger ``auto`` resolved for ``kernels``: what a launch's
    trainers load and what its auto-fit models, the same on every process. The run records the user's config
    (``auto``), never this copy. ``kernels`` None: ``cfg`` (each machine decides alone, e.g. `plan`, `eval`)."""
    if kernels is None:
        return cfg
    attn = attention(cfg, for_training=True, cuda=kernels.cuda, flash=kernels.flash)
    liger = use_liger(cfg.train.liger, cuda=kernels.cuda, installed=kernels.liger)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"attn_implementation": attn}),
                                  "train": cfg.train.model_copy(update={"liger": liger})})


def check_requirements(cfg: Config) -> None:
    """Optional packages the config needs, checked before anything is loaded or written."""
    import importlib.util

    for package, pip, need in (("flash_attn", "flash-attn --no-build-isolation", cfg.model.attn_implementation == "flash_attention_2"),
                               ("bitsandbytes", "bitsandbytes", cfg.peft.method == "qlora")):
        if not need:
            continue
        if importlib.util.find_spec(package) is None:
            raise UserError(f"{_NEEDS[package]} needs the {pip.split()[0]} package (pip install {pip}), or {_INSTEAD[package]}")
        try:  # installed but broken (a wheel built for another CUDA or torch) fails at import: say so, not a traceback
            importlib.import_module(package)
        except Exception as e:
            raise UserError(f"{pip.split()[0]} is installed but does not import ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); reinstall it for this torch "
                            f"(pip install --force-reinstall {pip}), or {_INSTEAD[package]}") from None
    if cfg.model.attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
        raise UserError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on this machine")


def check_training_attention(cfg: Config) -> None:
    if cfg.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise UserError("model.attn_implementation=flex_attention trains only on a GPU (PyTorch's FlexAttention has no "
                        "backward on the CPU); use auto or sdpa on this machine")


_NEEDS = {"flash_attn": "model.attn_implementation=flash_attention_2", "bitsandbytes": "peft.method=qlora"}
_INSTEAD = {"flash_attn": "set model.attn_implementation=sdpa", "bitsandbytes": "use peft.method=lora"}


def adapters_in_fp32(model) -> None:
    """Keep every trainable parameter (and so its Adam moments) in fp32, whatever the base weights' dtype.

    TRL's SFTTrainer casts a 4-bit model's trainable parameters to bf16, while PEFT keeps LoRA adapters on
    a bf16 base in fp32: QLoRA and LoRA would train in different precisions. fp32 adapters cost little
    memory (a few M parameters) and keep small updates that bf16 rounds away; compute still runs in bf16
    under autocast. Call after the trainer is built and before it creates the optimizer. Full fine-tuning
    is left as loaded (fp32 unless model.dtype says otherwise).
    """
    import peft

    if not isinstance(model, peft.PeftModel):
        return
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def prepare_4bit(model, gradient_checkpointing: bool):
    """PEFT's preparation of a 4-bit model for training, its residual stream left in the 4-bit layers' compute dtype.

    ``peft.prepare_model_for_kbit_training`` freezes the base, makes the embedding output require grad and enables
    checkpointing when asked, and upcasts every weight that is not 4-bit (embeddings, output head, norms) to fp32,
    for fp16 training's range. On a bf16 base that turns the residual stream fp32 (the embedding output is fp32 and
    every residual add promotes): activations x1.375, the fp32 head copied to bf16 by autocast every step. The
    frozen weights go back to the compute dtype (what load_model loaded them in: ``bnb_4bit_compute_dtype``); the
    adapters, added after this, are fp32 (:func:`adapters_in_fp32`). An fp16 base keeps PEFT's fp32 upcast.
    """
    import peft

    compute = model.get_input_embeddings().weight.dtype  # load_model loads every weight that is not 4-bit in it
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if compute == torch.bfloat16:
        frozen_to(model, compute)
    return model


def frozen_to(model, dtype: torch.dtype) -> None:
    """Cast every frozen floating-point weight that is not 4-bit to ``dtype``; trainable ones (adapters) are left."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype and type(p).__name__ != "Params4bit":
            p.data = p.data.to(dtype)


def _from_pretrained(loader, ref: str, mcfg: ModelConfig, mirror: Path | None, **kwargs):
    source = hub.resolve(ref, "model", mirror)
    try:
        return loader.from_pretrained(
            source, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as e:
        explained = hub.explain_model_load_error(ref, e)
        if explained is not None:
            raise explained from None
        raise


def load_tokenizer(mcfg: ModelConfig, mirror: Path | None, source: str | None = None) -> PreTrainedTokenizerBase:
    tok = _from_pretrained(AutoTokenizer, source or mcfg.name_or_path, mcfg, mirror)
    if tok.pad_token is None:
        # Llama 3 ships a reserved pad token; otherwise padding positions are masked anyway, so EOS is safe.
        pad = "<|finetune_right_pad_id|>"
        tok.pad_token = pad if pad in tok.get_vocab() else tok.eos_token
    return tok


def load_model(cfg: Config, *, quantize: bool | None = None, for_training: bool = False, loader=AutoModelForCausalLM, **extra):
    """The base causal LM (or ``loader``'s head on it, with ``extra`` from_pretrained kwargs): bf16 on a
    bf16-capable GPU, fp32 on CPU (and for full fine-tuning), the attention of :func:`attention`; 4-bit NF4 for QLoRA."""
    check_requirements(cfg)
    if for_training:
        check_training_attention(cfg)
    mcfg = cfg.model
    dtype = weights_dtype(cfg, for_training=for_training)
    kwargs = {"dtype": dtype, "attn_implementation": attention(cfg, for_training=for_training), **extra}
    if quantize if quantize is not None else cfg.peft.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # FSDP flattens params of one dtype: storage must match compute
        )
    model = _from_pretrained(loader, mcfg.name_or_path, mcfg, hub.mirror_root(cfg.hub_mirror), **kwargs)
    model = apply_liger(model, cfg.train.liger)  # train.liger: RMSNorm, RoPE, SwiGLU kernels (CUDA only)
    log.info("loaded %s (%s, %.1fM params)", mcfg.name_or_path, dtype, model.num_parameters() / 1e6)
    return model


def _layers(pcfg: PeftConfig, n_layers: int) -> list[int] | None:
    if pcfg.last_n_layers:
        if pcfg.last_n_layers > n_layers:
            raise UserError(f"peft.last_n_layers={pcfg.last_n_layers} but the model has {n_layers} layers")
        return list(range(n_layers - pcfg.last_n_layers, n_layers))
    if pcfg.layers is not None:
        bad = [i for i in pcfg.layers if not 0 <= i < n_layers]
        if bad:
            raise UserError(f"peft.layers {bad} out of range: the model has layers 0..{n_layers - 1}")
        return pcfg.layers
    return None


def peft_config(pcfg: PeftConfig, model, tokenizer_path: str | None = None):
    """The PEFT library config for the chosen method (None for full fine-tuning)."""
    import peft

    n_layers = model.config.num_hidden_layers
    layers = _layers(pcfg, n_layers)
    targets = TARGET_PRESETS.get(pcfg.target_modules, pcfg.target_modules) if isinstance(pcfg.target_modules, str) else pcfg.target_modules
    method = pcfg.method
    if method in ("lora", "qlora", "dora", "rslora"):
        if layers is not None and targets == "all-linear":
            targets = TARGET_PRESETS["attention"] + TARGET_PRESETS["mlp"]  # layer selection needs explicit names
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=pcfg.r,
            lora_alpha=pcfg.alpha,
            lora_dropout=pcfg.dropout,
            target_modules=targets,
            layers_to_transform=layers,
            use_dora=method == "dora",
            use_rslora=method == "rslora",
        )
    if method == "ia3":
        preset = pcfg.target_modules if isinstance(pcfg.target_modules, str) else None
        tm, ff = IA3_PRESETS[preset] if preset else (pcfg.target_modules, [])
        if layers is not None:
            raise UserError("peft.layers / peft.last_n_layers are not supported with ia3; use a LoRA method")
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=tm, feedforward_modules=ff)
    if method == "prompt_tuning":
        init = {"prompt_tuning_init": "RANDOM"}
        if pcfg.prompt_init_text:
            init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": pcfg.prompt_init_text, "tokenizer_name_or_path": tokenizer_path}
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=pcfg.num_virtual_tokens, **init)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=pcfg.num_virtual_tokens)
    return None


def apply_peft(model, cfg: Config, gradient_checkpointing: bool = False):
    """Wrap ``model`` with the configured adapter. Call ``set_seed`` first: adapter init draws random numbers."""
    import peft

    if cfg.peft.method == "qlora":
        model = prepare_4bit(model, gradient_checkpointing)
    pc = peft_config(cfg.peft, model, tokenizer_path=hub.resolve(cfg.model.name_or_path, "model", hub.mirror_root(cfg.hub_mirror)))
    if pc is None:
        return model
    model = peft.get_peft_model(model, pc)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: %d trainable of %d parameters (%.3f%%)", cfg.peft.method, trainable, total, 100 * trainable / total)
    return model


def load_for_inference(cfg: Config, weights_dir: Path):
    """Base model + trained adapter (or the fully fine-tuned weights) from a run, in eval mode on the device."""
    if cfg.peft.method == "full":
        full_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(weights_dir)})})
        model = load_model(full_cfg)
    else:
        import peft

        model = peft.PeftModel.from_pretrained(load_model(cfg), str(weights_dir))
    if cfg.peft.method != "qlora":
        model.to(device())
    return model.eval()


def load_task_adapters(cfg: Config, adapters: dict[str, Path]):
    """One base model with each task's trained adapter (strategy: per_task), named by its task, in eval mode.

    PEFT's multi-adapter support: the first adapter wraps the base, the others are added with
    ``load_adapter(..., adapter_name=task)``; :func:`use_adapter` switches between them without
    reloading the base. The first task's adapter is active.
    """
    import peft

    (first, path), *rest = adapters.items()
    model = peft.PeftModel.from_pretrained(load_model(cfg), str(path), adapter_name=first)
    for task, path in rest:
        model.load_adapter(str(path), adapter_name=task)
    if cfg.peft.method != "qlora":
        model.to(device())
    return model.eval()


def load_for_tasks(cfg: Config, run, tasks: list[str]):
    """A run's trained model for ``tasks``: the one model that holds them all, or the base with each task's
    own adapter (final/<task>/, strategy: per_task) named by its task, the first task's active."""
    from multitune.rundir import one_model, part_of

    if one_model(cfg, run):
        return load_for_inference(cfg, run.final)
    return load_task_adapters(cfg, {t: part_of(cfg, run, t).final for t in tasks})


def use_adapter(model, task: str) -> None:
    """Make ``task``'s adapter the active one (see :func:`load_task_adapters`)."""
    if task not in model.peft_config:
        raise UserError(f"no adapter for task {task!r} in this model; it holds {sorted(model.peft_config)}")
    model.set_adapter(task)
