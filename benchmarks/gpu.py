"""GPU mode: a Llama-3-8B-shaped model with random bf16 weights; TRL defaults, TRL expert, multitune; MFU, memory.

    python -m benchmarks.gpu                                    # on a CUDA machine: section a of `make gpu-check`
    python -m benchmarks.gpu --sides qlora                      # section b (needs bitsandbytes)
    python -m benchmarks.gpu --layers 2 --sides multitune multitune+liger multitune+grouped
    python -m benchmarks.gpu --shape tiny --steps 3 --warmup 1  # the same code path on a CPU (what the tests run)

The Hub is not needed: speed does not depend on the weights' values, so the model is built from its
config with random weights, directly in bf16 on the GPU, and saved once under --models (sections of
`make gpu-check` share one folder, so the 16 GB model is built once and loaded after). Every side
sees the same tokens per optimizer step: the padded sides (TRL defaults) take `--examples` examples,
the packed ones (TRL expert, multitune) as many rows of `--seq-len` as hold the same number of tokens
on average. Tokens/s covers optimizer steps warmup+1..N, timed with `torch.cuda.synchronize()`; peak
memory (allocated and reserved) is reset when training starts and read after the last step, and set
beside the memory model's prediction at the side's recorded shape (`plan_gib`, the model `multitune plan`
uses). Each side's output goes to --logs as it runs, so a side killed by a timeout still leaves its log; its
row is written to --json and its figures printed on one line (`side NAME: ...`) as soon as it ends.

MFU is given twice: against the card's bf16 matmul rate measured in this run (an 8192^3 product,
`matmul_rate`) and against the datasheet figure. The FLOP count is the README's (`flops_per_token`),
with the mean example length as the attention context.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from multitune.files import atomic_write

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    # Llama 3 / 3.1 8B
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 4096, "rope_theta": 500000.0},
}
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10G": 125e12}  # dense, no sparsity
# SDPA on every packed side but one: `model.attn_implementation: auto` picks FlexAttention for packed rows on a GPU
# without flash-attn, whose first steps compile; "multitune+flex" measures it (section c, 2 layers: a bounded warm-up)
LORA = {"peft.method": "lora", "train.packing": True, "model.attn_implementation": "sdpa"}
SIDES = {  # benchmarks.train_speed side, overrides
    "trl-defaults": ("trl-defaults", {}),
    "trl-expert": ("trl-expert", {}),
    "trl-expert+liger": ("trl-expert", {"train.liger": True}),
    "multitune": ("multitune", LORA),
    "qlora": ("multitune", {**LORA, "peft.method": "qlora"}),
    "multitune+liger": ("multitune", {**LORA, "train.liger": True}),
    "multitune+compile": ("multitune", {**LORA, "train.compile": True}),
    "multitune+padded": ("multitune", {**LORA, "train.packing": False}),
    "multitune+grouped": ("multitune", {**LORA, "train.packing": False, "train.group_by_length": True}),
    "multitune+flex": ("multitune", {**LORA, "model.attn_implementation": "flex_attention"}),
}


def matmul_params(shape: dict) -> int:
    """Weights of every matrix multiplication per token: attention, MLP and the output head (not the embedding)."""
    d, i, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * i) + d * V


def flops_per_token(shape: dict, seq_len: int, adapter_params: int | None) -> float:
    """FLOPs needed per trained token: 6P (full) or 4P + 6P_adapter (frozen base), plus causal attention."""
    P, L, d = matmul_params(shape), shape["num_hidden_layers"], shape["hidden_size"]
    attention = 6 * L * seq_len * d
    weights = 6 * P if adapter_params is None else 4 * P + 6 * adapter_params
    return weights + attention


def peak_flops(device_name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if device_name and k in device_name), None)


def matmul_rate(n: int | None = None, repeats: int = 10) -> dict:
    """The card's bf16 matmul rate, measured: an n^3 product (8192 on a GPU) timed with synchronize, median of runs."""
    import statistics

    import torch

    cuda = torch.cuda.is_available()
    n = n or (8192 if cuda else 512)
    dev = "cuda" if cuda else "cpu"
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up products
            times.append(time.perf_counter() - t0)
    del a, b
    release_gpu()
    return {"n": n, "device": dev, "flops_per_s": 2 * n**3 / statistics.median(times)}


def release_gpu() -> None:
    """Hand this process's cached GPU memory back to the driver: the sides train in child processes.

    Seen on an H100 (2026-11-27): the 16 GB bf16 model built here stayed in the caching allocator
    after it was saved, and the packed sides ran out of memory beside it.
    """
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


