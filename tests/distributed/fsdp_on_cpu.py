"""TEST-ONLY SHIM: run accelerate's FSDP configs on CPU processes (gloo), then `multitune.cli`.

accelerate switches to FSDP only when its distributed type is a multi-accelerator one; with CPU
processes it silently keeps MULTI_CPU, which is plain DDP. This shim upgrades MULTI_CPU to FSDP when
the launcher asked for FSDP (ACCELERATE_USE_FSDP=true), so the shipped FSDP2 config, accelerate's
`fully_shard` wrapping and its DCP sharded checkpoints really run in the tests. Nothing outside
tests/ imports it; on GPUs accelerate needs no help.

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

if __name__ == "__main__":
    runpy.run_module("multitune.cli", run_name="__main__", alter_sys=True)
