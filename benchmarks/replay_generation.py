"""Generative-replay throughput: batched, left-padded `generate` with a KV cache (what the runner
uses) against a per-prompt loop, on the same prompts, the tiny model, CPU.

    python benchmarks/replay_generation.py [--prompts 64] [--batch-size 16] [--new-tokens 32]

Both sides produce exactly --new-tokens tokens per prompt (min = max), so tokens/s compare like for
like. Prints a table and writes benchmarks/results/replay_generation.json. Target: >= 10x.
"""

from __future__ import annotations

import argparse
import sys
import statistics
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import publish  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "replay_generation.json"))
    args = parser.parse_args()

    from cft_adapters.data import load_prompts
    from cft_adapters.modeling import load_base_model, load_tokenizer, new_adapter, resolve_model_path
    from cft_adapters.recipe import AdapterConfig, DatasetSource, ModelConfig
    from cft_adapters.replay import generate_answers

    cfg = ModelConfig(name_or_path="builtin:tiny-mistral", quantization="nf4")
    path = resolve_model_path(cfg)
    tok = load_tokenizer(cfg, path)
    model = new_adapter(load_base_model(cfg, path), AdapterConfig(r=8, alpha=16))  # as in the runner: a PeftModel
    src = DatasetSource(path="builtin:smoke/en_prompts.jsonl", language="en")
    prompts = [p["prompt"] for p in load_prompts(src, "prompts", seed=0)][: args.prompts]
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    batched, looped = [], []
    for _ in range(args.repeats):  # alternate A B A B
        _, a = generate_answers(model, tok, prompts, batch_size=args.batch_size, **settings)
        _, b = generate_answers(model, tok, prompts, batch_size=1, **settings)
        batched.append(a["tokens_per_second"])
        looped.append(b["tokens_per_second"])
    a, b = statistics.median(batched), statistics.median(looped)
    result = {
        "benchmark": "replay_generation", "prompts": len(prompts), "batch_size": args.batch_size,
        "new_tokens_per_prompt": args.new_tokens, "model": "builtin:tiny-mistral (nf4)",
        "batched_tokens_per_second": batched, "per_prompt_tokens_per_second": looped,
        "ratio_batched_over_loop": round(a / b, 2), "target": ">= 10",
    }
    publish("generative replay throughput (new tokens/s, median)",
            [f"batched (bs={args.batch_size})", "per-prompt loop", "ratio", "target"],
            [[f"{a:.0f}", f"{b:.0f}", f"{a / b:.1f}x", ">= 10x"]], result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
