"""`cft-eval RUN_DIR`: score an existing run's checkpoints again, without retraining."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError
from rich.console import Console

from cft_adapters import modeling, report
from cft_adapters.errors import CftError
from cft_adapters.evaluation import CheckpointScorer, eval_model_config, training_precision, unknown_tasks
from cft_adapters.manifest import RESOLVED_RECIPE
from cft_adapters.phases import read_manifest, record_evaluation
from cft_adapters.recipe import EvalConfig, ModelConfig


def run_settings(run_dir: Path) -> tuple[ModelConfig, EvalConfig]:
    """The model and eval sections of the run's resolved recipe (data paths are not needed here)."""
    path = run_dir / RESOLVED_RECIPE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return ModelConfig.model_validate(raw["model"]), EvalConfig.model_validate(raw.get("eval") or {})
    except (OSError, KeyError, TypeError, yaml.YAMLError, ValidationError) as exc:
        raise CftError(f"{path}: cannot read the run's recipe: {str(exc).splitlines()[0]}") from None


def rescore_run(
    run_dir: str | Path,
    console: Console,
    *,
    tasks: list[str] | None = None,
    limit: float | None = None,
    batch_size: int | None = None,
    base_precision: str | None = None,
    phases: list[int] | None = None,
) -> bool:
    """Score phase 0 and every finished phase; True when every scoring succeeded."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise CftError(f"{run_dir}: no run.json here; is this a cft-train run directory?")
    model_cfg, eval_cfg = run_settings(run_dir)
    updates = {k: v for k, v in {"tasks": tasks, "limit": limit, "batch_size": batch_size}.items() if v is not None}
    eval_cfg = eval_cfg.model_copy(update=updates)
    if not eval_cfg.tasks:
        raise CftError("no tasks to score: pass --tasks (the run's recipe has eval.tasks: [])")
    problems = unknown_tasks(eval_cfg.tasks)
    if problems:
        raise CftError([p.replace("eval.tasks", "--tasks") for p in problems])
    wanted = [r for r in manifest.phases if (r.index == 0 or r.status == "done") and (phases is None or r.index in phases)]
    if phases is not None and {r.index for r in wanted} != set(phases):
        raise CftError(f"--phases: only phase 0 and finished phases can be scored (finished: "
                       f"{[r.index for r in manifest.phases if r.status == 'done']})")

    precision = base_precision or eval_cfg.base_precision or training_precision(model_cfg)
    cfg = eval_model_config(model_cfg, precision)
    path = modeling.resolve_model_path(cfg)
    console.print(f"[bold]loading base[/] {model_cfg.name_or_path} at {precision} (once, for all phases)")
    scorer = CheckpointScorer(eval_cfg, modeling.load_tokenizer(cfg, path), modeling.load_base_model(cfg, path))
    manifest.eval_base_precision = precision
    for record in wanted:
        adapter_dir = run_dir / record.checkpoint if record.checkpoint else None
        console.print(f"phase {record.index} '{record.name}': evaluating {', '.join(eval_cfg.tasks)}")
        record_evaluation(manifest, record, scorer, adapter_dir, run_dir, console)
    console.print(*report.rich_tables(manifest, eval_cfg.tasks))
    console.print(f"report: {report.write_report(run_dir, manifest, eval_cfg.tasks)}")
    return all(r.eval_status == "done" for r in wanted)
