"""A study's outputs: per-cell results, the summary over seeds (mean, 95% interval, paired Δ vs the
reference condition), and study.json / study.md / study.png, rewritten atomically after every cell."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cft_adapters import report
from cft_adapters.analysis.stats import paired_comparison, summarize
from cft_adapters.manifest import RunManifest, package_versions
from cft_adapters.study_cells import Cell, _state_key, cell_finished
from cft_adapters.study_config import Study
from cft_adapters.util.fs import write_atomic
from cft_adapters.util.plot import pyplot, save_figure

STUDY_JSON, STUDY_MD, STUDY_PNG = "study.json", "study.md", "study.png"


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
    if info.get("error") and info.get("status") != "done":
        row["error"] = info["error"]
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
            "replay_generation_seconds": ((rec.replay or {}).get("generation") or {}).get("seconds"),
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


def time_breakdown(results: list[dict[str, Any]]) -> dict[str, float]:
    """Where the study's time went, over the phases it ran itself (shared phases were copied, not
    redone): training, evaluation, generating replay answers, and the rest of the cells' wall time
    (loading models, placement, copying shared phases, writing results)."""
    train = evaluation = generation = wall = 0.0
    for cell in results:
        if cell.get("wall_seconds") is None:
            continue
        wall += cell["wall_seconds"]
        for ph in cell["phases"]:
            if ph.get("shared_from") is None:
                train += ph.get("train_seconds") or 0.0
                evaluation += ph.get("eval_seconds") or 0.0
                generation += ph.get("replay_generation_seconds") or 0.0
    return {"cells_wall": round(wall, 1), "training": round(train, 1), "evaluation": round(evaluation, 1),
            "replay_generation": round(generation, 1), "other": round(wall - train - evaluation - generation, 1)}


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
        "time_breakdown": time_breakdown(results),
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
        for seed, conds in budgets.items():
            for cond, phases in conds.items():
                for name, b in phases.items():
                    untrimmed = result["natural_tokens"].get(seed, {}).get(cond, {}).get(name, "?")
                    how = " (the phased runs' total)" if name == "mixed" else ""
                    lines.append(f"- seed {seed}, {cond}, phase '{name}': {b} tokens{how}; untrimmed {untrimmed}")
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
    failed = [c for c in result["cells"] if c.get("error")]
    if failed:
        lines += ["## Failed cells", ""] + [f"- {c['condition']} / seed {c['seed']}: {c['error']}" for c in failed] + [""]
    t = result.get("time_breakdown")
    if t and t["cells_wall"]:
        share = {k: f"{v} s ({100 * v / t['cells_wall']:.0f}%)" for k, v in t.items() if k != "cells_wall"}
        lines += ["## Where the time went", "",
                  f"Over the {t['cells_wall']} s the cells took, counting only the phases this study ran itself: "
                  f"training {share['training']}, evaluation {share['evaluation']}, generating replay answers "
                  f"{share['replay_generation']}, and the rest {share['other']} (loading models, choosing "
                  "placements, copying shared phases, writing results).", ""]
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
    if axes[0].get_legend_handles_labels()[0]:  # nothing scored yet (every cell failed): no legend
        axes[0].legend(fontsize=8)
    n = len(result["seeds"])
    fig.suptitle(f"{Path(result['study']).name}: mean over {n} seed(s)" + ("; error bars: 95% CI" if n > 1 else "; n=1, no CI"))
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
