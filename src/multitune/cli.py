"""The `multitune` command. Each subcommand is a plain typed function; the work lives in the modules below."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from multitune.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune an open chat LLM on several tasks at once.")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. train.epochs=1")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="start over instead of resuming from the newest checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a finished run in run_dir, or another run's Hub checkpoints folder of its name")] = False,
) -> None:
    """Train on the config's tasks; relaunching the same command resumes from the newest checkpoint."""
    from multitune.config import load_config
    from multitune.files import write_failed
    from multitune.launch.runner import train as run_training
    from multitune.rundir import RunDir
    from multitune.training.checkpoints import out_of_space

    cfg = load_config(config, overrides or [])
    full = None
    try:
        run_training(cfg, resume=not no_resume, overwrite=overwrite)
    except Exception as e:
        if not write_failed(e):
            raise
        full = out_of_space(RunDir(cfg.run_dir), e)
    if full is not None:  # raised once the training's frames are gone, so its progress bars close before the error line
        gc.collect()
        raise full


@app.command("eval")
def eval_(
    target: Annotated[Path, typer.Argument(help="a run directory written by `train`, or a YAML config (its base model, untrained)")],
    mode: Annotated[str | None, typer.Option(help="likelihood, constrained or generate (default: the run's eval.mode)")] = None,
    max_rows: Annotated[int | None, typer.Option(help="score at most this many validation rows per task")] = None,
    shots: Annotated[int, typer.Option(help="k examples from the task's training rows in each prompt, as earlier chat turns")] = 0,
    template: Annotated[str | None, typer.Option(help="score under this named prompt template instead of the run's (`multitune templates`)")] = None,
    base: Annotated[bool, typer.Option("--base", help="score the run's base model, without its training")] = False,
) -> None:
    """Score a trained run, or a config's base model, on the recorded validation split.

    The run's own mode on every row rewrites metrics.json and report.md; any other evaluation (--max-rows,
    --mode, --shots, --template, --base, a config) writes metrics-<variant>.json and report-<variant>.md
    beside them (in the config's run_dir for a config), e.g. metrics-base-2shot.json.
    """
    from multitune.results.trained import open_run
    from multitune.results.variants import Variant, as_base, evaluate_and_write
    from multitune.rundir import RunDir

    variant = Variant(base=base or target.is_file(), shots=shots, template=template, mode=mode, max_rows=max_rows)
    if target.is_file():  # a config: its base model on the split its training makes (recorded in run_dir if it ran)
        from multitune.config import load_config

        cfg = load_config(target)
        run = RunDir(Path(cfg.run_dir))
        path = evaluate_and_write(as_base(cfg), run.root, run.splits, variant)
    elif base:  # the run's base model on the run's recorded split
        run = RunDir(target)
        path = evaluate_and_write(as_base(run.load_config()), run.root, run.splits, variant)
    else:
        path = open_run(target).evaluate_and_write(variant)
    print(f"wrote {path}")


@app.command("templates")
def templates_() -> None:
    """List the named prompt templates of each task kind (for tasks.<name>.template and `eval --template`)."""
    from multitune.tasks import templates as registry

    for kind in registry.BY_KIND:
        print(f"{kind:16s} {', '.join(registry.names(kind))}")


