"""What every scorer feeds a model: padded batches, the logits of the input positions, the attention kernel.

Prompt/prefix-tuning models (PEFT prompt learning) put virtual tokens in front of the input or in the
KV cache themselves; the scorers ask ``uses_prompt_learning`` and take the plain full-sequence path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch


def uses_prompt_learning(model) -> bool:
    # Prompt/prefix tuning put virtual tokens in front of the input or in the KV cache themselves,
    # which does not compose with a cache we build; those models take the full-sequence path.
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def virtual_positions(model) -> int:
    """Positions a prompt-tuning model puts in front of the input, and so in front of its logits.

    PEFT prepends ``num_virtual_tokens`` soft-prompt embeddings (and -100 labels) to every sequence;
    prefix tuning puts them in the attention cache instead, leaving the logits aligned with the input.
    """
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning or str(cfg.peft_type).endswith("PREFIX_TUNING"):
        return 0
    return cfg.num_virtual_tokens


def input_logits(model, **inputs) -> torch.Tensor:
    """The logits of a forward pass, one position per input token (virtual tokens dropped)."""
    return model(**inputs).logits[:, virtual_positions(model) :]


@contextlib.contextmanager
def sdpa_attention(model):
    """Score with SDPA whatever attention the model trains with, then put the training choice back.

    The tree attention mask needs an attention that takes an arbitrary mask (SDPA, eager);
    flash_attention_2 does not, and scoring would fall back to one full forward per label (77 per
    banking77 row). SDPA reads the same weights, so only the kernel changes.
    """
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation_internal")}
    before = {k: c._attn_implementation_internal for k, c in configs.items()}
    switch = any(v not in ("sdpa", None) for v in before.values()) and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:  # restored as it was, without re-checking an implementation that loaded fine
            for k, c in configs.items():
                c._attn_implementation_internal = before[k]


def with_sdpa(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with sdpa_attention(self.model):
            return method(self, *args, **kwargs)

    return wrapper


def left_pad(seqs: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[list[int]], pad: int, device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def model_device(model) -> torch.device:
    return next(p for p in model.parameters()).device


def supports_tree_mask(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") in ("sdpa", "eager")
