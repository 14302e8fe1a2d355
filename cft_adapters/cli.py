"""`cft-train RECIPE [key.path=value ...] [--dry-run]` and `cft-train --schema`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from rich.console import Console

from cft_adapters.errors import CftError, DataError

USAGE_EPILOG = """examples:
  cft-train recipes/smoke.yaml
  cft-train recipes/mistral_dissimilar.yaml output_dir=runs/m1 phases[1].training.learning_rate=1e-4
  cft-train recipes/smoke.yaml --dry-run
  cft-train --schema > recipe.schema.json
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cft-train",
        description="Run every phase of a continual fine-tuning recipe (QLoRA adapters, TRL SFTTrainer).",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", nargs="?", help="the recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.learning_rate=1e-4")
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe and data, print the plan, load no model")
    parser.add_argument("--schema", action="store_true", help="print the recipe JSON Schema and exit")
    return parser


def _quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) would drown the run's own progress."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # lm-eval warns that each ability group's members report different metrics: by design here.
    # Its level follows LMEVAL_LOG_LEVEL, so a user who sets it keeps their choice.
    level = logging.getLevelName(os.environ.get("LMEVAL_LOG_LEVEL", "ERROR").upper())
    logging.getLogger("lm_eval").setLevel(level if isinstance(level, int) else logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes logs a warning on import when an optional CPU kernel cannot be fetched from the
    # hub; it falls back to its own kernel, and this tool never fetches code from the hub.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = _parser().parse_intermixed_args(argv)
    console = Console(stderr=False)
    err = Console(stderr=True)
    if args.schema:
        from cft_adapters.recipe import recipe_json_schema

        print(json.dumps(recipe_json_schema(), indent=2))
        return 0
    if args.recipe is None:
        _parser().print_usage(sys.stderr)
        err.print("cft-train: error: a recipe file is required (or --schema)")
        return 2
    bad = [o for o in args.overrides if o.startswith("-")]
    if bad:
        err.print(f"cft-train: error: unknown option(s): {' '.join(bad)}")
        return 2
    try:
        from cft_adapters.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            from cft_adapters.plan import dry_run

            _quiet_libraries()
            dry_run(recipe, args.recipe, console)
            return 0
        _quiet_libraries()
        from cft_adapters.phases import PhaseRunner

        manifest = PhaseRunner(recipe, args.recipe, console).run()
        failed = [f"{r.index} {r.name}" for r in manifest.phases if r.eval_status == "failed"]
        if failed:
            err.print(f"evaluation failed for phase(s) {', '.join(failed)} (see eval_error in run.json); "
                      f"every checkpoint is kept; retry with: cft-eval {recipe.output_dir}")
            return 1
        return 0
    except DataError as exc:  # raised with key paths; name the recipe file too
        for line in exc.problems:
            err.print(f"{args.recipe}: {line}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except CftError as exc:
        for line in exc.problems:
            err.print(line, markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted: re-run the same command to resume from the last checkpoint")
        return 130


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cft-eval",
        description="Re-score the checkpoints of an existing run (phase 0 = the base, then every finished "
        "phase) with lm-eval, swapping adapters on one loaded base. Nothing is retrained.",
    )
    parser.add_argument("run_dir", nargs="?", help="a run directory written by cft-train")
    parser.add_argument("--tasks", help="comma-separated lm-eval tasks or groups (default: the recipe's eval.tasks)")
    parser.add_argument("--limit", type=float, help="examples per task (int) or a fraction below 1")
    parser.add_argument("--batch-size", type=int, help="lm-eval batch size (default: the recipe's)")
    parser.add_argument("--base-precision", choices=["nf4", "bf16", "fp32"], help="precision of the base to score on")
    parser.add_argument("--phases", help="comma-separated phase indices to score (default: all finished)")
    parser.add_argument("--include-path", action="store_true", help="print the lm_eval_tasks folder (for --include_path) and exit")
    return parser


def eval_main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = _eval_parser()
    args = parser.parse_args(argv)
    if args.include_path:
        from cft_adapters.tasks_path import tasks_dir

        print(tasks_dir())
        return 0
    if args.run_dir is None:
        parser.print_usage(sys.stderr)
        print("cft-eval: error: a run directory is required (or --include-path)", file=sys.stderr)
        return 2
    console, err = Console(), Console(stderr=True)
    try:
        _quiet_libraries()
        from cft_adapters.rescore import rescore_run

        ok = rescore_run(
            args.run_dir,
            console,
            tasks=args.tasks.split(",") if args.tasks else None,
            limit=args.limit,
            batch_size=args.batch_size,
            base_precision=args.base_precision,
            phases=[int(p) for p in args.phases.split(",")] if args.phases else None,
        )
        return 0 if ok else 1
    except CftError as exc:
        for line in exc.problems:
            err.print(line, markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
