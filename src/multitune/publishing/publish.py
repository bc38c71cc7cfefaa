"""Publishing a finished run: the folder that goes to the Hub (adapter or merged weights, tokenizer, resolved
config, metrics, plots, model card) and the upload. The token comes from the environment (HF_TOKEN or
`hf auth login`) and is never written anywhere.

`push --dry-run OUT` and `export OUT` write the very folder the upload sends (one Hub commit: nothing half
uploaded). The card's YAML header is written by huggingface_hub's own ModelCardData (model-index with one
result per task and metric); its body shows each task's exact chat messages, because a model fine-tuned on
one wording answers another wording with the wrong task's kind of answer. The folder lists its files in
multitune-files.json; a later push removes from the repo what an earlier one uploaded and the new folder
lacks (and nothing else). The uploaded multitune.yaml names local paths as the card does: by name only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from multitune.config import Config, dump_config
from multitune.errors import UserError
from multitune.results.report import summary_rows
from multitune.rundir import RunDir
from multitune.training.guards import nonfinite_tensor

TASK_TYPES = {"classification": "text-classification", "multiple_choice": "multiple-choice", "chat": "text-generation"}
METRICS = {"classification": [("accuracy", "accuracy", "accuracy", None), ("f1", "macro_f1", "macro-F1", "macro")],
           "multiple_choice": [("accuracy", "accuracy", "accuracy", None), ("f1", "macro_f1", "macro-F1", "macro")],
           "chat": [("loss", "loss", "validation loss", None), ("perplexity", "perplexity", "perplexity", None)]}
PLOTS = ("*.png", "plots/*.png", "plots/*.svg")


def _hub_id(ref: str | None) -> str | None:
    """A dataset/model reference that names a Hub repo (``org/name``), not a local path."""
    from multitune.hub import is_hub_id

    return ref if is_hub_id(ref) else None


def _shown(ref: str | None) -> str:
    """How a dataset is named in the card: its Hub id, or a local file's name (never the builder's paths)."""
    return _hub_id(ref) or Path(str(ref)).name


def base_license(cfg: Config) -> tuple[dict[str, str], str]:
    """The base model's licence fields from its own card (local dir, mirror or Hub), and where they came from."""
    from huggingface_hub import ModelCard

    from multitune.hub import mirror_root, resolve

    try:
        source = resolve(cfg.model.name_or_path, "model", mirror_root(cfg.hub_mirror))
        local = Path(source) / "README.md"
        card = ModelCard.load(local) if local.is_file() else ModelCard.load(source)
    except Exception as e:  # offline, gated without a token, or no card at all
        return {}, f"the base model's card was not readable ({type(e).__name__}); set the licence on the Hub page"
    fields = {k: getattr(card.data, k, None) for k in ("license", "license_name", "license_link")}
    return {k: v for k, v in fields.items() if v}, "inherited from the base model's card"


def eval_results(cfg: Config, results: dict[str, Any]):
    from huggingface_hub import EvalResult

    tasks = {t.name: t for t in cfg.tasks}
    split = f"train (held-out {cfg.data.val_fraction:.0%} validation, split seed {cfg.data.split_seed})"
    out = []
    for name, r in results.items():
        dataset = tasks[name].dataset if name in tasks else name
        for metric_type, key, label, config in METRICS[r["kind"]]:
            out.append(EvalResult(task_type=TASK_TYPES[r["kind"]], task_name=name, dataset_type=_hub_id(dataset) or name,
                                  dataset_name=f"{name} ({_shown(dataset)})", dataset_split=split, metric_type=metric_type,
                                  metric_name=label, metric_config=config, metric_value=round(float(r[key]), 6)))
    return out


def task_prompts(run: RunDir, cfg: Config, tokenizer) -> list[dict[str, Any]]:
    """Each task's exact chat messages (placeholders for the input), rendered prompt and answers."""
    from multitune.data.formatting import Formatter
    from multitune.results.predict import restore_task

    eot = Formatter(tokenizer, cfg.model.max_length).eot
    out = []
    for tcfg in cfg.tasks:
        task = restore_task(run, tcfg.name)
        if task.kind == "classification":
            ex = task.example({task.text_col: "{text}"})
        elif task.kind == "multiple_choice":
            ex = task.example({task.q_col: "{question}", task.c_col: {"label": task.label_names,
                               "text": [f"{{choice {x}}}" for x in task.label_names]}})
        else:
            ex = task.example_from_text("{prompt}")
        rendered = tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
        out.append({"task": task.name, "kind": task.kind, "messages": ex.messages, "rendered": rendered,
                    "answers": list(task.label_names), "end_of_turn": eot})
    return out


