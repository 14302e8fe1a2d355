"""Scoring checkpoints into a run's record: which settings make scores comparable, and where scores
made under other settings go (a labelled result set, never the run's own). Used by the training
runner (cft-train) and by cft-eval alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from cft_adapters.evaluation import EvalOutcome, scored_tasks
from cft_adapters.manifest import PhaseRecord, RunManifest
from cft_adapters.recipe import EvalConfig


class Scorer(Protocol):
    """What scores a checkpoint: a `CheckpointScorer`, or the base's cached scores (score_cache)."""

    @property
    def eval_cfg(self) -> EvalConfig: ...

    def score(self, adapter_dir: Path | None, out_dir: Path) -> EvalOutcome: ...


def eval_settings(eval_cfg: EvalConfig, precision: str) -> dict[str, Any]:
    """What makes two scorings of a checkpoint comparable (the task list aside: tasks add up)."""
    limit = eval_cfg.limit
    if limit is not None and limit >= 1 and float(limit).is_integer():
        limit = int(limit)  # a count of examples (below 1 it is a fraction)
    settings = {"limit": limit, "num_fewshot": eval_cfg.num_fewshot, "batch_size": eval_cfg.batch_size,
                "apply_chat_template": eval_cfg.apply_chat_template, "base_precision": precision}
    if eval_cfg.limits:  # only then, like the judge below
        settings["limits"] = dict(sorted(eval_cfg.limits.items()))
    if eval_cfg.judge is not None:  # only then: settings recorded before judges existed still compare equal
        settings["judge"] = eval_cfg.judge.model_dump()
    return settings


def result_set_label(settings: dict[str, Any], run_settings: dict[str, Any]) -> str:
    """A readable name for scores made under other settings than the run's own, from what differs:
    e.g. 'limit8-fp32' for --limit 8 --base-precision fp32."""
    short = {"limit": "limit{}", "num_fewshot": "{}shot", "batch_size": "bs{}", "base_precision": "{}",
             "apply_chat_template": "chat{}", "limits": "limits", "judge": "judge"}
    parts = [short.get(key, key + "{}").format(value) for key, value in settings.items() if run_settings.get(key) != value]
    label = "-".join(parts) or "rescored"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label.lower())


def record_evaluation(
    manifest: RunManifest, record: PhaseRecord, scorer: Scorer, adapter_dir: Path | None,
    run_dir: Path, console: Console, settings: dict[str, Any] | None = None, label: str | None = None,
) -> None:
    """Score one checkpoint into phase_k_<name>/eval/ and run.json. A failing task marks the
    phase's evaluation failed (the adapter is untouched; `cft-eval` can retry).

    Without `label` the scores are the run's own (`record.eval`); scores made under other `settings`
    than the recorded ones replace them rather than merge into them. With `label` they go to the
    labelled set `record.eval_sets[label]` (files in eval/<label>/), never into the run's own."""
    from cft_adapters.manifest import EvalSet

    target: Any = record
    out_dir = run_dir / record.dirname / "eval"
    if label is not None:
        prior = record.eval_sets.get(label)
        target = prior if prior is not None and prior.settings == settings else EvalSet(settings=settings or {})
        record.eval_sets[label] = target
        out_dir = out_dir / label
    try:
        outcome = scorer.score(adapter_dir, out_dir)
    except Exception as exc:  # lm-eval and the datasets it loads raise anything; keep the run going
        target.eval_status, target.eval_error = "failed", f"{type(exc).__name__}: {exc}"[:2000]
        manifest.write(run_dir)
        console.print(f"[red]phase {record.index} '{record.name}': evaluation failed[/]: {target.eval_error}"
                      f"\n  the checkpoint is kept; retry with: cft-eval {run_dir}")
        return
    if label is None:
        if settings is not None and record.eval_settings not in (None, settings):
            record.eval, record.eval_groups, record.eval_tasks, record.eval_files = {}, {}, [], []
        record.eval_settings = settings if settings is not None else record.eval_settings
    target.eval = {**target.eval, **outcome.metrics}
    target.eval_groups = {**target.eval_groups, **outcome.groups}
    target.eval_seconds = outcome.seconds
    target.eval_files.append(str(outcome.results_file.relative_to(run_dir)))
    target.eval_tasks = sorted(set(target.eval_tasks) | set(scored_tasks(scorer.eval_cfg)))
    target.eval_status, target.eval_error = "done", None
    manifest.write(run_dir)
