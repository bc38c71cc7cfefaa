"""TEST-ONLY SHIM: one rank runs out of CUDA memory, as a card with less free memory than the others would.

`MULTITUNE_TEST_OOM=RANK:ROWS:FROM` makes that rank's embedding forward (training only: gradients on) raise
torch.OutOfMemoryError for micro-batches of more than ROWS rows, from its FROM-th such forward on (1: the first,
which is auto-fit's probe). `MULTITUNE_TEST_WATCH_STEPS=N` watches the first N optimizer steps instead of
multitune's 10, so that a short run also trains past them. Patches from outside the package.

    torchrun --nproc_per_node 2 tests/distributed/injected_oom.py train CONFIG.yaml
"""

from __future__ import annotations

import os
import runpy

import torch


def install() -> None:
    if os.environ.get("MULTITUNE_TEST_WATCH_STEPS"):
        from multitune.launch import autofit

        autofit.WATCH_STEPS = int(os.environ["MULTITUNE_TEST_WATCH_STEPS"])
    value = os.environ.get("MULTITUNE_TEST_OOM")
    if not value:
        return
    oom_rank, rows, start = (int(v) for v in value.split(":"))
    if int(os.environ.get("RANK", "0")) != oom_rank:
        return
    original, calls = torch.nn.Embedding.forward, [0]

    def forward(module, ids):
        if torch.is_grad_enabled():
            calls[0] += 1
            if ids.shape[0] > rows and calls[0] >= start:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected on rank {oom_rank}: {ids.shape[0]} rows)")
        return original(module, ids)

    torch.nn.Embedding.forward = forward


if __name__ == "__main__":
    install()
    runpy.run_module("multitune.cli", run_name="__main__", alter_sys=True)
