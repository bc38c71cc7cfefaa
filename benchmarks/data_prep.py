"""Data preparation time: load, split, format and tokenise every task of a config, cold and cached.

    python -m benchmarks.data_prep CONFIG.yaml     # prints JSON: {"seconds": ..., "cached": ...}

Run it twice with the same fresh MULTITUNE_CACHE and HF_DATASETS_CACHE: the first run is cold (no
datasets arrow cache, no tokenised cache), the second reads the tokenised cache. The time covers
`prepare()` after the tokenizer is loaded, not the Python imports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from multitune.config import load_config
    from multitune.data.formatting import Formatter
    from multitune.hub import mirror_root
    from multitune.modeling.load import load_tokenizer
    from multitune.data.prepared import prepare
    from multitune.tasks import resolve_tasks

    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve_tasks(load_config(Path(argv[0])))
    formatter = Formatter(load_tokenizer(cfg.model, mirror_root(cfg.hub_mirror)), cfg.model.max_length)
    t0 = time.perf_counter()
    p = prepare(cfg, formatter, None)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "cached": p.cached, "train_rows": len(p.train),
                      "tasks": {td.task.name: [len(td.train), len(td.val)] for td in p.data}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
