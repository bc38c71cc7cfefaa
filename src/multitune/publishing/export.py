"""`multitune export RUN_DIR OUT`: the publishable folder of a finished run (what `push` uploads), for any host."""

from __future__ import annotations

from pathlib import Path

from multitune.config import Config
from multitune.publishing.publish import build_folder
from multitune.rundir import RunDir


def export(run: RunDir, cfg: Config, out: Path, *, merged: bool, repo_id: str | None = None) -> Path:
    """The publishable folder (weights, tokenizer, config, metrics, model card) in ``out``, for any host."""
    name = repo_id or cfg.hub.repo_id or f"your-name/{run.root.name}"
    build_folder(run, cfg, out, repo_id=name, merged=merged)
    what = "merged model" if merged else ("model" if cfg.peft.method == "full" else "adapter")
    print(f"wrote the {what} to {out} (loads with AutoModelForCausalLM.from_pretrained{'' if merged or cfg.peft.method == 'full' else ' + PEFT'})")
    return out
