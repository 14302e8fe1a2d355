"""`cft-analyze drift-compare RUN_A... -- RUN_B...`: how much more the representations move in one
group of runs than in another, layer by layer (the paper: "dissimilar data produces 3-4x the
covariance shift in higher layers").

Each run's drift (drift.py) is read from <run>/analysis/drift.json, or computed on the bundled probe
when that file is missing, was made on a different probe, or on other checkpoints (a phase added or
retrained since). The transition compared is each run's
last (phase 1 → phase 2 in a two-phase run). Per layer: the mean covariance shift of group A and of
group B over their runs (seeds), and the ratio B / A, with a 95% percentile-bootstrap interval that
resamples the runs of each group (10,000 resamples, seeded). One run per group gives no interval,
and the result says so.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cft_adapters.errors import CftError
from cft_adapters.util.plot import pyplot, save_figure

METRIC = "covariance_shift"
RESAMPLES = 10_000


def run_shift(run_dir: Path, prompts: list[str], console: Any, compute: Any) -> list[float]:
    """The per-layer covariance shift of the run's last transition, from its drift.json when it was
    made on these prompts and on the run's current checkpoints (the same adapters), else computed
    with `compute(run_dir, prompts)` (and written there)."""
    from cft_adapters.analysis.drift import drift_checkpoints, probe_digest
    from cft_adapters.rundir import checked_manifest

    path = run_dir / "analysis" / "drift.json"
    result = None
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if (isinstance(saved, dict) and saved.get("transitions") and saved.get("probe_digest") == probe_digest(prompts)
                    and saved.get("checkpoints") == drift_checkpoints(checked_manifest(run_dir))):
                result = saved
        except ValueError:
            result = None
    if result is None:
        result = compute(run_dir, prompts)
    if not result.get("transitions"):
        raise CftError(f"{run_dir}: no transition to compare (the run has only its base)")
    return [float(v) for v in result["transitions"][-1][METRIC]]


def compare(group_a: list[list[float]], group_b: list[list[float]], seed: int = 0) -> dict[str, Any]:
    """Per layer: means of A and B, ratio B / A and its bootstrap interval over the runs."""
    a, b = np.array(group_a, dtype=float), np.array(group_b, dtype=float)
    if a.shape[1] != b.shape[1]:
        raise CftError(f"the two groups' models have different layer counts ({a.shape[1]} vs {b.shape[1]})")
    mean_a, mean_b = a.mean(0), b.mean(0)
    ratio = np.divide(mean_b, mean_a, out=np.full_like(mean_b, np.nan), where=mean_a > 0)
    low = high = None
    if len(a) > 1 and len(b) > 1:
        rng = np.random.default_rng(seed)
        ia = rng.integers(0, len(a), size=(RESAMPLES, len(a)))
        ib = rng.integers(0, len(b), size=(RESAMPLES, len(b)))
        boot_a, boot_b = a[ia].mean(1), b[ib].mean(1)  # RESAMPLES x layers
        boot = np.divide(boot_b, boot_a, out=np.full_like(boot_b, np.nan), where=boot_a > 0)
        with warnings.catch_warnings():  # a layer with no shift in A (the embeddings) has no ratio at all
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)
    layers = []
    for i in range(a.shape[1]):
        layers.append({"layer": i, "mean_a": float(mean_a[i]), "mean_b": float(mean_b[i]),
                       "ratio": None if np.isnan(ratio[i]) else float(ratio[i]),
                       "ci_low": _finite(low, i), "ci_high": _finite(high, i)})
    return {"metric": METRIC, "n_a": len(a), "n_b": len(b), "layers": layers,
            "interval": "95% percentile bootstrap over the runs of each group" if low is not None
            else "none: a group has one run (no spread to resample)"}


def _finite(values: np.ndarray | None, i: int) -> float | None:
    """values[i], or None where there is none (no interval, or no ratio to bound): JSON has no NaN."""
    return None if values is None or not np.isfinite(values[i]) else float(values[i])


def plot_compare(result: dict[str, Any], path: Path, labels: tuple[str, str]) -> None:
    plt = pyplot()
    rows = [r for r in result["layers"] if r["ratio"] is not None]
    x = [r["layer"] for r in rows]
    y = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(x) + 2), 3.5))
    if rows and rows[0]["ci_low"] is not None:
        err = [[r["ratio"] - (r["ci_low"] if r["ci_low"] is not None else r["ratio"]) for r in rows],
               [(r["ci_high"] if r["ci_high"] is not None else r["ratio"]) - r["ratio"] for r in rows]]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3)
    else:
        ax.plot(x, y, "o-")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"covariance shift, {labels[1]} / {labels[0]}")
    ax.set_title(f"drift ratio per layer (n = {result['n_a']} vs {result['n_b']} runs)")
    fig.tight_layout()
    save_figure(fig, path)
