"""A study's cells (one run directory per condition and seed), and the phases one cell may take
from another instead of retraining them (same phase key: config digest and evaluation)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cft_adapters.errors import CftError, RecipeError
from cft_adapters.manifest import RunManifest, dumps_canonical, package_versions
from cft_adapters.recipe import Recipe, load_recipe
from cft_adapters.study_config import Study
from cft_adapters.util.digest import short_digest
from cft_adapters.util.fs import make_temp_dir, publish_dir


@dataclass
class Cell:
    condition: str
    seed: int
    recipe: Recipe
    recipe_path: str
    run_dir: Path
    shared: list[str] = field(default_factory=list)
    status: str = "pending"  # pending | done | skipped | failed
    wall_seconds: float | None = None
    overrides: list[str] = field(default_factory=list)  # what `cft-train recipe_path *overrides` needs to be this cell


def _cell_dir(study: Study, condition: str, seed: int) -> Path:
    return Path(study.output_dir) / "cells" / condition / f"seed_{seed}"


def _budget_overrides(recipe: Recipe, budgets: dict[str, int]) -> list[str]:
    """The overrides that give each of the recipe's phases its budget, by phase name ('mixed': the
    mixed baseline's one phase)."""
    if recipe.mixed_baseline:
        return [f"training.token_budget={budgets['mixed']}"] if "mixed" in budgets else []
    out = []
    for k, phase in enumerate(recipe.phases):
        budget = budgets.get(phase.name)
        if budget is not None:
            out.append(f"phases[{k}].training.token_budget={budget}")
    return out


def load_cells(study: Study, study_path: Path, budgets: dict[int, dict[str, dict[str, int]]] | None = None) -> list[Cell]:
    """Every (seed, condition) recipe, seeds outermost (so a seed's shared phase 1 is trained once,
    by its first condition). `budgets`: seed -> {condition: {phase name: token budget}}."""
    cells, problems = [], []
    for seed in study.seed_list:
        for i, cond in enumerate(study.conditions):
            recipe_path = (study_path.parent / cond.recipe)
            extra = [f"training.seed={seed}", f"output_dir={_cell_dir(study, cond.name, seed)}"]
            try:
                overrides = [*study.overrides, *cond.overrides, *extra]
                recipe = load_recipe(recipe_path, overrides)
                wanted = (budgets or {}).get(seed, {}).get(cond.name, {})
                if wanted:
                    overrides += _budget_overrides(recipe, wanted)
                    recipe = load_recipe(recipe_path, overrides)
            except CftError as exc:
                problems += [f"{study_path}: conditions[{i}] ({cond.name}): {p}" for p in exc.problems]
                continue
            cells.append(Cell(cond.name, seed, recipe, str(recipe_path), _cell_dir(study, cond.name, seed),
                              overrides=overrides))
        if problems:  # the same problems would repeat for every seed
            break
    if problems:
        raise RecipeError(problems)
    _check_comparable(cells, study_path)
    from cft_adapters.tasks_path import use_include_paths

    use_include_paths(cells[0].recipe.eval.include_path)  # one evaluation for every cell (_check_comparable)
    return cells


def _check_comparable(cells: list[Cell], study_path: Path) -> None:
    first = cells[0]
    problems = []
    for cell in cells:
        if cell.recipe.eval != first.recipe.eval:
            problems.append(f"{study_path}: conditions '{cell.condition}' and '{first.condition}' evaluate differently "
                            "(eval.*); the scores would not be comparable")
        if not cell.recipe.eval.tasks:
            problems.append(f"{study_path}: condition '{cell.condition}': eval.tasks is empty; a study needs scores")
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))


def phase_keys(recipe: Recipe) -> list[str]:
    """What makes phase k's checkpoint and scores reusable by another cell: phase 0 (the base) by the
    model and the evaluation; phase k >= 1 by its config_digest and the evaluation."""
    from cft_adapters.reconcile import phase_config_digest

    eval_part = dumps_canonical(recipe.eval.keyed_dump())
    base = short_digest(dumps_canonical(recipe.model.model_dump(mode="json")) + eval_part)
    keys = [base]
    for k in range(1, len(recipe.run_phases()) + 1):
        keys.append(short_digest(phase_config_digest(recipe, k) + eval_part))
    return keys


def planned_donor(cell: Cell, earlier: list[Cell]) -> tuple[Cell | None, int]:
    """The earlier cell whose phases this one would reuse (the longest run of equal phase keys,
    counting phase 0), and how many; (None, 0) when none shares even the base. Read from the
    recipes, before anything ran: the plan the dry run prints and the launchers wait on."""
    keys = phase_keys(cell.recipe)
    best, best_n = None, 0
    for donor in earlier:
        dk = phase_keys(donor.recipe)
        n = next((k for k in range(min(len(dk), len(keys))) if dk[k] != keys[k]), min(len(dk), len(keys)))
        if n > best_n:
            best, best_n = donor, n
    return best, best_n


