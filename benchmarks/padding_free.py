"""Padding-free against padded batches on variable-length data: non-padding tokens/s of the same
one-phase cft-train run (tiny model, NF4, CPU), alternating A B A B.

    python benchmarks/padding_free.py [--steps 30] [--repeats 2]

The data is the bundled English set with each answer repeated 1-12 times (seeded), so lengths range
from about 30 to 250 tokens, as real instruction data does. Prints a table and writes
benchmarks/results/padding_free.json. Target: >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import publish  # noqa: E402


def variable_length_data(path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    src = REPO / "cft_adapters" / "data" / "smoke" / "en_tasks.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for line in src.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            row["output"] = " ".join([row["output"]] * rng.randint(1, 12))
            out.write(json.dumps(row) + "\n")


def run(recipe: Path, out: Path, steps: int, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "cft_adapters.cli", str(recipe), f"output_dir={out}", "eval.tasks=[]",
           f"training.max_steps={steps}", *overrides]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / "run.json").read_text())["phases"][1]["train"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "padding_free.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cft-bench-pf-"))
    variable_length_data(work / "data.jsonl")
    recipe = work / "recipe.yaml"
    recipe.write_text(
        "model: {name_or_path: 'builtin:tiny-mistral', quantization: nf4}\n"
        "adapter: {r: 8, alpha: 16, dropout: 0.0}\n"
        "training: {max_length: 256, per_device_train_batch_size: 8, learning_rate: 1.0e-3, save_steps: 100000, logging_steps: 5}\n"
        "phases:\n  - {name: english, datasets: [{path: data.jsonl, language: en}]}\n"
    )
    padded, flat, grouped = [], [], []
    for i in range(args.repeats):  # A B C A B C
        padded.append(run(recipe, work / f"padded{i}", args.steps))
        flat.append(run(recipe, work / f"flat{i}", args.steps, "training.padding_free=true"))
        grouped.append(run(recipe, work / f"grouped{i}", args.steps, "training.group_by_length=true"))
    a = statistics.median(r["tokens_per_second"] for r in flat)
    b = statistics.median(r["tokens_per_second"] for r in padded)
    c = statistics.median(r["tokens_per_second"] for r in grouped)
    result = {
        "benchmark": "padding_free", "steps": args.steps, "repeats": args.repeats,
        "padding_free_tokens_per_second": [r["tokens_per_second"] for r in flat],
        "padded_tokens_per_second": [r["tokens_per_second"] for r in padded],
        "tokens_per_run": [r["tokens"] for r in flat],
        "group_by_length_tokens_per_second": [r["tokens_per_second"] for r in grouped],
        "ratio_padding_free_over_padded": round(a / b, 3),
        "ratio_group_by_length_over_padded": round(c / b, 3), "target": ">= 1.5",
    }
    publish("non-padding tokens/s (median), variable-length data",
            ["padded (random)", "padding-free", "ratio", "length-grouped", "ratio", "target"],
            [[f"{b:.0f}", f"{a:.0f}", f"{a / b:.2f}x", f"{c:.0f}", f"{c / b:.2f}x", ">= 1.5x"]], result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