def model_card(run: RunDir, cfg: Config, results: dict[str, Any], tokenizer, *, repo_id: str, merged: bool) -> str:
    from huggingface_hub import ModelCardData

    base = cfg.model.name_or_path
    lic, lic_note = base_license(cfg)
    datasets = sorted({d for d in (_hub_id(t.dataset) for t in cfg.tasks) if d})
    lib = "transformers" if merged or cfg.peft.method == "full" else "peft"
    data = ModelCardData(
        model_name=repo_id.split("/")[-1], base_model=_hub_id(base),  # a local path is no Hub id (and names the build machine's disk)
        datasets=datasets or None, library_name=lib,
        tags=["multitune", cfg.peft.method, "multi-task", *(["merged"] if merged else [])], pipeline_tag="text-generation",
        eval_results=eval_results(cfg, results) or None, **lic,
    )
    return f"---\n{data.to_yaml()}\n---\n\n" + _body(run, cfg, results, tokenizer, repo_id, merged, lic_note)


def _table(rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _body(run, cfg, results, tokenizer, repo_id, merged, lic_note) -> str:
    base, p, t = _shown(cfg.model.name_or_path), cfg.peft, cfg.train  # a Hub id, or a local folder's name only
    launch = json.loads((run.root / "launch.json").read_text()) if (run.root / "launch.json").exists() else {}
    world = launch.get("world_size", 1)
    # as trained (train.batch_size: auto chose it at launch; launch.json records it), else as configured
    micro, accum = launch.get("per_device_train_batch_size", t.batch_size), launch.get("gradient_accumulation_steps", t.grad_accum)
    method = f"`{p.method}`" + (f" (r={p.r}, alpha={p.alpha}, dropout={p.dropout}, targets={p.target_modules})"
                                if p.method in ("lora", "qlora", "dora", "rslora") else "")
    prompts = task_prompts(run, cfg, tokenizer)
    eot = prompts[0]["end_of_turn"] if prompts else ""
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"`{base}` fine-tuned with [multitune](https://pypi.org/project/multitune/) on {len(cfg.tasks)} tasks at once: "
             + ", ".join(f"`{x.name}`" for x in cfg.tasks) + "." + (" The adapter is merged into the weights." if merged else ""),
             f"Licence: {lic_note}.", "", "## Results", "",
             f"On a held-out {cfg.data.val_fraction:.0%} stratified split of each dataset's train split (seed {cfg.data.split_seed}). "
             "Classification and multiple choice are scored by label likelihood: the answer with the highest summed "
             "log-probability (answer tokens + end of turn) given the prompt.", "",
             _table(summary_rows(results)) if results else "(no metrics.json: evaluate with `multitune eval`)", "",
             "## Training setup", "",
             f"- method: {method}; {t.epochs:g} epochs, learning rate {t.learning_rate:g}, {t.lr_scheduler} schedule, "
             f"warmup {t.warmup_ratio:g}",
             f"- batch: {micro} per GPU x {accum} accumulation x {world} process(es) = {micro * accum * world}"
             f" examples per step; max length {cfg.model.max_length} tokens; seed {cfg.seed}",
             f"- launch: {launch.get('distributed_type', 'single process')}" + (f", {launch.get('device')}" if launch else ""),
             "- data: " + "; ".join(f"`{x.name}` from `{_shown(x.dataset)}`" for x in cfg.tasks),
             "- the resolved config is `multitune.yaml` in this repo", "",
             "## Prompts: use exactly these", "",
             "Each task was trained on these chat messages (placeholders in braces), rendered with the tokenizer's "
             f"chat template; the model answers with one of the answers listed, then `{eot}`. "
             "Other wordings can get another task's kind of answer.", ""]
    for pr in prompts:
        answers = ", ".join(f"`{a}`" for a in pr["answers"][:20]) + (f" ... ({len(pr['answers'])} in all)" if len(pr["answers"]) > 20 else "")
        lines += [f"### `{pr['task']}` ({pr['kind']})", "", "```json", json.dumps(pr["messages"], indent=2, ensure_ascii=False), "```", "",
                  "Rendered prompt (the model continues from here):", "", "```text", pr["rendered"], "```", "",
                  f"Answers: {answers}" if pr["answers"] else "Answers: free text", ""]
    labelled = next((pr for pr in prompts if pr["answers"]), prompts[0] if prompts else None)
    lines += _usage(repo_id, base, merged or p.method == "full", p.r, labelled, eot)
    return "\n".join(lines) + "\n"


