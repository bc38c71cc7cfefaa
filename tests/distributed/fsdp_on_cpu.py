"""TEST-ONLY SHIM: run accelerate's FSDP configs on CPU processes (gloo), then `multitune.cli`.

accelerate switches to FSDP only when its distributed type is a multi-accelerator one; with CPU
processes it silently keeps MULTI_CPU, which is plain DDP. This shim upgrades MULTI_CPU to FSDP when
the launcher asked for FSDP (ACCELERATE_USE_FSDP=true), so the shipped FSDP2 config, accelerate's
`fully_shard` wrapping and sharded checkpoints really run in the tests. Nothing outside tests/
imports it; on GPUs accelerate needs no help. Two more test hooks, off unless their variable is set:
MULTITUNE_TEST_CLOCK_SKEW (clock_skew.py) and MULTITUNE_TEST_GATHER_LOG (what each save gathers).

    accelerate launch --config_file configs/accelerate/fsdp2-1x4.yaml --num_processes 2 \
        tests/distributed/fsdp_on_cpu.py train CONFIG.yaml
"""

from __future__ import annotations

import os
import runpy

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        self.distributed_type = DistributedType.FSDP
        # the state is a shared singleton: an earlier plain AcceleratorState() may have set it up without the plugin
        if getattr(self, "fsdp_plugin", None) is None and kwargs.get("fsdp_plugin") is not None:
            self.fsdp_plugin = kwargs["fsdp_plugin"]


AcceleratorState.__init__ = _init_with_fsdp_on_cpu


def _log_gathers(folder: str) -> None:
    """MULTITUNE_TEST_GATHER_LOG=DIR: count the elements each save gathers whole (DTensor -> replicated),
    per phase (each checkpoint, the final save), into DIR/rank<R>.json when the process exits."""
    import atexit
    import json
    from pathlib import Path

    import transformers
    from torch.distributed.tensor import DTensor, Replicate

    import multitune.training.stages

    counts: dict = {"checkpoint": [], "final": []}
    shapes: list = []
    phase: list = [None]
    redistribute = DTensor.redistribute

    def counting(self, *args, **kwargs):
        out = redistribute(self, *args, **kwargs)
        if phase[0] is not None and all(isinstance(p, Replicate) for p in out.placements):
            counts[phase[0]][-1] += out.numel()
            shapes.append((phase[0], tuple(out.shape)))
        return out

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase[0] = name
            counts[name].append(0)
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = None

        return wrapped

    DTensor.redistribute = counting
    transformers.Trainer._save_checkpoint = in_phase("checkpoint", transformers.Trainer._save_checkpoint)
    multitune.training.stages.save_final = in_phase("final", multitune.training.stages.save_final)
    out = Path(folder) / f"rank{os.environ.get('RANK', '0')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: out.write_text(json.dumps({**counts, "shapes": shapes})))

if __name__ == "__main__":
    import clock_skew  # the other test-only shim (beside this script): MULTITUNE_TEST_CLOCK_SKEW, when set

    clock_skew.install()
    if os.environ.get("MULTITUNE_TEST_GATHER_LOG"):
        _log_gathers(os.environ["MULTITUNE_TEST_GATHER_LOG"])
    runpy.run_module("multitune.cli", run_name="__main__", alter_sys=True)