GPU_TARGETS = {  # the goals for 8B LoRA on one H100/H200: name -> (goal, kind)
    "gpu_vs_trl_expert": (1.3, "at least"),  # multitune's tokens/s over the TRL expert's
    "gpu_tokens_per_s": (12_500.0, "at least"),  # NeMo AutoModel's published 8B LoRA figure on one H100
    "gpu_memory_vs_plan": (0.10, "within"),  # the worst side's |peak / plan's prediction - 1|
}


def targets(record: dict) -> list[dict]:
    """One verdict per goal from this run's rows (multitune's speed and every side's memory against the model)."""
    by = {r["side"]: r for r in record["rows"] if "error" not in r}
    ours = by.get("multitune")
    values = {
        "gpu_vs_trl_expert": ours.get("vs_trl-expert") if ours else None,
        "gpu_tokens_per_s": ours["tokens_per_s"] if ours else None,
        "gpu_memory_vs_plan": max((abs(r["peak_allocated_gib"] / r["plan_gib"] - 1) for r in by.values()
                                   if r.get("peak_allocated_gib") and r.get("plan_gib")), default=None),
    }
    out = []
    for name, (goal, kind) in GPU_TARGETS.items():
        v = values[name]
        met = v is not None and (v >= goal if kind == "at least" else v <= goal)
        out.append({"target": name, "value": v, "goal": goal, "met": met})
    return out


def target_line(t: dict) -> str:
    shown = "n/a" if t["value"] is None else f"{t['value']:.3g}"
    kind = GPU_TARGETS[t["target"]][1]
    return f"target {t['target']}: {shown} (goal: {kind} {t['goal']:g}) {'met' if t['met'] else 'missed'}"


def gpu_rows(record: dict) -> list[tuple[str | None, dict]]:
    """(section, row) for every side's row in each layout a GPU record is kept in: this module's --json file (top-level
    ``rows``), one section of `make gpu-check` as it wrote it (section-X.json: ``results.rows``), and the record that
    scripts/gpu_record.py assembles from a check's sections (``sections.X.results.rows``)."""
    found: list[tuple[str | None, dict]] = []
    if isinstance(record.get("rows"), list):
        found += [(record.get("section"), r) for r in record["rows"]]
    if isinstance(record.get("results"), dict):
        found += [(record.get("section"), r) for r in record["results"].get("rows", [])]
    sections = record.get("sections")
    for name, section in sections.items() if isinstance(sections, dict) else ():
        if isinstance(section, dict) and isinstance(section.get("results"), dict):
            found += [(name, r) for r in section["results"].get("rows", [])]
    return [(where, r) for where, r in found if isinstance(r, dict)]


def predicted_gib(shape: dict) -> float:
    """The memory model's peak (`multitune plan`'s) at a side's recorded shape (``memory_shape``), in GiB."""
    from transformers import LlamaConfig

    from multitune.config import config_from_dict
    from multitune.launch.memory import Arch, Step, coefficients_for, predict_peak
    from multitune.launch.plan import GiB, count

    model = shape["model"]
    hf = LlamaConfig(**(SHAPES[model["shape"]] | {"num_hidden_layers": model["layers"]}), tie_word_embeddings=False)
    cfg = config_from_dict({"model": {"name_or_path": "recorded", "dtype": model["dtype"]}, "peft": shape["peft"], "tasks": [{"name": "claims"}]})
    c = count(cfg, hf_config=hf)
    static = c.weight_bytes + c.trainable_bytes * (2 if cfg.peft.method != "full" else 1) + c.optimizer_bytes
    arch = Arch(c.hidden, c.intermediate, c.layers, c.vocab, c.layer_trainable, c.adapted_inputs, c.largest_weight)
    steps = [Step(s["rows"], s["length"], s["supervised"], masked=s.get("sequences", 1) > 1 or "tokens" in s and s["tokens"] < s["rows"] * s["length"],
                  checkpointing=shape["checkpointing"], attention=shape["attention"], liger=shape["liger"], loss=shape["loss"])
             for s in shape["steps"]]
    coef, _ = coefficients_for(cfg.peft.method, cfg.peft.dropout)
    return predict_peak(static, coef, arch, steps, cfg.peft.method, cfg.peft.dropout) / GiB


