"""TEST-ONLY SHIM: SIGTERM to one rank right after training's last step, as a node reclaimed at that moment.

`MULTITUNE_TEST_LATE_SIGNAL=RANK` makes that rank send itself SIGTERM in GracefulStop.on_train_end, after
the last agreement at a step's end: the other ranks never hear of it during training. Patches from outside
the package, so the same test runs against any version of the callback.

    torchrun --nproc_per_node 2 tests/distributed/late_signal.py train CONFIG.yaml
"""

from __future__ import annotations

import os
import runpy
import signal

from multitune.training import checkpoints


def install() -> None:
    value = os.environ.get("MULTITUNE_TEST_LATE_SIGNAL")
    if value is None or int(os.environ.get("RANK", "0")) != int(value):
        return
    original = checkpoints.GracefulStop.on_train_end

    def late(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    checkpoints.GracefulStop.on_train_end = late


if __name__ == "__main__":
    install()
    runpy.run_module("multitune.cli", run_name="__main__", alter_sys=True)