def _usage(repo_id: str, base: str, plain: bool, r: int, pr: dict | None, eot: str) -> list[str]:
    messages = json.dumps(pr["messages"], ensure_ascii=False) if pr else "[...]"
    load = (f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype=torch.bfloat16, device_map="auto")' if plain else
            f'model = AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.bfloat16, device_map="auto")\n'
            f'model = PeftModel.from_pretrained(model, "{repo_id}")')
    serve = (f"vllm serve {repo_id}" if plain else
             f"vllm serve {base} --enable-lora --max-lora-rank {max(r, 8)} --lora-modules multitune={repo_id}")
    served = repo_id if plain else "multitune"
    return [
        "## Use with transformers" + ("" if plain else " and PEFT"), "",
        "```python", "import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        *([] if plain else ["from peft import PeftModel"]), "", f'tok = AutoTokenizer.from_pretrained("{repo_id}")', load, "",
        f"messages = {messages}  # one task's messages, placeholders filled in", "",
        "# generation", "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\").to(model.device)",
        "out = model.generate(ids, max_new_tokens=32, do_sample=False)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))", "",
        "# or score the answers like multitune does: the highest summed log-probability wins",
        "def classify(messages, answers):",
        "    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids",
        "    scores = []", "    for answer in answers:",
        f"        completion = tok(answer + {eot!r}, add_special_tokens=False).input_ids",
        "        ids = torch.tensor([prompt + completion], device=model.device)",
        "        with torch.no_grad():",
        "            logp = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)",
        "        scores.append(logp[torch.arange(len(completion)), torch.tensor(completion)].sum().item())",
        "    return answers[max(range(len(answers)), key=scores.__getitem__)]", "```", "",
        "## Serve with vLLM", "", "```bash", serve, "```", "",
        "```python", "from openai import OpenAI", 'client = OpenAI(base_url="http://localhost:8000/v1", api_key="none")',
        f'reply = client.chat.completions.create(model="{served}", messages=messages, temperature=0, max_tokens=32)',
        "print(reply.choices[0].message.content)", "```",
    ]


def published_config(cfg: Config, run: RunDir) -> Config:
    """The run's config as uploaded: local paths shown as the card shows them (a Hub id, or a folder's or
    file's name), so the build machine's directories go nowhere."""
    tasks = [t.model_copy(update={"dataset": _shown(t.dataset) if t.dataset else None}) for t in cfg.tasks]
    return cfg.model_copy(update={"run_dir": Path(run.root.name), "hub_mirror": None, "tasks": tasks,
                                  "model": cfg.model.model_copy(update={"name_or_path": _shown(cfg.model.name_or_path)})})


def refuse_nonfinite(run: RunDir) -> None:
    bad = nonfinite_tensor(run.final)
    if bad:
        raise UserError(f"{run.final} holds non-finite weights ({bad} has NaN or inf): nothing was written or uploaded; "
                        "train the run again with a lower train.learning_rate")