def read_state(path: Path) -> dict[str, Any]:
    """A study's cells.json ({} before the first run). A damaged one is an error that names it and
    says what to do, never a traceback."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("expected a JSON object")
        cells = state.get("cells", {})
        if not isinstance(cells, dict) or not all(isinstance(v, dict) for v in cells.values()):
            raise ValueError("'cells': expected an object of cell records")
        _read_budgets(state.get("token_budgets", {}))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CftError(f"{path}: the study's state is unreadable ({exc}). Restore it, or move it away: the study "
                       "then runs each cell's cft-train again, which keeps the phases its run.json says are done") from None
    return state


def write_state(path: Path, state: dict[str, Any]) -> None:
    """cells.json, written whole (a reader sees the old file or the new one)."""
    from cft_adapters.util.fs import write_atomic

    write_atomic(path, json.dumps(state, indent=2) + "\n")


def _read_budgets(saved: dict[str, Any]) -> dict[int, dict[str, dict[str, int]]]:
    """cells.json's token_budgets. Before budgets were per condition they were {phase index: budget}
    for every condition: those read as budgets for no condition, so such cells count as stale."""
    return {int(s): {c: {n: int(b) for n, b in ph.items()} for c, ph in conds.items() if isinstance(ph, dict)}
            for s, conds in saved.items()}


def _stale(cell: Cell, state: dict[str, Any], console: Any) -> bool:
    """A cell that ran under other settings than the study's now: kept, never summarised (marked in `state`)."""
    key = _state_key(cell)
    recorded = state["cells"].get(key, {}).get("keys")
    if recorded is None or recorded == phase_keys(cell.recipe) or not (cell.run_dir / "run.json").is_file():
        return False
    state["cells"][key]["status"] = "stale"
    console.print(f"[red]cell {key}[/]: it ran under other settings than the study's now (model, adapter, "
                  f"phases, token budget or evaluation changed). Its results are kept but not summarised; "
                  f"use a new output_dir, or remove {cell.run_dir} to rerun it.")
    return True


def _finished_phases(manifest: RunManifest, keys_of_donor: list[str], keys: list[str]) -> int:
    """How many leading phases (counting phase 0) of the donor this cell can reuse."""
    n = 0
    for k, rec in enumerate(manifest.phases):
        if k >= len(keys) or keys_of_donor[k] != keys[k] or rec.status != "done" or rec.eval_status != "done":
            break
        n += 1
    return n


def _state_key(cell: Cell) -> str:
    return f"{cell.condition}/seed_{cell.seed}"


def cell_finished(cell: Cell, state: dict[str, Any]) -> bool:
    """Every phase trained and scored, under exactly the settings the study asks for now: the keys
    recorded when the cell ran (digests of model, adapter, phases, budgets and evaluation) must equal
    today's. A cell of an edited study is never reported from stale results."""
    path = cell.run_dir / "run.json"
    recorded = state.get("cells", {}).get(_state_key(cell), {}).get("keys")
    if not path.is_file() or recorded != phase_keys(cell.recipe):
        return False
    try:
        manifest = RunManifest.read(cell.run_dir)
    except ValueError:
        return False
    from cft_adapters.evaluation import scored_tasks

    wanted = set(scored_tasks(cell.recipe.eval))  # an AlpacaEval member without a judge is never scored
    return len(manifest.phases) == len(cell.recipe.run_phases()) + 1 and all(
        r.status == "done" and r.eval_status == "done" and wanted <= set(r.eval_tasks) for r in manifest.phases
    )


def share_into(cell: Cell, donors: list[Cell], state: dict[str, Any]) -> list[str]:
    """Copy the longest run of reusable finished phases from a donor cell into a new cell directory.
    A donor's phases are matched by the keys recorded when it ran (not by its recipe today).
    Everything is assembled in a temporary folder and renamed into place in one step."""
    if cell.run_dir.exists():
        return []
    keys = phase_keys(cell.recipe)
    best, best_n = None, 0
    for donor in donors:
        donor_keys = state.get("cells", {}).get(_state_key(donor), {}).get("keys")
        if not donor_keys or not (donor.run_dir / "run.json").is_file():
            continue
        manifest = RunManifest.read(donor.run_dir)
        n = _finished_phases(manifest, donor_keys, keys)
        if n > best_n:
            best, best_n = (donor, manifest), n
    if best is None:
        return []
    donor, manifest = best
    tmp = make_temp_dir(cell.run_dir.parent, f".{cell.run_dir.name}.share-")
    records, shared = [], []
    for rec in manifest.phases[:best_n]:
        src = donor.run_dir / rec.dirname
        if src.is_dir():
            shutil.copytree(src, tmp / rec.dirname, ignore=shutil.ignore_patterns("trainer", ".adapter.tmp-*"))
        copy = rec.model_copy(deep=True)
        copy.shared_from = os.path.relpath(src, cell.run_dir)  # type: ignore[attr-defined]
        records.append(copy)
        shared.append(rec.dirname)
    RunManifest(
        recipe=cell.recipe_path, base_model=manifest.base_model, base_model_path=manifest.base_model_path,
        seed=cell.recipe.training.seed, eval_base_precision=manifest.eval_base_precision,
        versions=package_versions(), phases=records,
    ).write(tmp)
    publish_dir(tmp, cell.run_dir)
    return shared


# ---------------------------------------------------------------------------------------------
# token budgets
# ---------------------------------------------------------------------------------------------
