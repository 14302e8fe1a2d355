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
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.table import Table

from cft_adapters import report
from cft_adapters.analysis.stats import paired_comparison, summarize
from cft_adapters.errors import CftError, RecipeError
from cft_adapters.manifest import RunManifest, dumps_canonical, package_versions
from cft_adapters.rundir import claim
from cft_adapters.util.fs import make_temp_dir, publish_dir, write_atomic
from cft_adapters.recipe import PHASE_NAME, Recipe, _Strict, format_loc, load_recipe
from cft_adapters.util.digest import short_digest
from cft_adapters.util.plot import pyplot, save_figure

STUDY_JSON, STUDY_MD, STUDY_PNG = "study.json", "study.md", "study.png"


class StudyCondition(_Strict):
    name: str = Field(pattern=PHASE_NAME, description="Condition name (lowercase letters, digits, '_' or '-').")
    recipe: str = Field(description="Recipe file, relative to the study file.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides for this condition, after the study's.")


class Study(_Strict):
    description: str | None = Field(None, description="What the study compares.")
    output_dir: str = Field(description="Study directory; cells go to <output_dir>/cells/<condition>/seed_<s>/.")
    seeds: int | list[int] = Field(3, description="Number of seeds (0..n-1), or the seeds themselves.")
    reference: str | None = Field(None, description="Condition the Δ columns compare with (default: the first).")
    match_tokens: bool = Field(True, description="Give every condition the same token budget per phase.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides applied to every condition.")
    conditions: list[StudyCondition] = Field(min_length=1, description="The conditions, each a recipe plus overrides.")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 1:
            raise ValueError("expected at least 1 seed")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("expected a non-empty list of distinct seeds")
        return value

    @model_validator(mode="after")
    def _names(self) -> Study:
        names = [c.name for c in self.conditions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"conditions: duplicate name(s) {', '.join(dupes)}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference: '{self.reference}' is not a condition (conditions: {', '.join(names)})")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def reference_name(self) -> str:
        return self.reference or self.conditions[0].name


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: study file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError([f"{path}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: expected a mapping of study keys at the top level"])
    try:
        return Study.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = format_loc([p for p in err["loc"] if p not in ("int", "list[int]")]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                model = StudyCondition if err["loc"][0] == "conditions" else Study
                msg = f"unknown key; allowed: {', '.join(model.model_fields)}"
            elif err["type"] == "missing":
                msg = "required key is missing"
            lines.append(f"{path}: {loc}: {msg}")
        raise RecipeError(list(dict.fromkeys(lines))) from None


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------


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


def _cell_dir(study: Study, condition: str, seed: int) -> Path:
    return Path(study.output_dir) / "cells" / condition / f"seed_{seed}"


def load_cells(study: Study, study_path: Path, budgets: dict[int, dict[int, int]] | None = None) -> list[Cell]:
    """Every (seed, condition) recipe, seeds outermost (so a seed's shared phase 1 is trained once,
    by its first condition). `budgets`: seed -> {phase index: token budget}."""
    cells, problems = [], []
    for seed in study.seed_list:
        for i, cond in enumerate(study.conditions):
            recipe_path = (study_path.parent / cond.recipe)
            extra = [f"training.seed={seed}", f"output_dir={_cell_dir(study, cond.name, seed)}"]
            extra += [f"phases[{k}].training.token_budget={b}" for k, b in sorted((budgets or {}).get(seed, {}).items())]
            try:
                recipe = load_recipe(recipe_path, [*study.overrides, *cond.overrides, *extra])
            except CftError as exc:
                problems += [f"{study_path}: conditions[{i}] ({cond.name}): {p}" for p in exc.problems]
                continue
            cells.append(Cell(cond.name, seed, recipe, str(recipe_path), _cell_dir(study, cond.name, seed)))
        if problems:  # the same problems would repeat for every seed
            break
    if problems:
        raise RecipeError(problems)
    _check_comparable(cells, study_path)
    return cells


def _check_comparable(cells: list[Cell], study_path: Path) -> None:
    first = cells[0]
    problems = []
    for cell in cells:
        if cell.recipe.model != first.recipe.model:
            problems.append(f"{study_path}: conditions '{cell.condition}' and '{first.condition}' use different models; "
                            "a study compares conditions on one base model")
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

    eval_part = dumps_canonical(recipe.eval.model_dump(mode="json"))
    base = short_digest(dumps_canonical(recipe.model.model_dump(mode="json")) + eval_part)
    keys = [base]
    for k in range(1, len(recipe.run_phases()) + 1):
        keys.append(short_digest(phase_config_digest(recipe, k) + eval_part))
    return keys


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
    wanted = set(cell.recipe.eval.tasks)
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


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version()}


