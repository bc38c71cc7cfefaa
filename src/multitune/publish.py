"""Uploading a finished run to the Hugging Face Hub with a model card. The token comes from the
environment (HF_TOKEN or `hf auth login`) and is never written anywhere."""

from __future__ import annotations

import json
from typing import Any

from multitune.config import Config
from multitune.errors import UserError
from multitune.evaluate import summary_rows
from multitune.run import RunDir


def model_card(cfg: Config, results: dict[str, Any]) -> str:
    rows = summary_rows(results) if results else [["task"]]
    table = "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    base = cfg.model.name_or_path
    tasks = ", ".join(t.name for t in cfg.tasks)
    lib = "peft" if cfg.peft.method != "full" else "transformers"
    return f"""---
base_model: {base}
library_name: {lib}
tags: [multitune, {cfg.peft.method}, multi-task]
---

# Multi-task fine-tune of {base}

Trained with [multitune](https://pypi.org/project/multitune/) on: {tasks}.
Method: `{cfg.peft.method}` (r={cfg.peft.r}, alpha={cfg.peft.alpha}, targets={cfg.peft.target_modules}),
{cfg.train.epochs:g} epochs, learning rate {cfg.train.learning_rate:g} with a {cfg.train.lr_scheduler} schedule.

## Validation ({cfg.data.val_fraction:.0%} stratified split, seed {cfg.data.split_seed})

{table}

Classification and multiple-choice tasks are scored by label likelihood: the summed log-probability of
each candidate answer given the prompt, argmax.

## Training config

```json
{json.dumps(cfg.model_dump(mode="json"), indent=2)}
```
"""


def push(run: RunDir, cfg: Config, results: dict[str, Any]) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = cfg.hub.repo_id
    (run.final / "README.md").write_text(model_card(cfg, results))
    if run.metrics.exists():
        (run.final / "metrics.json").write_text(run.metrics.read_text())
    api = HfApi()
    try:
        api.create_repo(repo_id, private=cfg.hub.private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(run.final), commit_message="multitune: upload fine-tuned model")
    except HfHubHTTPError as e:
        raise UserError(f"upload to {repo_id} failed: {str(e).splitlines()[0]}; check HF_TOKEN has write access") from None
    except OSError as e:
        raise UserError(f"upload to {repo_id} failed ({e}); are you online, with HF_TOKEN set or `hf auth login` done?") from None
    print(f"uploaded {run.final} to https://huggingface.co/{repo_id}")
    return str(info)
