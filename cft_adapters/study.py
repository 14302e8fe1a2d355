"""`cft-study STUDY.yaml`: conditions x seeds of cft-train runs, summarised with confidence intervals.

A study names conditions (a recipe plus overrides) and seeds. Every (condition, seed) *cell* is an
ordinary run directory, `<output_dir>/cells/<condition>/seed_<s>/`, written by the phase runner, so
`cft-eval` and `cft-analyze drift` work on it as on any run.

- **Shared phases.** Before a cell starts, the finished phases of an earlier cell that it would
  reproduce exactly (same `config_digest`: model, adapter, phases 1..k, seed) are copied into it,
  with their evaluation, instead of being retrained. Phase 0 (the base's scores) is shared by
  every cell with the same model and evaluation. A copied record names its origin in `shared_from`.
- **Token-matched budgets.** With `match_tokens` (the default), a phase whose conditions would see
  different numbers of tokens (data x epochs, counted with the model's tokenizer and chat template)
  gets `training.token_budget` = the smallest of them, in every condition. Phases whose counts are
  already equal are left alone, so a shared phase 1 stays shareable.
- **Statistics.** EA / MA per condition and phase (see `report.py`) over seeds: mean, standard
  deviation and a 95% interval (`analysis.stats.summarize`: t for n < 20, BCa bootstrap from 20; none
  for n = 1, said so). Δ vs the reference condition is paired by seed (`paired_comparison`).
- **Resumable.** Finished cells are skipped; an interrupted cell resumes like any cft-train run.

Outputs: `study.json`, `study.md`, `study.png` in the output directory, rewritten after every cell.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cft_adapters.errors import CftError
from cft_adapters.recipe import Recipe
from cft_adapters.rundir import claim
from cft_adapters.util.fs import write_atomic
from cft_adapters.study_cells import Cell, _state_key, cell_finished, load_cells, phase_keys, share_into  # noqa: F401  (re-exported)
from cft_adapters.study_config import Study, StudyCondition, load_study  # noqa: F401  (re-exported)
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


def token_budgets(cells: list[Cell], console: Console) -> tuple[dict[int, dict[int, int]], dict[str, Any]]:
    """seed -> {phase index: budget} for the phases whose conditions differ in tokens."""
    from cft_adapters import modeling

    counts = {len(c.recipe.run_phases()) for c in cells}
    if len(counts) > 1:
        raise CftError("match_tokens: the conditions have different numbers of phases (a mixed baseline?); token "
                       "matching goes phase by phase. Set match_tokens: false and give training.token_budget "
                       "overrides instead.")
    model = cells[0].recipe.model
    tokenizer = modeling.load_tokenizer(model, modeling.resolve_model_path(model))
    budgets: dict[int, dict[int, int]] = {}
    natural: dict[str, Any] = {}
    for seed in sorted({c.seed for c in cells}):
        per_cond = {c.condition: phase_tokens(c.recipe, tokenizer) for c in cells if c.seed == seed}
        natural[str(seed)] = per_cond
        for k in range(next(iter(counts))):
            values = {v[k] for v in per_cond.values()}
            if len(values) > 1:
                budgets.setdefault(seed, {})[k] = min(values)
    for seed, phases in budgets.items():
        for k, budget in phases.items():
            console.print(f"seed {seed}: phase {k + 1} token budget {budget} (smallest of "
                          f"{', '.join(f'{c} {v[k]}' for c, v in natural[str(seed)].items())})")
    return budgets, natural


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def run_study(study_path: str | Path, console: Console, report_only: bool = False) -> bool:
    """Run (or resume) every cell, then write the summary. Returns False when a cell failed. One
    process owns a study's output folder (its cells.json), as one owns a run directory."""
    study_path = Path(study_path)
    study = load_study(study_path)
    lock = claim(Path(study.output_dir), str(study_path))
    try:
        return _run_study(study, study_path, console, report_only)
    finally:
        lock.release()