def _cell_result(cell: Cell, state: dict[str, Any]) -> dict[str, Any]:
    info = state.get("cells", {}).get(_state_key(cell), {})
    row: dict[str, Any] = {"condition": cell.condition, "seed": cell.seed, "run_dir": str(cell.run_dir),
                           "status": info.get("status", "pending"), "wall_seconds": info.get("wall_seconds"),
                           "shared_phases": info.get("shared", []), "phases": []}
    if not (cell.run_dir / "run.json").is_file():
        return row
    manifest = RunManifest.read(cell.run_dir)
    if cell_finished(cell, state):
        row["status"] = "done"
    elif row["status"] == "done":  # finished under other settings than the study's now
        row["status"] = "stale"
    scores = report.phase_scores(manifest, cell.recipe.eval.tasks)
    compute = 0.0
    for k, (rec, s) in enumerate(zip(manifest.phases, scores)):
        seconds = (rec.train.seconds if rec.train else 0.0) + (rec.eval_seconds or 0.0)
        compute += seconds
        row["phases"].append({
            "index": rec.index, "name": rec.name, "status": rec.status, "eval_status": rec.eval_status,
            "ea": s.ea, "ma_seen": s.ma_seen, "ma_unseen": s.ma_unseen, "units": s.units,
            "forgetting": report.forgetting(scores, k), "tokens": rec.train.tokens if rec.train else None,
            "train_seconds": rec.train.seconds if rec.train else None, "eval_seconds": rec.eval_seconds,
            "shared_from": getattr(rec, "shared_from", None),
            "metrics": {f"{t}/{m}": v for t in cell.recipe.eval.tasks for m, v in sorted((rec.eval.get(t) or {}).items())},
        })
    row["compute_seconds"] = round(compute, 1)
    return row


def _summary(values: list[float]) -> dict[str, Any] | None:
    return summarize(values).to_json() if values else None


