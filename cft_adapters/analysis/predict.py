"""`cft-analyze predict STUDY_DIR`: fit phase-2 forgetting against the similarity of the two phases.

One point per finished cell of a study. The point is the DES between the cell's last two phases'
instructions (similarity.py; computed once per pair of phase data) and the cell's forgetting, the
drop in EA (the paper's aggregate, report.py) from the phase before the last to the last. The fit is
ordinary least squares, forgetting = intercept + slope · DES (scipy.stats.linregress). The slope gets
a 95% t interval (n − 2 degrees of freedom), and R² says how much the fit explains. The model file
(<study_dir>/forgetting_model.json) keeps the fit, the encoder and the points.

Cells whose last phase has a mitigation (replay, or adapter placement) are left out of the fit and
listed as excluded: a mitigation changes forgetting at the same similarity.

It is honest about its size. The seeds of a condition share one DES, so a study of k conditions gives
only k distinct x values: with fewer than 5, the result is labelled a sketch. MPD is not used: it is
measured per recipe, not per cell.

`cft-train` reads the model file named by `analysis.forgetting_model`. Before the last phase starts,
it prints the two phases' DES and the forgetting the model predicts for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cft_adapters.errors import CftError
from cft_adapters.recipe import Recipe
from cft_adapters.util.digest import canonical_json, short_digest

MODEL_FILE = "forgetting_model.json"
SKETCH_BELOW = 5  # distinct similarity values


def _pair_key(recipe: Recipe) -> str:
    phases = recipe.run_phases()[-2:]
    return short_digest(canonical_json([[d.model_dump(mode="json") for d in p.datasets] for p in phases]))


def pair_des(recipe: Recipe, encoder: Any, encoder_name: str, max_examples: int = 500) -> float:
    """DES between the recipe's last two phases."""
    from cft_adapters.analysis.similarity import dataset_similarity

    n = len(recipe.phases)
    return dataset_similarity(recipe, n - 2, n - 1, encoder, encoder_name, max_examples=max_examples,
                              seed=recipe.training.seed, progress=False).des


def study_points(study_dir: Path, encoder: Any, encoder_name: str) -> list[dict[str, Any]]:
    """(condition, seed, DES, forgetting) for every finished two-or-more-phase cell of the study."""
    from cft_adapters import report
    from cft_adapters.manifest import RunManifest
    from cft_adapters.recipe import load_recipe

    cache: dict[str, float] = {}
    points = []
    for run_json in sorted(Path(study_dir).glob("cells/*/seed_*/run.json")):
        run_dir = run_json.parent
        manifest = RunManifest.read(run_dir)
        recipe = load_recipe(run_dir / "recipe.resolved.yaml")
        if len(recipe.run_phases()) < 2 or any(r.eval_status != "done" for r in manifest.phases):
            continue
        scores = report.paper_scores(report.phase_scores(manifest, recipe.eval.tasks))
        before, after = scores[-2].ea, scores[-1].ea
        if before is None or after is None:
            continue
        last = recipe.run_phases()[-1]
        mitigation = ", ".join(m for m, on in (("replay", last.replay is not None),
                                               ("placement", last.placement is not None)) if on) or None
        key = _pair_key(recipe)
        if mitigation is None and key not in cache:
            cache[key] = pair_des(recipe, encoder, encoder_name)
        points.append({"condition": run_dir.parent.name, "seed": run_dir.name, "des": cache.get(key),
                       "forgetting": before - after, "mitigation": mitigation})
    return points


def fit(points: list[dict[str, Any]], encoder_name: str) -> dict[str, Any]:
    from scipy import stats

    # A mitigation (replay, layer freezing in the last phase) changes forgetting at the same
    # similarity: such cells are left out of the fit, and listed.
    excluded = [p for p in points if p.get("mitigation")]
    points = [p for p in points if not p.get("mitigation")]
    xs, ys = [p["des"] for p in points], [p["forgetting"] for p in points]
    distinct = len({round(x, 12) for x in xs})
    if len(points) < 3 or distinct < 2:
        raise CftError(f"predict: {len(points)} finished cells with {distinct} distinct similarities; a fit needs at "
                       f"least 3 cells and 2 different similarities (conditions whose phase 2 differs)")
    result = stats.linregress(xs, ys)
    t = stats.t.ppf(0.975, len(points) - 2)

    def finite(value: float) -> float | None:  # JSON has no NaN: an undefined statistic is null
        return float(value) if math.isfinite(value) else None

    caveat = (f"{distinct} distinct similarities (the seeds of a condition share one): a sketch, not a model"
              if distinct < SKETCH_BELOW else f"{distinct} distinct similarities over {len(points)} cells")
    flat = len({round(y, 12) for y in ys}) == 1
    if flat:
        caveat += "; forgetting is the same in every cell, so there is nothing for similarity to explain"
    low, high = (finite(result.slope - t * result.stderr), finite(result.slope + t * result.stderr))
    return {
        "model": "forgetting = intercept + slope * DES (ordinary least squares)",
        "encoder": encoder_name, "slope": float(result.slope), "intercept": float(result.intercept),
        "slope_ci95": [low, high], "r2": None if flat else finite(result.rvalue ** 2),
        "p_value": None if flat else finite(result.pvalue),
        "n": len(points), "distinct_des": distinct, "sketch": distinct < SKETCH_BELOW, "caveat": caveat,
        "points": points,
        "excluded": [{k: p[k] for k in ("condition", "seed", "mitigation")} for p in excluded],
    }


def predict(model: dict[str, Any], des: float) -> float:
    return model["intercept"] + model["slope"] * des


def check_analysis_files(recipe: Recipe, source: str) -> None:
    """The files the recipe's analysis section names, read now (a dry run, the start of cft-train):
    a bad probe or forgetting model is said before any phase trains, not after."""
    problems = []
    if recipe.analysis.forgetting_model:
        try:
            read_model(Path(recipe.analysis.forgetting_model))
        except CftError as exc:
            problems += [f"{source}: {line}" for line in exc.problems]
    if recipe.analysis.drift and recipe.analysis.drift_probe:
        from cft_adapters.analysis.drift import read_probe

        try:
            read_probe(Path(recipe.analysis.drift_probe), "analysis.drift_probe:")
        except CftError as exc:
            problems += [f"{source}: {line}" for line in exc.problems]
    if problems:
        raise CftError(problems)


def read_model(path: Path) -> dict[str, Any]:
    try:
        model = json.loads(Path(path).read_text(encoding="utf-8"))
        float(model["slope"]), float(model["intercept"]), int(model["n"]), str(model["encoder"]), str(model["caveat"])
        if model["r2"] is not None:
            float(model["r2"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CftError(f"analysis.forgetting_model: {path}: not a forgetting model ({exc}); "
                       f"write one with cft-analyze predict STUDY_DIR") from None
    return model


def plot_fit(model: dict[str, Any], path: Path) -> None:
    from cft_adapters.util.plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs, ys = [p["des"] for p in model["points"]], [p["forgetting"] for p in model["points"]]
    ax.scatter(xs, ys)
    lo, hi = min(xs), max(xs)
    ax.plot([lo, hi], [predict(model, lo), predict(model, hi)], color="grey")
    ax.set_xlabel(f"DES ({model['encoder'].split('/')[-1]})")
    ax.set_ylabel("EA forgetting (phase before last − last)")
    r2 = "-" if model["r2"] is None else f"{model['r2']:.2f}"
    ax.set_title(f"slope {model['slope']:.3f}, R² {r2}, n {model['n']}" + (" (sketch)" if model["sketch"] else ""))
    fig.tight_layout()
    save_figure(fig, path)
