"""GPU training benchmark: a Mistral-7B-architecture model with random weights (nothing comes from
a hub), NF4, long sequences. Plain TRL (benchmarks/baselines/plain_trl.py) against cft-train, with
and without the fast path, as fresh processes. Also checks the memory planner against CUDA's peak.

    python benchmarks/gpu/bench_train.py --size 7b --out DIR      # on a GPU
    python benchmarks/gpu/bench_train.py --size tiny --out DIR    # anywhere: keeps the script correct

MFU = achieved model FLOP/s / the card's dense bf16 peak. Model FLOPs per token for LoRA on a frozen
base: forward 2N + backward through activations 2N (no weight gradients for the frozen base) = 4N,
plus attention 4·layers·seq·hidden (forward and backward of the score and value products, causal
half), with N the base's parameter count.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}


def build_model(size: str, out: Path) -> int:
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from cft_adapters.tiny import builtin_model_path

    config = MistralConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(builtin_model_path("tiny-mistral")).save_pretrained(out)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    return n


def build_data(path: Path, seq: int, n: int = 64) -> None:
    """Alpaca rows of 25-100% of `seq` tokens (the tiny byte-level BPE makes ~1 token per 3 chars)."""
    rng = random.Random(0)
    words = "the model learns new languages without forgetting what it could do before".split()
    with path.open("w") as fh:
        for i in range(n):
            length = int(seq * rng.uniform(0.25, 1.0) * 2.5)
            text = " ".join(rng.choice(words) for _ in range(length // 5))
            fh.write(json.dumps({"instruction": f"Write passage {i}.", "input": "", "output": text}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/cft_gpu_bench")
    shutil.rmtree(work, ignore_errors=True)  # every run starts from scratch: no finished phase is reused
    work.mkdir()
    started = time.perf_counter()
    n_params = build_model(args.size, work / "model")
    build_data(work / "data.jsonl", args.seq)
    print(f"model {args.size}: {n_params / 1e9:.2f}B params, built in {time.perf_counter() - started:.0f}s", flush=True)

    common = dict(max_length=args.seq, per_device_train_batch_size=args.batch, learning_rate=1e-4, max_steps=args.steps,
                  warmup_ratio=0.0, logging_steps=5, save_steps=100000, seed=42, gradient_checkpointing=True)
    runs = {}
    plain_json = work / "plain.json"
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "benchmarks/baselines/plain_trl.py"), "--model", str(work / "model"),
                    "--data", str(work / "data.jsonl"), "--steps", str(args.steps), "--batch-size", str(args.batch),
                    "--max-length", str(args.seq), "--lr", "1e-4", "--r", "16", "--gradient-checkpointing",
                    "--output-dir", str(work / "plain"), "--out", str(plain_json)], check=True)
    runs["A plain TRL"] = {**json.loads(plain_json.read_text()), "wall": time.perf_counter() - t}
    (out / "partial.json").write_text(json.dumps(runs, indent=1))
    variants = {"B cft-train": [], "B cft-train fast": ["training.padding_free=true"]}
    try:
        import liger_kernel  # noqa: F401

        if torch.cuda.is_available():
            variants["B cft-train fast"].append("training.use_liger_kernel=true")
    except ImportError:
        pass
    for name, extra in variants.items():
        recipe = work / "recipe.yaml"
        training = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in common.items())
        recipe.write_text(f"model: {{name_or_path: '{work / 'model'}', quantization: nf4}}\n"
                          f"adapter: {{r: 16, alpha: 32, dropout: 0.0}}\ntraining: {{{training}}}\n"
                          f"phases:\n  - {{name: long, datasets: [{{path: '{work / 'data.jsonl'}', language: en}}]}}\n")
        run_dir = work / name.replace(" ", "_")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cft_adapters.cli", str(recipe), f"output_dir={run_dir}", *extra], check=True)
        runs[name] = {**json.loads((run_dir / "run.json").read_text())["phases"][1]["train"], "wall": time.perf_counter() - t,
                      "switches": extra}
        (out / "partial.json").write_text(json.dumps(runs, indent=1))

    from transformers import AutoConfig

    from cft_adapters.memory import estimate

    config = AutoConfig.from_pretrained(work / "model")
    est = estimate(config, quantization="nf4", compute_bytes=2 if torch.cuda.is_available() else 4, r=16,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   batch=args.batch, seq_len=args.seq, gradient_checkpointing=True)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    h, layers = SIZES[args.size]["hidden_size"], SIZES[args.size]["num_hidden_layers"]
    flops_per_token = 4 * n_params + 4 * layers * args.seq * h
    for r in runs.values():
        r["mfu"] = round(r["tokens_per_second"] * flops_per_token / peak, 4) if peak else None
    base = runs["A plain TRL"]["tokens_per_second"]
    result = {"card": card, "size": args.size, "params": n_params, "seq": args.seq, "batch": args.batch, "steps": args.steps,
              "gradient_checkpointing": True, "flops_per_token": flops_per_token, "peak_bf16_flops": peak,
              "runs": runs, "ratios_vs_plain": {k: round(v["tokens_per_second"] / base, 3) for k, v in runs.items()},
              "memory_estimate_mib": est.to_json()}
    (out / "gpu_train.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# GPU training benchmark: {card}", "", f"Mistral-7B architecture ({n_params / 1e9:.2f}B params, random "
             f"weights) NF4, seq {args.seq}, batch {args.batch}, {args.steps} steps, gradient checkpointing on.", "",
             "| run | tokens/s | step s | peak MiB (CUDA) | MFU | vs plain |", "|---|---:|---:|---:|---:|---:|"]
    for k, v in runs.items():
        lines.append(f"| {k} {' '.join(v.get('switches', []))} | {v['tokens_per_second']:.0f} | {v['seconds'] / v['steps']:.2f} | "
                     f"{v['peak_memory_mb']:.0f} | {v['mfu']} | {v['tokens_per_second'] / base:.3f} |")
    lines += ["", f"Memory planner estimate for this setting: {est.total:.0f} MiB "
              f"(weights {est.weights:.0f}, LoRA+optimizer {est.lora:.0f}, activations {est.activations:.0f}, logits {est.logits:.0f})."]
    (out / "gpu_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