def aggregate(study: Study, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (condition, phase): EA / MA / forgetting over seeds, and Δ vs the reference."""
    ref = study.reference_name
    rows = []

    def by_seed(condition: str, k: int, metric: str) -> dict[int, float]:
        out = {}
        for c in cells:  # finished cells only: a running, failed or stale cell is not summarised
            if c["condition"] == condition and c["status"] == "done" and k < len(c["phases"]):
                value = c["phases"][k][metric]
                if value is not None:
                    out[c["seed"]] = value
        return out

    for cond in study.conditions:
        n_phases = max((len(c["phases"]) for c in cells if c["condition"] == cond.name), default=0)
        for k in range(n_phases):
            name = next(c["phases"][k]["name"] for c in cells if c["condition"] == cond.name and k < len(c["phases"]))
            row: dict[str, Any] = {"condition": cond.name, "phase": k, "name": name}
            for metric, label in (("ea", "ea"), ("ma_seen", "ma"), ("forgetting", "forgetting")):
                values = by_seed(cond.name, k, metric)
                row[label] = _summary(list(values.values()))
                row[f"{label}_seeds"] = values
                if label != "forgetting" and cond.name != ref:
                    other = by_seed(ref, k, metric)
                    seeds = sorted(set(values) & set(other))
                    if seeds:
                        diffs = [values[s] - other[s] for s in seeds]
                        row[f"delta_{label}"] = {
                            **summarize(diffs).to_json(),
                            "test": paired_comparison([values[s] for s in seeds], [other[s] for s in seeds]).to_json(),
                        }
            # every metric lm-eval reported for the requested tasks (e.g. cft_mini_ml/langfid), over seeds
            per_metric: dict[str, list[float]] = {}
            for c in cells:
                if c["condition"] == cond.name and c["status"] == "done" and k < len(c["phases"]):
                    for key, value in c["phases"][k].get("metrics", {}).items():
                        per_metric.setdefault(key, []).append(value)
            row["metrics"] = {key: summarize(v).to_json() for key, v in per_metric.items()}
            rows.append(row)
    return rows


def write_outputs(study: Study, study_path: Path, cells: list[Cell], state: dict[str, Any], console: Console,
                  plot: bool) -> dict[str, Any]:
    out = Path(study.output_dir)
    results = [_cell_result(c, state) for c in cells]
    walls: dict[str, list[float]] = {}
    computes: dict[str, list[float]] = {}
    for r in results:
        if r.get("wall_seconds") is not None:
            walls.setdefault(r["condition"], []).append(r["wall_seconds"])
        if r.get("compute_seconds") is not None and r["status"] in ("done", "skipped"):
            computes.setdefault(r["condition"], []).append(r["compute_seconds"])
    result = {
        "study": str(study_path),
        "description": study.description,
        "machine": machine(),
        "versions": package_versions(),
        "seeds": study.seed_list,
        "reference": study.reference_name,
        "eval_tasks": cells[0].recipe.eval.tasks,
        "token_budgets": state.get("token_budgets", {}),
        "natural_tokens": state.get("natural_tokens", {}),
        "cells": results,
        "summary": aggregate(study, results),
        "wall_seconds": {c: round(sum(v), 1) for c, v in walls.items()},
        "compute_seconds_per_cell": {c: round(sum(v) / len(v), 1) for c, v in computes.items()},
        "study_wall_seconds": round(sum(sum(v) for v in walls.values()), 1),
    }
    write_atomic(out / STUDY_JSON, json.dumps(result, indent=2) + "\n")
    write_atomic(out / STUDY_MD, study_markdown(result))
    if plot:
        plot_study(result, out / STUDY_PNG)
    return result


def _cell_text(s: dict[str, Any] | None, digits: int = 3) -> str:
    if not s:
        return "-"
    if s["ci_low"] is None:
        return f"{s['mean']:.{digits}f} (n={s['n']})"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"


def _delta_text(d: dict[str, Any] | None, digits: int = 3) -> str:
    if not d:
        return "-"
    text = f"{d['mean']:+.{digits}f}"
    if d["ci_low"] is not None:
        text += f" [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"
    p = d["test"]["p_value"]
    if p is not None:
        return text + f" p={p:.3f}"
    return text + (f" (n={d['n']})" if d["n"] < 2 else " (no test: same difference every seed)")


def study_markdown(result: dict[str, Any]) -> str:
    n = len(result["seeds"])
    ref = result["reference"]
    m = result["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cpu_cores']} cores"
    lines = [
        f"# Study: {result['study']}",
        "",
        result["description"] or "",
        "",
        f"Machine: {where} ({m['platform']}). Seeds: {', '.join(map(str, result['seeds']))}. "
        f"Eval: {', '.join(f'`{t}`' for t in result['eval_tasks'])}. Reference for Δ: `{ref}`.",
        "",
        "EA: English task ability; MA: multilingual ability on the languages trained (see `cft_adapters/report.py`). "
        "Cells: mean ± std [95% CI] over seeds. Δ: paired by seed, vs the reference, with its 95% CI and the "
        "paired t-test's p.",
    ]
    if n == 1:
        lines += ["", "**n = 1: no standard deviation, interval or test.** One seed gives no spread; run more seeds "
                      "(`seeds: 3`) for intervals."]
    lines += ["", "| condition | phase | EA | MA | forgetting | ΔEA vs ref | ΔMA vs ref |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in result["summary"]:
        lines.append(f"| {row['condition']} | {row['phase']} {row['name']} | {_cell_text(row['ea'])} | {_cell_text(row['ma'])} | "
                     f"{_cell_text(row['forgetting'])} | {_delta_text(row.get('delta_ea'))} | {_delta_text(row.get('delta_ma'))} |")
    keys = sorted({key for row in result["summary"] for key in row.get("metrics", {})})
    if keys:
        lines += ["", "## Every reported metric of the requested tasks", "",
                  "Mean over seeds (± std when n > 1). EA / MA above use each member task's primary metric.", "",
                  "| condition | phase | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
        for row in result["summary"]:
            cells_ = []
            for key in keys:
                m = row.get("metrics", {}).get(key)
                cells_.append("-" if not m else f"{m['mean']:.3f}" + (f" ± {m['std']:.3f}" if m["std"] is not None else ""))
            lines.append(f"| {row['condition']} | {row['phase']} {row['name']} | " + " | ".join(cells_) + " |")
    budgets = result["token_budgets"]
    lines += ["", "## Token budgets", ""]
    if budgets:
        for seed, phases in budgets.items():
            for k, b in phases.items():
                nat = result["natural_tokens"].get(seed, {})
                lines.append(f"- seed {seed}, phase {int(k) + 1}: {b} tokens for every condition "
                             f"(untrimmed: {', '.join(f'{c} {v[int(k)]}' for c, v in nat.items())})")
    else:
        lines.append("- none needed (or match_tokens is off): the conditions' phases see the same tokens as configured.")
    lines += ["", "## Cells", "", "| condition | seed | status | phase tokens | shared | wall s | compute s |", "|---|---:|---|---|---|---:|---:|"]
    for c in result["cells"]:
        tokens = ", ".join(str(p["tokens"]) for p in c["phases"][1:]) or "-"
        lines.append(f"| {c['condition']} | {c['seed']} | {c['status']} | {tokens} | {', '.join(c['shared_phases']) or '-'} | "
                     f"{c['wall_seconds'] if c['wall_seconds'] is not None else '-'} | {c.get('compute_seconds', '-')} |")
    lines += ["", "wall s: time this study spent on the cell (shared phases are not redone). compute s: training plus "
                  "evaluation seconds of all its phases, shared ones included (what the condition costs on its own).",
              "", f"Study wall time: {result['study_wall_seconds']} s.", ""]
    return "\n".join(lines)


def summary_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"study: {result['study']} (Δ vs {result['reference']})")
    for col in ("condition", "phase", "EA", "MA", "forget", "ΔEA", "ΔMA"):
        table.add_column(col, justify="left" if col in ("condition", "phase") else "right")
    for row in result["summary"]:
        table.add_row(row["condition"], f"{row['phase']} {row['name']}", _cell_text(row["ea"]), _cell_text(row["ma"]),
                      _cell_text(row["forgetting"]), _delta_text(row.get("delta_ea")), _delta_text(row.get("delta_ma")))
    if len(result["seeds"]) == 1:
        table.caption = "n=1: no interval (one seed gives no spread); use more seeds"
    return table


def plot_study(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    conditions = list(dict.fromkeys(r["condition"] for r in result["summary"]))
    phases = sorted({r["phase"] for r in result["summary"]})
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(conditions) + 3), 4), sharey=False)
    width = 0.8 / max(1, len(phases))
    for ax, key, title in ((axes[0], "ea", "English task ability (EA)"), (axes[1], "ma", "multilingual ability (MA)")):
        for j, k in enumerate(phases):
            xs, ys, lo, hi = [], [], [], []
            for i, cond in enumerate(conditions):
                row = next((r for r in result["summary"] if r["condition"] == cond and r["phase"] == k), None)
                if row is None or not row[key]:
                    continue
                s = row[key]
                xs.append(i + (j - (len(phases) - 1) / 2) * width)
                ys.append(s["mean"])
                lo.append(s["mean"] - s["ci_low"] if s["ci_low"] is not None else 0.0)
                hi.append(s["ci_high"] - s["mean"] if s["ci_high"] is not None else 0.0)
            names = {r["name"] for r in result["summary"] if r["phase"] == k}
            errors = [lo, hi] if any(lo) or any(hi) else None
            ax.bar(xs, ys, width=width, yerr=errors, capsize=3,
                   label=f"phase {k} {names.pop()}" if len(names) == 1 else f"phase {k}")
        ax.set_xticks(range(len(conditions)), conditions, rotation=20, ha="right")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    n = len(result["seeds"])
    fig.suptitle(f"{Path(result['study']).name}: mean over {n} seed(s)" + ("; error bars: 95% CI" if n > 1 else "; n=1, no CI"))
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


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