@app.command()
def compare(
    spec: Annotated[Path, typer.Argument(help="a compare spec (YAML): the base config and the rows, e.g. configs/compare-tiny.yaml")],
) -> None:
    """Base zero-/k-shot, prompt templates and trained runs on the same validation rows: one table with costs.

    Rows that name a training not yet finished are trained first (finished ones are reused).
    """
    from multitune.commands.compare import compare as run_compare

    run_compare(spec)


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `train`")],
    text: Annotated[list[str] | None, typer.Argument(help="input text(s)")] = None,
    task: Annotated[str | None, typer.Option(help="which trained task to apply (default: a one-task run's task)")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="JSON lines: rows in the task's schema, or strings")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="write predictions here as JSON lines")] = None,
    mode: Annotated[str, typer.Option(help="likelihood (every label ranked) or constrained (greedy decoding inside the labels)")] = "likelihood",
    min_confidence: Annotated[float | None, typer.Option(help="answer 'unsure' when the best label's probability is below this")] = None,
) -> None:
    """Predict labels (with their probability among the labels) or chat replies."""
    from multitune.results.predict import predict as run_predict
    from multitune.results.predict import read_inputs

    inputs: list = list(text or [])
    if input is not None:
        inputs += read_inputs(input)
    if not inputs:
        raise UserError("nothing to predict: give text arguments or --input FILE.jsonl")
    preds = run_predict(run_dir, task, inputs, mode=mode, min_confidence=min_confidence)
    lines = [json.dumps(p) for p in preds]
    if output is not None:
        output.write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} predictions to {output}")
    else:
        for src, p in zip(inputs, preds, strict=True):
            shown = src if isinstance(src, str) else json.dumps(src)[:80]
            print(f"{p.get('label', p.get('response'))}\t{p.get('score', '')}\t{shown}")


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `train` (with a chat task)")],
    input: Annotated[Path | None, typer.Option("--input", help="a file of prompts, one per line: print each answer and exit")] = None,
    task: Annotated[str | None, typer.Option(help="which chat task's prompt to use (default: the run's chat task)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="longest answer, in tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampled at this temperature")] = 0.0,
) -> None:
    """Talk to the fine-tuned model with its chat task's system prompt, the answer streamed as it is generated."""
    from multitune.results.converse import answer_all, interactive, open_chat, read_prompts

    prompts = read_prompts(input) if input is not None else None
    session = open_chat(run_dir, task, max_new_tokens, temperature)
    if prompts is not None:
        answer_all(session, prompts)
    else:
        interactive(session)


@app.command()
def tasks() -> None:
    """List the built-in tasks."""
    from multitune.tasks import BUILTIN

    for name, spec in BUILTIN.items():
        print(f"{name:16s} {spec['type']:16s} {spec.get('dataset') or '(set tasks.chat.dataset)'}")


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides")] = None,
) -> None:
    """Validate a config (with overrides) and print it fully resolved."""
    from multitune.config import dump_config, load_config
    from multitune.tasks import resolve_tasks

    print(dump_config(resolve_tasks(load_config(config, overrides or []))), end="")


@app.command("make-tiny-model")
def make_tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="where to save the model and tokenizer")],
    config: Annotated[Path | None, typer.Option(help="train on this config's training rows (default: generated data)")] = None,
    hidden: int = 128,
    layers: int = 4,
    vocab_size: int = 4096,
) -> None:
    """Build a tiny Llama-architecture model with a BPE tokenizer trained on task texts (HF format).

    With --config, the tokenizer and the short pretraining see the training rows of the config's split
    only (the split is deterministic: `train` with that config makes the same one), never its
    validation rows, so that comparisons on the validation rows stay fair.
    """
    from multitune.commands import tiny

    if config is not None:
        from multitune.config import load_config

        texts = tiny.training_texts(load_config(config))
    else:
        texts = tiny.corpus(tiny.synthetic_datasets(out_dir / "generated-data"))
    tiny.make_tiny_model(out_dir, texts, vocab_size=vocab_size, hidden=hidden, layers=layers)
    print(f"saved a tiny model to {out_dir}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo writes data, model and run")] = Path("runs/demo"),
    offline: Annotated[bool | None, typer.Option("--offline/--online", help="force a mode (default: detect)")] = None,
) -> None:
    """Run the main job on an embedded default and print the per-task table, the base model's zero-shot beside it."""
    from multitune.commands.demo import before_after, demo_config
    from multitune.launch.runner import train as run_training

    cfg = demo_config(workdir, offline)
    tuned = run_training(cfg, overwrite=True)
    print("\nwhat fine-tuning bought (the same validation rows, the base model zero-shot):")
    print(before_after(cfg, tuned))


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    repo_id: Annotated[str | None, typer.Option(help="Hub repo (default: the run's hub.repo_id)")] = None,
    private: Annotated[bool | None, typer.Option("--private/--public", help="repo visibility (default: the run's hub.private)")] = None,
    merged: Annotated[bool, typer.Option("--merged", help="upload the adapter merged into the base weights")] = False,
    dry_run: Annotated[Path | None, typer.Option("--dry-run", help="write the folder that would be uploaded here instead")] = None,
) -> None:
    """Upload a finished run (adapter or merged weights, tokenizer, config, metrics, model card) in one commit."""
    from multitune.publishing.publish import push as run_push
    from multitune.results.trained import open_run
    from multitune.rundir import RunDir

    run = RunDir(run_dir)
    trained = open_run(run)
    trained.publishable("push")
    cfg = trained.cfg
    hub = cfg.hub.model_copy(update={"repo_id": repo_id or cfg.hub.repo_id})
    run_push(run, cfg.model_copy(update={"hub": hub}), merged=merged, dry_run=dry_run, private=private)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    out_dir: Annotated[Path, typer.Argument(help="new directory for the model")],
    merged: Annotated[bool, typer.Option("--merged", help="merge the adapter into the base weights (QLoRA: dequantised first)")] = False,
) -> None:
    """Write the run's model (adapter, or merged into the base: a plain transformers model) with its model card."""
    from multitune.publishing.export import export as run_export
    from multitune.results.trained import open_run
    from multitune.rundir import RunDir

    run = RunDir(run_dir)
    trained = open_run(run)
    trained.publishable("export")
    cfg = trained.cfg
    run_export(run, cfg, out_dir, merged=merged)


