"""Experiment trackers (`training.report_to`): the training curves and each phase's scores.

- **Curves.** Every phase is its own tracker run, named `<run_name>/phase_<k>_<name>`, so phase
  boundaries show in the plots. TensorBoard gets our own callback writing to
  `<output_dir>/tensorboard/phase_<k>_<name>/`; W&B, MLflow and Trackio go through the Trainer's
  own integrations (`report_to`, `run_name`, `project`).
- **Scores.** After each checkpoint is scored, its EA, MA, Combined and forgetting (the paper's
  aggregates, report.py) are logged at step = phase index: to `<output_dir>/tensorboard/scores/` for
  TensorBoard, and to the active W&B / MLflow run for those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cft_adapters.recipe import TrainingConfig

TB_DIR = "tensorboard"


MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(training: TrainingConfig, source: str) -> None:
    """Before anything trains: each tracker in report_to is installed."""
    import importlib.util

    from cft_adapters.errors import RecipeError
    from cft_adapters.extras import install_hint

    missing = [name for name in training.report_to if importlib.util.find_spec(MODULES[name]) is None]
    if missing:
        hint = (install_hint("tracking") if missing == ["tensorboard"]
                else f"pip install {' '.join(m for m in missing if m != 'tensorboard')}")
        raise RecipeError([f"{source}: training.report_to: {', '.join(missing)} is not installed ({hint})"])


def run_name(training: TrainingConfig, run_dir: Path) -> str:
    return training.run_name or run_dir.name


def trainer_settings(training: TrainingConfig, run_dir: Path, phase_dirname: str) -> tuple[dict[str, Any], list[Any]]:
    """(SFTConfig keyword arguments, extra callbacks) for one phase's trainer."""
    integrations = [name for name in training.report_to if name != "tensorboard"]
    kwargs: dict[str, Any] = {"report_to": integrations or "none"}
    if integrations:
        kwargs["run_name"] = f"{run_name(training, run_dir)}/{phase_dirname}"
        if training.project:
            kwargs["project"] = training.project
    callbacks = []
    if "tensorboard" in training.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / TB_DIR / phase_dirname))))
    return kwargs, callbacks


def log_phase_scores(training: TrainingConfig, run_dir: Path, manifest: Any, tasks: list[str], index: int) -> None:
    """Phase `index`'s paper aggregates to the trackers in use (nothing when report_to is empty)."""
    if not training.report_to or not tasks:
        return
    from cft_adapters import report

    phases = report.paper_scores(report.phase_scores(manifest, tasks))
    scores = next((p for p in phases if p.index == index), None)
    if scores is None:
        return
    best_ea = max((p.ea for p in phases if p.index <= index and p.ea is not None), default=None)
    values = {"EA": scores.ea, "MA": scores.ma, "Combined": scores.combined, "language_fidelity": scores.fidelity,
              "forgetting": (best_ea - scores.ea) if best_ea is not None and scores.ea is not None else None}
    values = {k: float(v) for k, v in values.items() if v is not None}
    if "tensorboard" in training.report_to:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / TB_DIR / "scores")) as writer:
            for key, value in values.items():
                writer.add_scalar(f"scores/{key}", value, global_step=index)
    if "mlflow" in training.report_to:
        import mlflow

        mlflow.log_metrics({f"scores/{k}": v for k, v in values.items()}, step=index)
    if "wandb" in training.report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({f"scores/{k}": v for k, v in values.items()} | {"phase": index})