def build_model(out: Path, shape_name: str, tokenizer_dir: Path, layers: int | None = None) -> Path:
    """A random-weight model of the shape with the benchmark's tokenizer, built in bf16 on the GPU (CPU without one)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    shape = SHAPES[shape_name] | ({"num_hidden_layers": layers} if layers else {})
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 16 GB of bf16 initialised on the GPU, not 32 GB fp32 on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    release_gpu()
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def mean_example_length(config: Path) -> float:
    from multitune.config import load_config
    from multitune.data.formatting import Formatter
    from multitune.modeling.load import load_tokenizer
    from multitune.data.prepared import prepare

    cfg = load_config(config)
    lengths = [len(x) for x in prepare(cfg, Formatter(load_tokenizer(cfg.model, None), cfg.model.max_length), None).train["input_ids"]]
    return sum(lengths) / len(lengths)


def run_side(side: str, config: Path, args, out: Path) -> dict:
    """One side in its own process (its own CUDA context and peak), its output written to the log as it runs."""
    script, overrides = SIDES[side]
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "--side", script, "--config", str(config), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--out", str(out), "--overrides", json.dumps(overrides), "--lora",
           "--eval-rows", str(args.eval_rows)]
    args.logs.mkdir(parents=True, exist_ok=True)
    log = args.logs / f"side-{side}.log"
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return {"side": side, "error": log.read_text()[-3000:], "log": str(log)}
    return json.loads(out.read_text()) | {"side": side, "log": str(log)}


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's (said in the output)")
    ap.add_argument("--seq-len", type=int, default=2048, help="packed row length and max_length")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timed window")
    ap.add_argument("--examples", type=int, default=48, help="examples per optimizer step on the padded sides")
    ap.add_argument("--grad-accum", type=int, default=None,
                    help="micro-batches per optimizer step, every side (default: 2 at 8B with all 32 layers, else 1): "
                         "four packed 2048-token rows in one micro-batch ran out of an H100's 80 GB without checkpointing")
    ap.add_argument("--sides", nargs="*", default=["trl-defaults", "trl-expert", "multitune"], choices=list(SIDES))
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-gpu")
    ap.add_argument("--models", type=Path, default=None, help="where the random models are built once (default: WORKDIR)")
    ap.add_argument("--logs", type=Path, default=None, help="each side's output, as it runs (default: WORKDIR/logs)")
    ap.add_argument("--config", type=Path, default=None, help="tasks and tokenizer (default: the benchmark workspace's)")
    ap.add_argument("--eval-rows", type=int, default=50, help="validation rows per task scored after training")
    ap.add_argument("--json", type=Path, default=None,
                    help="results file, rewritten after every side (default: WORKDIR/gpu-results.json; `make gpu-check` "
                         "points it at its output folder, so a side's row is there as soon as the side ends)")
    args = ap.parse_args(argv)
    if args.grad_accum is not None and (args.grad_accum < 1 or args.examples % args.grad_accum):  # before any GPU time
        raise SystemExit(f"error: --grad-accum must be at least 1 and divide --examples ({args.examples}), got {args.grad_accum}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.logs = args.logs or args.workdir / "logs"
    args.json = args.json or args.workdir / "gpu-results.json"
    return args


def side_config(args) -> tuple[Path, dict, dict, dict]:
    """The sides' common config (gpu.yaml: the benchmark's tasks on the random model, built here unless built
    already) as a file and as a dict, the model's shape, and what the record says of the model and batch."""
    from benchmarks.__main__ import workspace

    bench_cfg = args.config or workspace(args.workdir)  # the seed tasks and their tokenizer
    raw = yaml.safe_load(bench_cfg.read_text())
    shape = SHAPES[args.shape] | ({"num_hidden_layers": args.layers} if args.layers else {})
    name = f"random-{args.shape}" + (f"-{args.layers}l" if args.layers else "")
    built = not ((args.models or args.workdir) / name / "config.json").exists()
    model_dir = build_model((args.models or args.workdir) / name, args.shape, Path(raw["model"]["name_or_path"]), args.layers)
    raw["model"].update(name_or_path=str(model_dir), max_length=args.seq_len)
    raw["peft"] = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    raw["run_dir"] = str(args.workdir / "run")
    accum = args.grad_accum or (2 if shape["num_hidden_layers"] >= 32 and args.shape == "8b" else 1)
    raw["train"].update(batch_size=args.examples, grad_accum=accum, gradient_checkpointing=False, learning_rate=1e-4, eval_rows_during_training=0,
                        save_steps=100_000, save_minutes=None, logging_steps=1, eval_steps=100_000)
    for t in raw["tasks"]:
        t["max_eval_rows"] = args.eval_rows
    config = args.workdir / "gpu.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config, raw, shape, {"grad_accum": accum, "model_dir": str(model_dir), "model_built_here": built}


