"""What a study cell pays besides training and scoring, before and after the cuts of issue 16,
side by side in one run on the mini-study's model (SmolLM2-135M-Instruct, NF4):

- the base: loading and quantizing it again for every cell, against taking the previous cell's
  base back from phases.BasePool with its adapter removed (PEFT unload);
- lm-eval's task index: lm-eval's own task files plus ours, against our include paths alone
  (evaluation.task_manager for tasks they define entirely).

    python -m cft_adapters.fetch smollm2
    python benchmarks/study_overheads.py [--repeats 3]

Prints a table and writes benchmarks/results/study_overheads.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import publish  # noqa: E402


def _seconds(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "study_overheads.json"))
    args = parser.parse_args(argv)

    from cft_adapters import modeling
    from cft_adapters.evaluation import _task_manager, task_manager
    from cft_adapters.phases import BasePool
    from cft_adapters.recipe import load_recipe
    from cft_adapters.tasks_path import task_dirs

    recipe = load_recipe(REPO / "benchmarks" / "mini_study" / "similar.yaml")
    path = modeling.resolve_model_path(recipe.model)
    modeling.load_tokenizer(recipe.model, path)

    def load() -> None:
        modeling.load_tokenizer(recipe.model, path)
        modeling.load_base_model(recipe.model, path)

    pool = BasePool()
    key = BasePool.key(recipe, path)
    pool.give(key, modeling.load_tokenizer(recipe.model, path), modeling.load_base_model(recipe.model, path))

    def reuse() -> None:  # what a cell does with the pool: take the base, put an adapter on, unload it, give it back
        tokenizer, base = pool.take(key)
        peft = modeling.new_adapter(base, recipe.adapter, None)
        pool.give(key, tokenizer, peft.unload())

    base_fresh, base_pooled = _seconds(load, args.repeats), _seconds(reuse, args.repeats)

    dirs = task_dirs()

    def full() -> None:
        _task_manager.cache_clear()
        _task_manager(dirs, True)

    def ours() -> None:
        _task_manager.cache_clear()
        task_manager(list(recipe.eval.tasks))

    index_full, index_ours = _seconds(full, args.repeats), _seconds(ours, args.repeats)
    med = {name: statistics.median(v) for name, v in
           {"base_load": base_fresh, "base_pooled": base_pooled, "index_full": index_full, "index_ours": index_ours}.items()}
    rows = [
        ["base per cell", f"{med['base_load']:.2f}", f"{med['base_pooled']:.2f}", f"{med['base_load'] / med['base_pooled']:.0f}x"],
        ["lm-eval task index per process", f"{med['index_full']:.2f}", f"{med['index_ours']:.3f}",
         f"{med['index_full'] / med['index_ours']:.0f}x"],
    ]
    result = {"repeats": args.repeats, "median_seconds": med,
              "seconds": {"base_load": base_fresh, "base_pooled": base_pooled, "index_full": index_full, "index_ours": index_ours},
              "model": recipe.model.name_or_path, "tasks": list(recipe.eval.tasks)}
    publish("Study overheads, seconds (median)", ["what", "before", "after", "ratio"], rows, result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
