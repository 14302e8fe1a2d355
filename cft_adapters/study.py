"""`cft-study STUDY.yaml`: conditions x seeds of cft-train runs, summarised with confidence intervals.

A study names conditions (a recipe plus overrides) and seeds. Every (condition, seed) *cell* is an
ordinary run directory, `<output_dir>/cells/<condition>/seed_<s>/`, written by the phase runner, so
`cft-eval` and `cft-analyze drift` work on it as on any run.

- **Shared phases.** Before a cell starts, the finished phases of an earlier cell that it would
  reproduce exactly (same `config_digest`: model, adapter, phases 1..k, seed) are copied into it,
  with their evaluation, instead of being retrained. Phase 0 (the base's scores) is shared by
  every cell with the same model and evaluation. A copied record names its origin in `shared_from`.
- **Token-matched budgets.** With `match_tokens` (the default), phases are matched by name across
  conditions; a phase whose conditions would see different numbers of tokens (data x epochs, counted
  with each condition's own tokenizer and chat template) gets `training.token_budget` = the smallest
  of them, in every condition. Phases whose counts are already equal are left alone, so a shared
  phase 1 stays shareable. A mixed baseline gets the total of the multi-phase runs.
- **Base models.** Conditions may start from different base models (e.g. both of the paper's);
  each is compared with the others on the same evaluation.
- **Statistics.** EA / MA per condition and phase (see `report.py`) over seeds: mean, standard
  deviation and a 95% interval (`analysis.stats.summarize`: t for n < 20, BCa bootstrap from 20; none
  for n = 1, said so). Δ vs the reference condition is paired by seed (`paired_comparison`).
- **Resumable.** Finished cells are skipped; an interrupted cell resumes like any cft-train run.

Outputs: `study.json`, `study.md`, `study.png` in the output directory, rewritten after every cell.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cft_adapters.errors import CftError
from cft_adapters.recipe import Recipe
from cft_adapters.rundir import claim
from cft_adapters.study_cells import (  # noqa: F401  (re-exported)
    Cell, _read_budgets, _stale, _state_key, cell_finished, load_cells, phase_keys, planned_donor, read_state, share_into,
    write_state,
)
from cft_adapters.study_config import LauncherSettings, Study, StudyCondition, load_study  # noqa: F401  (re-exported)
from cft_adapters.study_summary import STUDY_JSON, STUDY_MD, STUDY_PNG, aggregate, summary_table, write_outputs  # noqa: F401  (re-exported)


def phase_tokens(recipe: Recipe, tokenizer: Any) -> list[int]:
    """Tokens each phase would train on (chat-templated examples x epochs, truncated to max_length)."""
    from cft_adapters.data import load_phase_data

    out = []
    for i, phase in enumerate(recipe.run_phases()):
        training = recipe.phase_training(i) if not recipe.mixed_baseline else recipe.training
        data = load_phase_data(phase, i, training.seed)
        lengths = [
            min(len(tokenizer.apply_chat_template(list(p) + list(c), tokenize=True, return_dict=False)), training.max_length)
            for p, c in zip(data.dataset["prompt"], data.dataset["completion"])
        ]
        if training.max_steps:
            per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps
            total = round(sum(lengths) / len(lengths) * per_step * training.max_steps)
        else:
            total = round(sum(lengths) * training.num_train_epochs)
        out.append(min(total, training.token_budget) if training.token_budget else total)
    return out


def token_budgets(cells: list[Cell], console: Console) -> tuple[dict[int, dict[str, dict[str, int]]], dict[str, Any]]:
    """seed -> {condition: {phase name: budget}}, for the phases that need one. Conditions are
    matched with the others on the same base model (a token is its tokenizer's), phases by name (the
    Instruct pair's one 'multilingual' phase with the similar pair's second): a phase whose
    conditions would see different token counts is cut to the smallest. A mixed baseline's one phase
    ('mixed') gets the total of the multi-phase runs on its base (the smallest such total), so it
    trains on as many tokens as they do."""
    from cft_adapters import modeling

    tokenizers: dict[str, Any] = {}

    def tokenizer_of(cell: Cell) -> Any:
        key = cell.recipe.model.model_dump_json()
        if key not in tokenizers:
            model = cell.recipe.model
            tokenizers[key] = modeling.load_tokenizer(model, modeling.resolve_model_path(model))
        return tokenizers[key]

    budgets: dict[int, dict[str, dict[str, int]]] = {}
    natural: dict[str, Any] = {}
    for seed in sorted({c.seed for c in cells}):
        seed_cells = [c for c in cells if c.seed == seed]
        per_cond = {c.condition: dict(zip([p.name for p in c.recipe.run_phases()], phase_tokens(c.recipe, tokenizer_of(c))))
                    for c in seed_cells}
        natural[str(seed)] = per_cond
        for model in dict.fromkeys(c.recipe.model.model_dump_json() for c in seed_cells):
            group = [c for c in seed_cells if c.recipe.model.model_dump_json() == model]
            _match(group, per_cond, budgets.setdefault(seed, {}), seed, console)
        if not budgets[seed]:
            del budgets[seed]
    for seed, conds in budgets.items():
        for cond, phases in conds.items():
            for name, budget in phases.items():
                how = "the phased runs' total" if name == "mixed" else "the smallest on this base"
                console.print(f"seed {seed}: {cond} phase '{name}' token budget {budget} ({how}; untrimmed "
                              f"{natural[str(seed)][cond][name]})")
    return budgets, natural


def _match(group: list[Cell], per_cond: dict[str, dict[str, int]], out: dict[str, dict[str, int]], seed: int,
           console: Console) -> None:
    """Budgets for the conditions of one base model (see token_budgets), into `out`."""
    mixed = [c.condition for c in group if c.recipe.mixed_baseline]
    phased = {c.condition: per_cond[c.condition] for c in group if not c.recipe.mixed_baseline}
    matched: dict[str, int] = {}
    for name in dict.fromkeys(n for phases in phased.values() for n in phases):
        values = {phases[name] for phases in phased.values() if name in phases}
        if len(values) > 1:
            matched[name] = min(values)
    for cond, phases in phased.items():
        own = {name: b for name, b in matched.items() if phases.get(name, 0) > b}  # the smallest is left alone
        if own:
            out[cond] = own
    if not mixed:
        return
    totals = [sum(matched.get(n, t) for n, t in phases.items()) for phases in phased.values() if len(phases) > 1]
    if not totals:
        raise CftError(f"match_tokens: the mixed baseline ({', '.join(mixed)}) is matched to the multi-phase runs on its "
                       "base model, and this study has none; set match_tokens: false and give training.token_budget")
    target = min(totals)
    for cond in mixed:
        have = per_cond[cond]["mixed"]
        if have < target:
            console.print(f"[yellow]seed {seed}: {cond} has {have} tokens, fewer than the phased runs' {target}; it "
                          f"trains on all of them (not token-matched)[/]")
        out[cond] = {"mixed": min(have, target)}


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def run_study(study_path: str | Path, console: Console, report_only: bool = False,
              launcher: LauncherSettings | None = None) -> bool:
    """Run (or resume) every cell, then write the summary. Returns False when a cell failed. One
    process owns a study's output folder (its cells.json), as one owns a run directory. `launcher`
    (default: the study file's) says whether cells run here one by one or as submitit jobs."""
    study_path = Path(study_path)
    study = load_study(study_path)
    lock = claim(Path(study.output_dir), str(study_path))
    try:
        return _run_study(study, study_path, console, report_only, launcher or study.launcher)
    finally:
        lock.release()


def _run_study(study: Study, study_path: Path, console: Console, report_only: bool,
               launcher: LauncherSettings) -> bool:
    cells = load_cells(study, study_path)
    out = Path(study.output_dir)
    state_file = out / "cells.json"
    state = read_state(state_file)
    budgets: dict[int, dict[str, dict[str, int]]] = {}
    natural: dict[str, Any] = state.get("natural_tokens", {})
    if study.match_tokens:
        if report_only:
            saved = state.get("token_budgets", {})
            budgets = _read_budgets(saved)
        else:  # recomputed every time (seconds): a changed study gets new budgets, never stale ones
            budgets, natural = token_budgets(cells, console)
        cells = load_cells(study, study_path, budgets)
    state.update(token_budgets={str(s): dict(ph) for s, ph in budgets.items()},
                 natural_tokens=natural)
    state.setdefault("cells", {})
    ok = True
    if not report_only:
        write_state(state_file, state)
        if launcher.kind == "sequential":
            ok = _run_here(study, study_path, cells, state, state_file, console)
        else:
            from cft_adapters.study_launch import run_jobs

            ok = run_jobs(study, study_path, cells, state, state_file, console, launcher)
    result = write_outputs(study, study_path, cells, state, console, plot=True)
    console.print(summary_table(result))
    console.print(f"study: {out / STUDY_MD}, {out / STUDY_JSON}, {out / STUDY_PNG}")
    return ok and not any(c["status"] in ("failed", "stale") for c in result["cells"])


def _run_here(study: Study, study_path: Path, cells: list[Cell], state: dict[str, Any], state_file: Path,
              console: Console) -> bool:
    """The sequential launcher: every cell in this process, one after another; the loaded base
    passes from one cell to the next (phases.BasePool) instead of being loaded again."""
    from cft_adapters.phases import BasePool

    pool = BasePool()
    ok = True
    for i, cell in enumerate(cells):
        key = _state_key(cell)
        if cell_finished(cell, state):
            cell.status = "skipped"
            state["cells"][key]["status"] = "done"  # e.g. a failed evaluation since retried with cft-eval
            console.print(f"[bold]cell {i + 1}/{len(cells)}[/] {key}: finished, skipped")
            continue
        if _stale(cell, state, console):
            cell.status, ok = "stale", False
            continue
        from cft_adapters.study_launch import live_job

        job = live_job(cell, state)
        if job is not None:  # a local / Slurm job of an earlier launcher is at work on it, or queued for it
            cell.status, ok = "failed", False
            state["cells"].setdefault(key, {}).update(status="failed", error=f"a job of another launcher is at work on it ({job})")
            console.print(f"[red]cell {key}[/]: {job} is at work on it (or queued); rerun with the launcher that "
                          "started it, or once it ended")
            continue
        cell.shared = share_into(cell, cells[:i], state)
        if cell.shared:
            console.print(f"cell {key}: reusing {', '.join(cell.shared)} from an identical earlier cell")
        console.rule(f"cell {i + 1}/{len(cells)}: {key}")
        started = time.perf_counter()
        error = None
        try:
            _run_cell(cell, console, pool)
            cell.status = "done"
        except CftError as exc:
            cell.status, error = "failed", " | ".join(exc.problems)
            ok = False
            for line in exc.problems:
                console.print(f"[red]cell {key} failed[/]: {line}", markup=True, highlight=False)
        cell.wall_seconds = round(time.perf_counter() - started, 1)
        state["cells"][key] = {"status": cell.status, "wall_seconds": cell.wall_seconds, "shared": cell.shared,
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "keys": phase_keys(cell.recipe),
                               **({"error": error} if error else {})}
        write_state(state_file, state)
        write_outputs(study, study_path, cells, state, console, plot=False)
    return ok


def _run_cell(cell: Cell, console: Console, base_pool: Any = None) -> None:
    from cft_adapters.phases import PhaseRunner

    runner = PhaseRunner(cell.recipe, cell.recipe_path, console, base_pool=base_pool)
    try:
        manifest = runner.run()
    finally:
        del runner
        gc.collect()
    failed = [r.name for r in manifest.phases if r.eval_status == "failed"]
    if failed:
        raise CftError(f"evaluation failed for {', '.join(failed)} (see run.json; retry with cft-eval {cell.run_dir})")


# ---------------------------------------------------------------------------------------------
# aggregation and outputs
# ---------------------------------------------------------------------------------------------


def dry_run(study_path: str | Path, console: Console, launcher: LauncherSettings | None = None) -> None:
    """The cells, which phases they would share, and where they go; no model is loaded."""
    study_path = Path(study_path)
    study = load_study(study_path)
    state_file = Path(study.output_dir) / "cells.json"
    state = read_state(state_file)
    saved = state.get("token_budgets", {}) if study.match_tokens else {}
    cells = load_cells(study, study_path, _read_budgets(saved))
    table = Table(title=f"study {study_path}: {len(study.conditions)} condition(s) x {len(study.seed_list)} seed(s)")
    for col in ("cell", "recipe", "phases", "would reuse", "status"):
        table.add_column(col, overflow="fold")
    for i, cell in enumerate(cells):
        _, reuse = planned_donor(cell, cells[:i])
        names = ["base"] + [p.name for p in cell.recipe.run_phases()]
        table.add_row(_state_key(cell), cell.recipe_path, " → ".join(names),
                      ", ".join(names[:reuse]) or "-", "finished" if cell_finished(cell, state) else "to run")
    console.print(table)
    launcher = launcher or study.launcher
    if launcher.kind == "sequential":
        console.print("launcher: sequential (one cell after another in this process)")
    else:
        from cft_adapters.study_launch import dependencies

        waits = [f"{k} after {d}" for k, d in dependencies(cells).items() if d]
        console.print(f"launcher: {launcher.kind}, {launcher.max_parallel} at a time; "
                      f"waits: {', '.join(waits) or 'none'}")
    console.print(f"token matching: {'on (budgets are computed with the tokenizer when the study starts)' if study.match_tokens else 'off'}")
    console.print(f"outputs: {Path(study.output_dir) / STUDY_MD}, {STUDY_JSON}, {STUDY_PNG}")
