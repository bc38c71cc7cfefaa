"""An adapter's trainable state under FSDP, gathered whole: checkpoints any node can resume from alone.

With sharded state dicts Trainer writes each rank's shard of the model and of the optimizer (DCP):
with `save_on_each_node` a node then holds only its own ranks' shards, and the checkpoint needs FSDP
on the same layout to load. An adapter's trainable state is small (LoRA r=16 on an 8B model: ~84 MB
of weights, twice that of Adam moments), so for adapter runs multitune gathers it whole instead, only
the trainable parameters and never the frozen base, and writes it in the layout Trainer itself uses
without FSDP: `adapter_model.safetensors`, `optimizer.pt` (indexed like `Optimizer.state_dict()`),
`scheduler.pt`. Every writing process (each node's first with save_on_each_node) keeps a complete copy,
which resumes on any number of processes, with FSDP, DDP or one process.

Written by hand because neither Trainer nor accelerate has it: accelerate's FULL_STATE_DICT saves
only on global rank 0, and Trainer's `save_model` then gathers the whole model as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

ADAPTER = "adapter_model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def _trainable_names(model) -> list[str]:
    # remove_duplicate=False: a frozen weight tied to another (lm_head and the embeddings of small Llamas)
    # appears once in named_parameters() but twice in the state dict
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Full tensors of the trainable parameters only, on every rank (a collective under FSDP).

    torch's `get_model_state_dict(full_state_dict=True, ignore_frozen_params=True)` would also gather a
    frozen weight tied to another (it drops frozen parameters by their named_parameters() name).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    names = _trainable_names(model)
    sharded = get_model_state_dict(model, options=_options(ignore_frozen_params=True))  # local shards: no gather
    if not set(names) <= set(sharded):
        raise RuntimeError(f"trainable parameters missing from the state dict, e.g. {sorted(set(names) - set(sharded))[0]}")
    return {n: sharded[n].full_tensor() if isinstance(sharded[n], DTensor) else sharded[n] for n in names}


def _saved_keys(model) -> dict[str, str]:
    """PEFT's file key for each trainable parameter's state-dict name, asked of PEFT itself.

    The mapping (adapter name removed, method-specific renames) is PEFT's business; giving it one
    numbered placeholder per parameter shows where each one lands without re-deriving its rules.
    """
    from peft import get_peft_model_state_dict

    names = _trainable_names(model)
    probe = {n: torch.tensor(float(i)) for i, n in enumerate(names)}
    saved = get_peft_model_state_dict(model, state_dict=probe, save_embedding_layers=False)
    return {key: names[int(v)] for key, v in saved.items()}


def _indexed(osd: dict) -> dict:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint) in `Optimizer.state_dict()` form."""
    pos = {name: i for i, name in enumerate(n for g in osd["param_groups"] for n in g["params"])}
    return {
        "state": {pos[n]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for n, s in osd["state"].items()},
        "param_groups": [{**g, "params": [pos[n] for n in g["params"]]} for g in osd["param_groups"]],
    }


def _named(indexed: dict, groups: list[list[str]]) -> dict:
    names = [n for g in groups for n in g]
    count = sum(len(g["params"]) for g in indexed["param_groups"])
    if count != len(names) or [len(g["params"]) for g in indexed["param_groups"]] != [len(g) for g in groups]:
        raise RuntimeError(f"the checkpoint's optimizer holds {count} parameters, this model trains {len(names)}")
    return {
        "state": {names[i]: s for i, s in indexed["state"].items()},
        "param_groups": [{**g, "params": list(names_)} for g, names_ in zip(indexed["param_groups"], groups, strict=True)],
    }


class PortableAdapterCheckpoints:
    """Trainer mixin: under FSDP, adapter checkpoints and the final adapter are gathered whole (see above).

    Every rank calls these methods (Trainer does); the gathers are collectives, the writes happen on
    the writing processes only (`args.should_save`).
    """

    def _portable(self) -> bool:
        from peft import PeftModel

        return bool(getattr(self, "is_fsdp_enabled", False)) and isinstance(self.accelerator.unwrap_model(self.model), PeftModel)

    def _inner_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._portable():
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        state = trainable_state(self.model)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(output_dir, state_dict={k: v.detach().cpu() for k, v in state.items()})
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._portable():
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self._inner_optimizer(), options=_options(full_state_dict=True))
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(_indexed(osd), os.path.join(output_dir, OPTIMIZER))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        folder = Path(resume_from_checkpoint)
        if not (self._portable() and (folder / ADAPTER).exists()):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        keys = _saved_keys(self.accelerator.unwrap_model(self.model))
        saved = load_file(str(folder / ADAPTER))
        missing = sorted(set(keys) - set(saved))
        if missing:
            raise RuntimeError(f"{folder / ADAPTER} lacks {len(missing)} of this adapter's tensors (e.g. {missing[0]})")
        set_model_state_dict(self.model, {keys[k]: saved[k] for k in keys}, options=_options(full_state_dict=True, strict=False))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not (checkpoint and self._portable() and (Path(checkpoint) / ADAPTER).exists()):
            return super()._load_optimizer_and_scheduler(checkpoint)  # never Trainer's DCP loader for an adapter checkpoint
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        optimizer = self._inner_optimizer()
        groups = [list(g["params"]) for g in get_optimizer_state_dict(self.model, optimizer)["param_groups"]]  # names only
        indexed = torch.load(Path(checkpoint) / OPTIMIZER, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, optimizer, _named(indexed, groups), options=_options(full_state_dict=True))
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER, weights_only=True))
