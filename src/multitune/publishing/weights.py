"""The weights of a finished run as they are published: the adapter as trained, or merged into the base model.

A merged folder is a plain transformers model (config.json, model.safetensors, tokenizer): it loads with
``AutoModelForCausalLM.from_pretrained`` without PEFT installed, and vLLM serves it. Prompt and prefix tuning
have no weights to merge into (their virtual tokens live outside the model), so they publish as adapters.

QLoRA trained its adapter against the 4-bit base, dequantised on the fly. Merging into the original bf16
weights would give a model that was never trained; so the 4-bit base is loaded as in training and
dequantised to the compute dtype first (transformers' ``dequantize``), and the adapter is merged into that.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from multitune.config import PROMPT_LEARNING, Config
from multitune.errors import UserError
from multitune.rundir import RunDir


def merged_model(run: RunDir, cfg: Config):
    """Base model + the run's adapter, merged: a plain transformers model in the compute dtype."""
    import peft

    from multitune.modeling.load import load_model, resolve_dtype

    if cfg.peft.method in PROMPT_LEARNING:
        raise UserError(f"{cfg.peft.method} has nothing to merge into the weights (its virtual tokens sit outside the "
                        "model); publish the adapter instead (drop --merged)")
    if cfg.peft.method == "full":
        full = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(run.final)})})
        return load_model(full, quantize=False)
    dtype = resolve_dtype(cfg.model.dtype)
    if cfg.peft.method == "qlora":
        print(f"QLoRA: dequantising the 4-bit base model to {str(dtype).removeprefix('torch.')} before merging, so the merged "
              "weights are the ones the adapter was trained against")
        base = load_model(cfg)
        base = base.dequantize(dtype=dtype) or base
    else:
        base = load_model(cfg, quantize=False)
    model = peft.PeftModel.from_pretrained(base, str(run.final))
    merged = model.merge_and_unload()
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, key):
            delattr(merged.config, key)
    return merged


def write_weights(run: RunDir, cfg: Config, out: Path, *, merged: bool) -> None:
    """Model files and tokenizer into ``out``: the trained adapter (or full model) as saved, or merged."""
    from multitune.modeling.load import load_tokenizer

    if not merged:
        for f in sorted(run.final.iterdir()):
            if f.is_file():
                shutil.copyfile(f, out / f.name)
        return
    model = merged_model(run, cfg)
    model.save_pretrained(str(out))
    load_tokenizer(cfg.model, None, source=str(run.final)).save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:  # never a half-quantised config: a plain model loads it
        raise RuntimeError(f"merged config still declares quantization: {config['quantization_config']}")
