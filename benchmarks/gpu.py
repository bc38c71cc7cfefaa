"""GPU mode: a Llama-3-8B-shaped model with random weights, LoRA bf16 and QLoRA at sequence length 2048.

    python -m benchmarks.gpu                        # on a CUDA machine: baseline, LoRA bf16, QLoRA; tokens/s, MFU, memory
    python -m benchmarks.gpu --shape tiny --steps 2 # the same code path with a tiny shape (CPU; what the tests run)

The Hub is not needed: speed does not depend on the weights' values, so the model is built from its
config with random weights and saved once under --workdir. Sides: TRL's SFTTrainer with its defaults
and a LoRA `peft_config` (as its docs show), then multitune's LoRA and QLoRA recipes (packed rows of
2048 tokens, gradient checkpointing, bf16). MFU follows the formula in the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    # Llama 3 / 3.1 8B
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 4096, "rope_theta": 500000.0},
}
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10G": 125e12}  # dense, no sparsity
SIDES = {
    "baseline": {},
    "lora-bf16": {"peft.method": "lora", "train.packing": True},
    "qlora": {"peft.method": "qlora", "train.packing": True},
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


def build_model(out: Path, shape_name: str, tokenizer_dir: Path) -> Path:
    """A random-weight model of the shape (bf16), with the benchmark's tokenizer and chat template."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape_name], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.__main__ import workspace

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4, help="packed rows (multitune) / examples (baseline) per step")
    ap.add_argument("--sides", nargs="*", default=list(SIDES), choices=list(SIDES))
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-gpu")
    ap.add_argument("--config", type=Path, default=None, help="tasks and tokenizer (default: the benchmark workspace's)")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench_cfg = args.config or workspace(args.workdir)  # the seed tasks and their tokenizer
    raw = yaml.safe_load(bench_cfg.read_text())
    model_dir = build_model(args.workdir / f"random-{args.shape}", args.shape, Path(raw["model"]["name_or_path"]))
    raw["model"].update(name_or_path=str(model_dir), max_length=args.seq_len)
    raw["peft"] = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    raw["run_dir"] = str(args.workdir / "run")
    raw["train"].update(batch_size=args.batch_size, gradient_checkpointing=True, learning_rate=1e-4, eval_rows_during_training=4,
                        save_steps=100_000, logging_steps=1)
    config = args.workdir / "gpu.yaml"
    config.write_text(yaml.safe_dump(raw))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = peak_flops(device)
    print(f"{args.shape}-shaped model with random weights on {device or 'CPU'}; {matmul_params(SHAPES[args.shape]):.3g} matmul weights")
    print(f"{'side':12s} {'tokens/s':>10s} {'vs TRL':>7s} {'MFU':>6s} {'peak mem GiB':>13s} {'train loss':>11s}")
    rows, base = [], None
    for side in args.sides:
        out = args.workdir / f"gpu-{side}.json"
        cmd = [sys.executable, "-m", "benchmarks.train_speed", "--side", "baseline" if side == "baseline" else "padded",
               "--config", str(config), "--steps", str(args.steps), "--out", str(out), "--overrides", json.dumps(SIDES[side]),
               "--lora-baseline"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(f"the {side} side failed")
        r = json.loads(out.read_text()) | {"side": side}
        r["mfu"] = r["tokens_per_s"] * flops_per_token(SHAPES[args.shape], args.seq_len, r.get("adapter_params")) / peak if peak else None
        base = base or (r if side == "baseline" else None)
        r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        rows.append(r)
        mem = r.get("peak_gpu_gib") or r["peak_rss_mb"] / 1024
        print(f"{side:12s} {r['tokens_per_s']:10.0f} {r['vs_baseline'] or 0:6.2f}x "
              f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%'):>6s} {mem:13.1f} {r['train_loss_last']:11.3f}")
    (args.workdir / "gpu-results.json").write_text(json.dumps({"device": device, "shape": args.shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
