"""`--dry-run`: validate everything that can be checked without a model, and print the plan."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cft_adapters.tasks_path import use_include_paths
from cft_adapters.data import check_data
from cft_adapters.errors import DataError
from cft_adapters import eval_cost
from cft_adapters.evaluation import limit_problems_of, skipped_tasks, unknown_tasks
from cft_adapters.task_semantics import classify, unclassified_tasks
from cft_adapters.placement import check_placements, describe_for_dry_run, num_layers_from_config
from cft_adapters.analysis.predict import check_analysis_files
from cft_adapters.recipe import Recipe, TrainingConfig

def _training_summary(t: TrainingConfig) -> str:
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.num_train_epochs:g} ep"
    return f"{length}, lr {t.learning_rate:g}, batch {t.per_device_train_batch_size}x{t.gradient_accumulation_steps}, len {t.max_length}"


def dry_run(recipe: Recipe, recipe_path: str, console: Console, gpu_mem: float | None = None) -> None:
    if recipe.model.trust_remote_code:  # a dry run is how a recipe from elsewhere is vetted: it runs no model code
        console.print("dry run: model.trust_remote_code is true, but a dry run does not run the model repository's "
                      "code; what needs it (layer count, memory) shows as unknown", highlight=False)
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"trust_remote_code": False})})
    use_include_paths(recipe.eval.include_path)
    check_placements(recipe, recipe_path)
    check_analysis_files(recipe, recipe_path)
    problems = (unknown_tasks(recipe.eval.tasks) or unclassified_tasks(recipe.eval.tasks)
                or limit_problems_of(recipe.eval)) if recipe.eval.tasks else []
    try:
        sources = check_data(recipe, allow_unreachable_hub=True)
    except DataError as exc:
        raise DataError(problems + exc.problems) from None
    if problems:
        raise DataError(problems)

    m = recipe.model
    console.print(f"[bold]recipe[/] {recipe_path}  ->  output_dir {recipe.output_dir}")
    console.print(f"[bold]model[/] {m.name_or_path}" + (f" ({m.gguf_file})" if m.gguf_file else "")
                  + f", quantization {m.quantization}, compute {m.compute_dtype}")
    a = recipe.adapter
    console.print(f"[bold]adapter[/] LoRA r={a.r} alpha={a.alpha:g} dropout={a.dropout:g} on {', '.join(a.target_modules)}")
    num_layers = num_layers_from_config(recipe.model)
    table = Table(title="phase plan")
    for col in ("phase", "data", "examples", "languages", "training", "placement", "replay"):
        table.add_column(col, overflow="fold")
    table.add_row("0 base", "-", "-", "-", "evaluated only", "-", "-")
    for i, phase in enumerate(recipe.phases):
        training = recipe.phase_training(i)
        summaries = [s for s in sources[i] if s.where.startswith(f"phases[{i}].datasets")]
        counts = [s.examples for s in summaries]
        table.add_row(
            f"{i + 1} {phase.name}",
            "\n".join(s.source for s in summaries),
            str(sum(counts)) if all(c is not None for c in counts) else "unknown (hub)",
            ", ".join(sorted({lang for s in summaries for lang in s.languages})) or "-",
            _training_summary(training),
            describe_for_dry_run(phase.placement, num_layers, training.seed) if phase.placement else "none",
            (f"{phase.replay.kind} {phase.replay.ratio:g}" + (f" on English versions of this phase's prompts "
             f"(translated by {phase.replay.translate.model})" if phase.replay.translate else "")) if phase.replay else "none",
        )
    console.print(table)
    console.print(f"[bold]eval[/] tasks: {', '.join(recipe.eval.tasks) or '(none)'}")
    if recipe.eval.tasks:
        _print_eval_cost(recipe, console)
    _print_memory_plan(recipe, console, gpu_mem)
    unchecked = [s for found in sources.values() for s in found if s.unchecked]
    for s in unchecked:
        console.print(f"[yellow]not checked[/]: {escape(s.unchecked)}", highlight=False, soft_wrap=True)
    previews = [s.preview[0] for s in sources[0] if s.preview]
    if previews:
        console.print("[bold]first example of phase 1[/]", previews[0])
    if unchecked:
        console.print(f"[yellow]dry run OK except {len(unchecked)} hub source(s) that need the network[/]: "
                      "recipe valid, local data readable; no model was loaded.")
    else:
        console.print("[green]dry run OK[/]: recipe valid, data readable; no model was loaded.")


def _print_memory_plan(recipe: Recipe, console: Console, gpu_mem: float | None) -> None:
    from cft_adapters.memory import CUDA_CONTEXT_MIB, plan_phase, planning_config

    config = planning_config(recipe.model)
    if config is None:
        console.print("[bold]memory[/] unknown: the model config is not available offline")
        return
    table = Table(title="estimated peak GPU memory per phase (MiB; see cft_adapters/memory.py)")
    for col in ("phase", "weights", "LoRA+optim", "activations", "logits", "total", f"fits {gpu_mem:g} GiB" if gpu_mem else "fits"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, phase in enumerate(recipe.run_phases()):
        e = plan_phase(recipe, i, config)
        fits = ("yes" if e.fits(gpu_mem) else "NO") if gpu_mem else "-"
        table.add_row(phase.name, f"{e.weights:.0f}", f"{e.lora:.0f}", f"{e.activations:.0f}", f"{e.logits:.0f}", f"{e.total:.0f}", fits)
    console.print(table)
    console.print(f"(plus ~{CUDA_CONTEXT_MIB} MiB of CUDA context; knobs: gradient_checkpointing, per_device_train_batch_size, "
                  f"max_length, use_liger_kernel)")


def _print_eval_cost(recipe: Recipe, console: Console) -> None:
    """Requests and tokens per scoring unit, and the time one checkpoint's scoring takes (eval_cost)."""
    ev = recipe.eval
    skipped = skipped_tasks(ev)
    for task, why in skipped.items():
        console.print(f"[yellow]{task} skipped[/]: {escape(why)}; EA is averaged without AlpacaEval")
    paths: dict[str, tuple[str, ...]] = {}
    units = list(classify([t for t in ev.tasks if t not in skipped], paths=paths))
    cost = eval_cost.checkpoint_cost(units, ev.limit, ev.limits, paths, recipe.model.name_or_path)
    table = Table(title="evaluation cost of one checkpoint", title_justify="left")
    for col in ("task", "kind", "examples", "requests", "prompt tok", "gen tok typ/max", "time"):
        table.add_column(col, justify="left" if col in ("task", "kind") else "right")
    for u in cost.units:
        examples = f"{u.docs:,}" + ("" if u.docs == u.full_docs else f" of {u.full_docs:,}")
        generated = f"{u.gen_tokens:,} / {u.max_gen_tokens:,}" if u.kind == "generate" else "-"
        table.add_row(u.unit, {"generate": "gen", "loglikelihood": "loglik"}[u.kind] + ("+judge" if u.judged else ""), examples, f"{u.requests:,}",
                      f"{u.prompt_tokens:,}", generated, eval_cost.fmt_duration(cost.seconds(u)))
    requests = sum(u.requests for u in cost.units)
    table.add_row("total", "", f"{sum(u.docs for u in cost.units):,}", f"{requests:,}",
                  f"{sum(u.prompt_tokens for u in cost.units):,}",
                  f"{sum(u.gen_tokens for u in cost.units):,} / {sum(u.max_gen_tokens for u in cost.units):,}",
                  eval_cost.fmt_duration(cost.total_seconds()), end_section=True)
    console.print(table)
    t = cost.throughput
    if t is None:
        console.print("[yellow]time unknown[/]: no throughput measured (run benchmarks/eval_throughput.py)")
    else:
        checkpoints = len(recipe.run_phases()) + 1
        console.print(
            f"[bold]eval time[/] per checkpoint ≈ {eval_cost.fmt_duration(cost.total_seconds())} (at most "
            f"{eval_cost.fmt_duration(cost.total_seconds(typical=False))}); {checkpoints} checkpoints (phase 0 and "
            f"each phase) ≈ {eval_cost.fmt_duration((cost.total_seconds() or 0) * checkpoints)}. Throughput: "
            f"{t.prefill:,.0f} prompt tok/s, {t.decode:,.0f} generated tok/s at batch {t.batch_size}, {t.device}: "
            f"{t.how}", highlight=False)
    if any(u.judged for u in cost.units):
        console.print("judging: one judge call per AlpacaEval example, not in the time above")
    if cost.unknown:
        console.print(f"[yellow]cost unknown[/] for {', '.join(cost.unknown)} (not in {eval_cost.COSTS_FILE.name})")
