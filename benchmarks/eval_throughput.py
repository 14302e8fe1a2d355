"""Scoring throughput on this device: prompt tokens/s (the forward passes loglikelihood requests
make) and generated tokens/s (batched greedy `generate`, what generate_until requests make), for a
model loaded the way the runner scores it (NF4 or not, a LoRA adapter attached).

    python benchmarks/eval_throughput.py [--model builtin:tiny-mistral] [--quantization nf4]
        [--batch-size 8] [--prompt-tokens 256] [--new-tokens 64]

Prints a table (batched against one sequence at a time, side by side) and merges an entry for this
model and device into benchmarks/results/eval_throughput.json, which `cft-train --dry-run` reads
for its evaluation-time estimate (cft_adapters/eval_cost.py). Run it on the GPU you will score on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import machine  # noqa: E402


def _timed(fn, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-mistral")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_throughput.json"))
    args = parser.parse_args()

    import torch

    from cft_adapters.eval_cost import this_device
    from cft_adapters.modeling import load_base_model, load_tokenizer, new_adapter, resolve_model_path
    from cft_adapters.recipe import AdapterConfig, ModelConfig

    cfg = ModelConfig(name_or_path=args.model, quantization=args.quantization)
    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    model = new_adapter(load_base_model(cfg, path), AdapterConfig(r=16, alpha=32)).eval()
    device = next(model.parameters()).device
    vocab = min(len(tokenizer), model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)

    def batch(b: int) -> torch.Tensor:
        return torch.randint(10, vocab, (b, args.prompt_tokens), generator=gen).to(device)

    results = {}
    for b in (1, args.batch_size):
        ids = batch(b)
        with torch.no_grad():
            model(input_ids=ids)  # warm-up
            prefill = _timed(lambda: model(input_ids=ids), args.repeats)
            kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id, use_cache=True)
            decode = _timed(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs),
                            args.repeats)
        # generate's time includes one prefill; take it out so decode is tokens generated per second.
        results[b] = {"prefill_tokens_per_s": b * args.prompt_tokens / prefill,
                      "decode_tokens_per_s": b * args.new_tokens / max(decode - prefill, 1e-9)}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"scoring throughput: {args.model} ({args.quantization}), {this_device()}")
    for col in ("batch", "prompt tok/s", "generated tok/s"):
        table.add_column(col, justify="right")
    for b, r in results.items():
        table.add_row(str(b), f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s']:,.1f}")
    one, many = results[1], results[args.batch_size]
    table.add_row("ratio", f"{many['prefill_tokens_per_s'] / one['prefill_tokens_per_s']:.2f}",
                  f"{many['decode_tokens_per_s'] / one['decode_tokens_per_s']:.2f}")
    Console().print(table)

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"entries": []}
    entry = {"name": args.model, "device": this_device(), "batch_size": args.batch_size,
             "prefill_tokens_per_s": round(many["prefill_tokens_per_s"], 1),
             "decode_tokens_per_s": round(many["decode_tokens_per_s"], 1),
             "how": f"measured by benchmarks/eval_throughput.py ({args.quantization}, prompt {args.prompt_tokens} "
                    f"tokens, {args.new_tokens} new tokens, median of {args.repeats}) on {machine()}"}
    data["entries"] = [e for e in data["entries"] if (e["name"], e["device"]) != (entry["name"], entry["device"])]
    data["entries"].append(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
