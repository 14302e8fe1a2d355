"""Training steps/s with ReplayCollator (real replay at 10%) against the plain TRL collator, on the
same data, model and settings (tiny model, NF4, CPU), alternating A B A B.

The replay pool is drawn from the phase's own data, so both sides see the same length distribution
and the difference is the collator's mechanism, not longer or shorter replay examples.

    python benchmarks/collator_overhead.py [--steps 40] [--repeats 4]

Prints a table and writes benchmarks/results/collator_overhead.json. Target: >= 0.98x.
"""

from __future__ import annotations

import argparse
import sys
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import publish  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "collator_overhead.json"))
    args = parser.parse_args()

    import transformers
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from cft_adapters.data import load_phase_data
    from cft_adapters.hf_configs import sft_config
    from cft_adapters.modeling import load_base_model, load_tokenizer, new_adapter, resolve_model_path
    from cft_adapters.recipe import load_recipe
    from cft_adapters.replay import attach_replay, build_pool

    transformers.utils.logging.set_verbosity_error()
    recipe = load_recipe(REPO / "recipes" / "smoke_er10.yaml", [f"training.max_steps={args.steps}", "training.save_steps=100000"])
    path = resolve_model_path(recipe.model)
    tok = load_tokenizer(recipe.model, path)
    model = new_adapter(load_base_model(recipe.model, path), recipe.adapter)
    data = load_phase_data(recipe.phases[1], 1, seed=0)
    pool = build_pool(recipe.phases[1].replay, where="bench", phase_dir=Path(tempfile.mkdtemp()), phase_examples=len(data.dataset),
                      seed=0, model=None, tokenizer=None, source_model="-", earlier_sources=recipe.phases[1].datasets,
                      console=Console(quiet=True), key={"benchmark": "collator_overhead"})

    def steps_per_second(with_replay: bool) -> float:
        trainer = SFTTrainer(model=model, args=sft_config(recipe.phase_training(1), recipe.model, Path(tempfile.mkdtemp())),
                             train_dataset=data.for_trainer(), processing_class=tok)
        trainer.remove_callback(PrinterCallback)
        if with_replay:
            attach_replay(trainer, pool, recipe.phases[1].replay, recipe.phase_training(1))
        started = time.perf_counter()
        trainer.train()
        return trainer.state.global_step / (time.perf_counter() - started)

    steps_per_second(False)  # warm-up (allocator, kernels)
    plain, replay = [], []
    for _ in range(args.repeats):
        replay.append(steps_per_second(True))
        plain.append(steps_per_second(False))
    a, b = statistics.median(replay), statistics.median(plain)
    result = {
        "benchmark": "collator_overhead", "steps": args.steps, "repeats": args.repeats, "replay": "real, ratio 0.10, pool drawn from the phase data",
        "replay_steps_per_second": replay, "plain_steps_per_second": plain,
        "ratio_replay_over_plain": round(a / b, 3), "target": ">= 0.98",
    }
    publish("training steps/s (median)", ["ReplayCollator", "plain TRL collator", "ratio", "target"],
            [[f"{a:.2f}", f"{b:.2f}", f"{a / b:.3f}", ">= 0.98"]], result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