def measure_side(side: str, config: Path, raw: dict, args, shape: dict, record: dict) -> dict:
    """One side trained in its own process; its row with the memory model's prediction at its recorded shape and MFU."""
    r = run_side(side, config, args, args.workdir / f"gpu-{side}.json")
    if "memory_shape" in r:  # the full shape, for the memory model's test (tests/unit/test_memory.py)
        peft_cfg = raw["peft"] | {"method": SIDES[side][1].get("peft.method", "lora")}
        r["memory_shape"] = {"side": side, "model": {"shape": args.shape, "layers": shape["num_hidden_layers"], "dtype": "bfloat16"},
                             "peft": peft_cfg, **r["memory_shape"]}
        r["plan_gib"] = predicted_gib(r["memory_shape"])
    if "error" not in r:
        f = flops_per_token(shape, round(record["mean_example_tokens"]), r.get("adapter_params"))
        r["mfu_measured"] = r["tokens_per_s"] * f / record["matmul"]["flops_per_s"]
        datasheet = record["datasheet_flops_per_s"]
        r["mfu_datasheet"] = r["tokens_per_s"] * f / datasheet if datasheet else None
    return r


def side_line(r: dict) -> str:
    """A side's figures on one line, printed as soon as it ends: the log keeps them if the call is killed later."""
    if "error" in r:
        return f"side {r['side']}: FAILED (its log: {r.get('log')})"
    mem = " ".join(f"{k}={r[k]:.2f}" for k in ("peak_allocated_gib", "peak_reserved_gib", "plan_gib") if r.get(k) is not None)
    return (f"side {r['side']}: {r['tokens_per_s']:.0f} tokens/s over {r['timed_steps']} steps, MFU {r['mfu_measured']:.1%} (measured rate) "
            f"{mem} val_answer_loss={r['val_answer_loss']:.3f}")


def print_table(record: dict) -> None:
    """Every side against both TRL baselines (the ratios are set on the rows), then the goals' verdicts."""
    base = {r["side"]: r for r in record["rows"] if "error" not in r}
    print(f"{'side':22s} {'tokens/s':>10s} {'vs defaults':>11s} {'vs expert':>9s} {'MFU meas':>8s} {'MFU sheet':>9s} "
          f"{'alloc GiB':>9s} {'plan GiB':>8s} {'resv GiB':>8s} {'val loss':>8s}")
    for r in record["rows"]:
        if "error" in r:
            print(f"{r['side']:22s} FAILED: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        for b in ("trl-defaults", "trl-expert"):
            r[f"vs_{b}"] = r["tokens_per_s"] / base[b]["tokens_per_s"] if b in base else None
        cells = [f"{r[f'vs_{b}']:.2f}x" if r[f"vs_{b}"] else "-" for b in ("trl-defaults", "trl-expert")]
        mem = [f"{r[k]:.1f}" if r.get(k) is not None else "-" for k in ("peak_allocated_gib", "plan_gib", "peak_reserved_gib")]
        sheet = "-" if r["mfu_datasheet"] is None else f"{r['mfu_datasheet']:.1%}"
        print(f"{r['side']:22s} {r['tokens_per_s']:10.0f} {cells[0]:>11s} {cells[1]:>9s} {r['mfu_measured']:8.1%} {sheet:>9s} "
              f"{mem[0]:>9s} {mem[1]:>8s} {mem[2]:>8s} {r['val_answer_loss']:8.3f}")
    record["targets"] = targets(record)
    for t in record["targets"]:
        print(target_line(t))


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    config, raw, shape, model = side_config(args)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rate = matmul_rate()
    record = {"device": device or "cpu", "shape": args.shape, "layers": shape["num_hidden_layers"],
              "layers_note": None if not args.layers else f"{args.layers} of {SHAPES[args.shape]['num_hidden_layers']} layers, for time",
              "seq_len": args.seq_len, "examples_per_step": args.examples, "grad_accum": model["grad_accum"],
              "mean_example_tokens": mean_example_length(config), "matmul": rate, "datasheet_flops_per_s": peak_flops(device),
              "rows": [], "model_dir": model["model_dir"], "model_built_here": model["model_built_here"],
              # what this process still holds on the GPU while the sides train (0 once release_gpu worked)
              "parent_reserved_gib": torch.cuda.memory_reserved() / 2**30 if torch.cuda.is_available() else None}
    print(f"{args.shape}-shaped model ({shape['num_hidden_layers']} layers) with random weights on {device or 'CPU'}; "
          f"{matmul_params(shape):.3g} matmul weights; bf16 matmul measured {rate['flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    for side in args.sides:
        record["rows"].append(measure_side(side, config, raw, args, shape, record))
        atomic_write(args.json, json.dumps(record, indent=2))  # as it goes (whole): a later failure, or a kill, loses nothing
        print(f"\n{side_line(record['rows'][-1])}", flush=True)  # a line of its own, after any progress bar
    print_table(record)
    atomic_write(args.json, json.dumps(record, indent=2))
    return 0 if all("error" not in r for r in record["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
