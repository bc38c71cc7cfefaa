"""TEST-ONLY SHIM: start one rank's checkpoint timer earlier, as a slower model load on the others would.

`MULTITUNE_TEST_CLOCK_SKEW=RANK:SECONDS` sets that rank's TimedCheckpoints clock back by SECONDS, so it
finds a checkpoint due at the first step while the other ranks do not. Patches from outside the
package, so the same test runs against any version of the callback.

    torchrun --nproc_per_node 2 tests/distributed/clock_skew.py train CONFIG.yaml
"""

from __future__ import annotations

import os
import runpy

from multitune.training import checkpoints


def install() -> None:
    value = os.environ.get("MULTITUNE_TEST_CLOCK_SKEW")
    if not value:
        return
    skewed_rank, seconds = value.split(":")
    if int(os.environ.get("RANK", "0")) != int(skewed_rank):
        return
    original = checkpoints.TimedCheckpoints.__init__

    def skewed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.last -= float(seconds)

    checkpoints.TimedCheckpoints.__init__ = skewed


if __name__ == "__main__":
    install()
    runpy.run_module("multitune.cli", run_name="__main__", alter_sys=True)