def build_folder(run: RunDir, cfg: Config, out: Path, *, repo_id: str, merged: bool = False) -> Path:
    """Write exactly what `push` uploads into ``out`` (which must not exist, or be empty)."""
    from multitune.publishing.weights import write_weights
    from multitune.modeling.load import load_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new directory (nothing was written)")
    refuse_nonfinite(run)  # push and export both come here, merged or not: the adapter decides
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_weights(run, cfg, out, merged=merged)
        (out / "multitune.yaml").write_text(dump_config(published_config(cfg, run)))
        results = {}
        if run.metrics.exists():
            shutil.copyfile(run.metrics, out / "metrics.json")
            results = json.loads(run.metrics.read_text())
        for pattern in PLOTS:
            for plot in sorted(run.root.glob(pattern)):
                (out / plot.relative_to(run.root)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(plot, out / plot.relative_to(run.root))
        tokenizer = load_tokenizer(cfg.model, None, source=str(run.final))
        (out / "README.md").write_text(model_card(run, cfg, results, tokenizer, repo_id=repo_id, merged=merged))
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        (out / MANIFEST).write_text(json.dumps({"files": sorted([*files, MANIFEST])}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def push(run: RunDir, cfg: Config, results: dict[str, Any] | None = None, *, merged: bool = False,
         dry_run: Path | None = None, private: bool | None = None) -> str:
    """Upload the run (one commit) to ``cfg.hub.repo_id``; with ``dry_run``, write the folder there instead."""
    repo_id = cfg.hub.repo_id
    if not repo_id:
        raise UserError("no repo to push to: pass --repo-id me/name or set hub.repo_id in the config")
    if dry_run is not None:
        build_folder(run, cfg, dry_run, repo_id=repo_id, merged=merged)
        print(f"wrote {dry_run}: exactly what would be uploaded to {repo_id}")
        return str(dry_run)
    from huggingface_hub import CommitOperationDelete, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    refuse_nonfinite(run)  # named before a missing token, and before a merged model is built for nothing
    if not get_token():
        raise UserError("no Hugging Face token: export HF_TOKEN=hf_... (write access) or run `hf auth login`; nothing was uploaded")
    private = cfg.hub.private if private is None else private
    with tempfile.TemporaryDirectory(prefix="multitune-push-") as tmp:
        folder = build_folder(run, cfg, Path(tmp) / "repo", repo_id=repo_id, merged=merged)
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            operations = commit_operations(api, repo_id, folder, Path(tmp) / "earlier")
            api.create_commit(repo_id, operations, commit_message="multitune: upload fine-tuned model")
            really_private = bool(api.repo_info(repo_id).private)
        except HfHubHTTPError as e:
            raise UserError(f"upload to {repo_id} failed: {str(e).splitlines()[0]}; check HF_TOKEN has write access") from None
        except OSError as e:
            raise UserError(f"upload to {repo_id} failed ({e}); are you online?") from None
    removed = sum(isinstance(op, CommitOperationDelete) for op in operations)
    print(f"uploaded {'merged model' if merged else 'adapter'} to https://huggingface.co/{repo_id} "
          f"({'private' if really_private else 'public'})" + (f"; removed {removed} file(s) an earlier push left" if removed else ""))
    if really_private != private:
        print(f"notice: {repo_id} already existed and stays {'private' if really_private else 'public'}: push does not change "
              "a repo's visibility; change it in the repo's settings on the Hub")
    return f"https://huggingface.co/{repo_id}"


MANIFEST = "multitune-files.json"  # every file a push uploaded: the only files a later push may remove


def commit_operations(api, repo_id: str, folder: Path, scratch: Path) -> list:
    """Add every file ``folder``'s manifest lists (itself included); delete what an earlier push uploaded (its
    manifest says so) that this folder no longer has, e.g. a merged push's shards beside a later adapter.
    Files multitune did not upload are never in a manifest, so they stay."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    files = json.loads((folder / MANIFEST).read_text())["files"]
    remote = set(api.list_repo_files(repo_id))
    earlier: list[str] = []
    if MANIFEST in remote:
        local = api.hf_hub_download(repo_id, MANIFEST, local_dir=str(scratch))
        try:
            earlier = [f for f in json.loads(Path(local).read_text()).get("files", []) if isinstance(f, str)]
        except (ValueError, AttributeError):
            print(f"notice: {repo_id}'s {MANIFEST} is not readable; no file of an earlier push is removed")
    stale = sorted(set(earlier) & remote - set(files))
    adds = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    return adds + [CommitOperationDelete(path_in_repo=f) for f in stale]