def _run_study(study: Study, study_path: Path, console: Console, report_only: bool) -> bool:
    cells = load_cells(study, study_path)
    out = Path(study.output_dir)
    state_file = out / "cells.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    budgets: dict[int, dict[int, int]] = {}
    natural: dict[str, Any] = state.get("natural_tokens", {})
    if study.match_tokens:
        if report_only:
            saved = state.get("token_budgets", {})
            budgets = {int(s): {int(k): int(b) for k, b in ph.items()} for s, ph in saved.items()}
        else:  # recomputed every time (seconds): a changed study gets new budgets, never stale ones
            budgets, natural = token_budgets(cells, console)
        cells = load_cells(study, study_path, budgets)
    state.update(token_budgets={str(s): {str(k): b for k, b in ph.items()} for s, ph in budgets.items()},
                 natural_tokens=natural)
    state.setdefault("cells", {})
    ok = True
    if not report_only:
        write_atomic(state_file, json.dumps(state, indent=2) + "\n")
        for i, cell in enumerate(cells):
            key = _state_key(cell)
            if cell_finished(cell, state):
                cell.status = "skipped"
                state["cells"][key]["status"] = "done"  # e.g. a failed evaluation since retried with cft-eval
                console.print(f"[bold]cell {i + 1}/{len(cells)}[/] {key}: finished, skipped")
                continue
            recorded = state["cells"].get(key, {}).get("keys")
            if recorded is not None and recorded != phase_keys(cell.recipe) and (cell.run_dir / "run.json").is_file():
                cell.status, ok = "stale", False
                state["cells"][key]["status"] = "stale"
                console.print(f"[red]cell {key}[/]: it ran under other settings than the study's now (model, adapter, "
                              f"phases, token budget or evaluation changed). Its results are kept but not summarised; "
                              f"use a new output_dir, or remove {cell.run_dir} to rerun it.")
                continue
            cell.shared = share_into(cell, cells[:i], state)
            if cell.shared:
                console.print(f"cell {key}: reusing {', '.join(cell.shared)} from an identical earlier cell")
            console.rule(f"cell {i + 1}/{len(cells)}: {key}")
            started = time.perf_counter()
            try:
                _run_cell(cell, console)
                cell.status = "done"
            except CftError as exc:
                cell.status = "failed"
                ok = False
                for line in exc.problems:
                    console.print(f"[red]cell {key} failed[/]: {line}", markup=True, highlight=False)
            cell.wall_seconds = round(time.perf_counter() - started, 1)
            state["cells"][key] = {"status": cell.status, "wall_seconds": cell.wall_seconds, "shared": cell.shared,
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "keys": phase_keys(cell.recipe)}
            write_atomic(state_file, json.dumps(state, indent=2) + "\n")
            write_outputs(study, study_path, cells, state, console, plot=False)
    result = write_outputs(study, study_path, cells, state, console, plot=True)
    console.print(summary_table(result))
    console.print(f"study: {out / STUDY_MD}, {out / STUDY_JSON}, {out / STUDY_PNG}")
    return ok and not any(c["status"] in ("failed", "stale") for c in result["cells"])


def _run_cell(cell: Cell, console: Console) -> None:
    from cft_adapters.phases import PhaseRunner

    runner = PhaseRunner(cell.recipe, cell.recipe_path, console)
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


def dry_run(study_path: str | Path, console: Console) -> None:
    """The cells, which phases they would share, and where they go; no model is loaded."""
    study_path = Path(study_path)
    study = load_study(study_path)
    state_file = Path(study.output_dir) / "cells.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    saved = state.get("token_budgets", {}) if study.match_tokens else {}
    cells = load_cells(study, study_path, {int(s): {int(k): int(b) for k, b in ph.items()} for s, ph in saved.items()})
    table = Table(title=f"study {study_path}: {len(study.conditions)} condition(s) x {len(study.seed_list)} seed(s)")
    for col in ("cell", "recipe", "phases", "would reuse", "status"):
        table.add_column(col, overflow="fold")
    for i, cell in enumerate(cells):
        keys = phase_keys(cell.recipe)
        reuse = 0
        for donor in cells[:i]:
            dk = phase_keys(donor.recipe)
            reuse = max(reuse, next((k for k in range(min(len(dk), len(keys))) if dk[k] != keys[k]), min(len(dk), len(keys))))
        names = ["base"] + [p.name for p in cell.recipe.run_phases()]
        table.add_row(_state_key(cell), cell.recipe_path, " → ".join(names),
                      ", ".join(names[:reuse]) or "-", "finished" if cell_finished(cell, state) else "to run")
    console.print(table)
    console.print(f"token matching: {'on (budgets are computed with the tokenizer when the study starts)' if study.match_tokens else 'off'}")
    console.print(f"outputs: {Path(study.output_dir) / STUDY_MD}, {STUDY_JSON}, {STUDY_PNG}")
