"""Scoring the 3 checkpoints of a smoke run (phase 0 = base, 1, 2): one `cft-eval` process that
loads the base once and swaps adapters, against 3 separate stock `lm_eval` CLI invocations.

    python benchmarks/eval_checkpoints.py [--tasks cft_smoke_en,cft_smoke_ml] [--repeats 1]

Both sides run as fresh processes (imports included: that is what a user waits for), on the same
fp32 base (the stock CLI cannot load NF4 with transformers 5), with the same tasks and batch size,
alternating A B A B. Prints a table and writes benchmarks/results/eval_checkpoints.json.
Target: in-process / CLI <= 0.5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import publish  # noqa: E402


def _timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="cft_smoke_en,cft_smoke_ml")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_checkpoints.json"))
    args = parser.parse_args()

    from cft_adapters.tasks_path import tasks_dir

    work = Path(tempfile.mkdtemp(prefix="cft-bench-eval-"))
    run = work / "run"
    subprocess.run([sys.executable, "-m", "cft_adapters.cli", str(REPO / "recipes" / "smoke.yaml"), f"output_dir={run}",
                    "model.quantization=none", "eval.tasks=[]"], check=True, capture_output=True)
    manifest = json.loads((run / "run.json").read_text())
    base = manifest["base_model_path"]
    adapters = [None] + [str(run / p["checkpoint"]) for p in manifest["phases"][1:]]

    in_process = [sys.executable, "-c", "from cft_adapters.cli import eval_main; raise SystemExit(eval_main())",
                  str(run), "--tasks", args.tasks, "--batch-size", str(args.batch_size), "--base-precision", "fp32"]

    def cli_runs() -> float:
        total = 0.0
        for i, adapter in enumerate(adapters):
            model_args = f"pretrained={base}" + (f",peft={adapter}" if adapter else "")
            total += _timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
                             "--include_path", str(tasks_dir()), "--tasks", args.tasks, "--apply_chat_template",
                             "--batch_size", str(args.batch_size), "--output_path", str(work / f"cli{i}")])
        return total

    a_times, b_times = [], []
    for _ in range(args.repeats):
        a_times.append(_timed(in_process))
        b_times.append(cli_runs())
    a, b = statistics.median(a_times), statistics.median(b_times)
    result = {
        "benchmark": "eval_checkpoints",
        "checkpoints": len(adapters),
        "tasks": args.tasks.split(","),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "in_process_seconds": a_times,
        "cli_seconds": b_times,
        "ratio_in_process_over_cli": round(a / b, 3),
        "target": "<= 0.5",
    }
    publish("scoring 3 checkpoints (wall seconds, median)",
            ["in-process (cft-eval, 1 base load)", "3x stock lm_eval CLI", "ratio", "target"],
            [[f"{a:.1f}", f"{b:.1f}", f"{a / b:.3f}", "<= 0.5"]], result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
