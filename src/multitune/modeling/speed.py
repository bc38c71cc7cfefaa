"""GPU-only speed options: Liger kernels (`train.liger`) and `torch.compile` without per-length recompiles.

Liger and the supervised-positions loss (multitune.modeling.loss). Liger's layer kernels (RMSNorm, RoPE,
SwiGLU) replace those modules' forwards and combine with either loss path. Its fused linear
cross-entropy (FLCE) is not used: with `train.loss_positions: supervised` the head already runs on
the few supervised rows only (a [answer tokens x vocab] product, small next to the decoder), and with
`all` TRL 1.16 puts its own chunked, fused LM head in place of the model's and refuses Liger's FLCE.
Either way the [batch x length x vocab] logits are never materialised.

Compilation. Padded batches change length every step; a graph compiled for static shapes
recompiles for each new length. Batches are padded to a multiple of 64 (at most max_length / 64
shapes) and compiled with dynamic shapes (accelerate's `ACCELERATE_DYNAMO_USE_DYNAMIC`), so a run
compiles its training graph a bounded number of times, not once per length. Evaluation uses the
uncompiled module (`uncompiled`): scoring and generation vary their shapes per batch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from multitune.errors import UserError

COMPILE_PAD_MULTIPLE = 64
BACKEND_ENV = "MULTITUNE_COMPILE_BACKEND"  # inductor by default; the tests use "eager" (same guards, no codegen)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(setting: str | bool, *, cuda: bool | None = None, installed: bool | None = None) -> bool:
    """`train.liger`: auto is on exactly when CUDA and liger-kernel are both there; true demands both."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    installed = liger_available() if installed is None else installed
    if setting == "auto":
        return cuda and installed
    if setting is True and not (cuda and installed):
        missing = "a CUDA GPU" if not cuda else "the liger-kernel package (pip install liger-kernel)"
        raise UserError(f"train.liger=true needs {missing}; use train.liger=auto to use Liger only where it is available")
    return bool(setting)


def apply_liger(model, setting: str | bool):
    """Patch the base model's RMSNorm, RoPE and SwiGLU with Liger's kernels (before PEFT wraps it)."""
    if not use_liger(setting):
        return model
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    model._multitune_liger = True
    return model


def sft_args(train) -> dict:
    """SFTConfig arguments for `train.compile` (padding to a multiple, dynamic shapes, the backend).

    `train.liger: true` where Liger cannot run is refused by the launch's node checks
    (multitune.training.stages.check_node), agreed by every rank once the process group is up.
    """
    if not train.compile:
        return {"torch_compile": False}
    os.environ.setdefault("ACCELERATE_DYNAMO_USE_DYNAMIC", "true")  # read when the Trainer builds its dynamo plugin
    return {"torch_compile": True, "pad_to_multiple_of": COMPILE_PAD_MULTIPLE,
            "torch_compile_backend": os.environ.get(BACKEND_ENV, "inductor")}


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a `torch.compile` wrapper (itself when not compiled), for evaluation passes."""
    return getattr(model, "_orig_mod", model)
