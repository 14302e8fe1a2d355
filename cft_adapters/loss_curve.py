"""The run's training-loss curve: every phase's logged loss on one step axis, the phase boundaries
marked, written to <run_dir>/loss_curve.png (linked from report.md)."""

from __future__ import annotations

import json
from pathlib import Path

from cft_adapters.manifest import RunManifest
from cft_adapters.rundir import TRAIN_LOG

LOSS_PNG = "loss_curve.png"


def phase_losses(run_dir: Path, manifest: RunManifest) -> list[tuple[str, list[tuple[int, float]]]]:
    """(phase label, [(step within the phase, loss)]) for every trained phase with a loss log."""
    out = []
    for record in manifest.phases[1:]:
        path = run_dir / record.dirname / TRAIN_LOG
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        points = [(int(r["step"]), float(r["loss"])) for r in rows if isinstance(r, dict) and "loss" in r and "step" in r]
        if points:
            out.append((f"{record.index} {record.name}", points))
    return out


def write_loss_curve(run_dir: Path, manifest: RunManifest) -> Path | None:
    """loss_curve.png, or None when no phase logged a loss (e.g. fewer steps than logging_steps)."""
    phases = phase_losses(run_dir, manifest)
    if not phases:
        return None
    from cft_adapters.util.plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for i, (label, points) in enumerate(phases):
        steps = [offset + s for s, _ in points]
        ax.plot(steps, [loss for _, loss in points], marker=".", label=f"phase {label}")
        if i:
            ax.axvline(offset, color="grey", linestyle="--", linewidth=1)
        offset += max(s for s, _ in points)
    ax.set_xlabel("optimizer step (phases one after another)")
    ax.set_ylabel("training loss")
    ax.set_title(f"{run_dir.name}: training loss per phase")
    ax.legend()
    fig.tight_layout()
    path = run_dir / LOSS_PNG
    save_figure(fig, path)
    return path