@app.command()
def doctor(
    config: Annotated[Path | None, typer.Argument(help="YAML config to check against (optional)")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides")] = None,
) -> None:
    """Check this machine before paying for it: versions, GPUs, kernels, disk, tokens, nodes, writable dirs."""
    from multitune.launch.doctor import format_table, run_checks

    cfg = None
    if config is not None:
        from multitune.config import load_config

        cfg = load_config(config, overrides or [])
    checks = run_checks(cfg)
    print(format_table(checks))
    if any(c.status == "fail" for c in checks):
        raise SystemExit(1)  # click returns a typer.Exit code instead of exiting when not standalone


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="YAML config")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per node")] = 1,
    nodes: Annotated[int, typer.Option(help="number of nodes")] = 1,
    gpu: Annotated[str, typer.Option(help="a100-80gb, a100-40gb, h100-80gb, h100-pcie, h200, l40s, a6000, rtx4090")] = "a100-80gb",
    price: Annotated[float | None, typer.Option(help="dollars per GPU-hour, for the cost")] = None,
    global_batch: Annotated[int | None, typer.Option(help="examples per optimizer step (default: the config's at this size)")] = None,
    mfu: Annotated[float | None, typer.Option(help="model FLOPs utilisation to assume (default 0.35, QLoRA 0.25)")] = None,
    examples: Annotated[int | None, typer.Option(help="training examples per epoch (default: counted from the data)")] = None,
    tokens_per_example: Annotated[float | None, typer.Option(help="mean tokens per example (default: measured)")] = None,
) -> None:
    """Per-GPU memory, whether it fits, the launch config and batch to use, tokens/s, wall time and cost."""
    from multitune.launch import plan as planner
    from multitune.config import load_config

    cfg = load_config(config, overrides or [])
    data = planner.DataStats(examples, tokens_per_example, "given") if examples and tokens_per_example else None
    result = planner.make_plan(cfg, gpus=gpus, nodes=nodes, gpu=gpu, global_batch=global_batch, mfu=mfu, data=data)
    if examples and not tokens_per_example or tokens_per_example and not examples:
        measured = result.data
        if examples and measured.tokens is None:
            raise UserError(f"--examples {examples} needs --tokens-per-example here: the mean length is measured from the data, "
                            f"and {measured.source.rsplit('; pass', 1)[0]}")
        result.data = planner.DataStats(examples or measured.examples, tokens_per_example or measured.tokens, measured.source,
                                       measured.answer_tokens)
    from multitune.launch.plan_report import report

    print(report(cfg, result, price, str(config)), end="")


def main() -> None:
    logging.basicConfig(level=os.environ.get("MULTITUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click's usage errors, a full disk
        import click

        from multitune.files import write_error, write_failed

        if isinstance(e, click.ClickException):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        if write_failed(e):
            where = getattr(e, "filename", None)
            print(f"error: {write_error(e, Path(where).parent if where else Path.cwd())}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
