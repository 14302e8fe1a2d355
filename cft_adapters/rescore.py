"""`cft-eval RUN_DIR`: score an existing run's checkpoints again, without retraining.

A run directory may come from someone else, so what it says is checked before use: phase names and
adapter paths from run.json must stay inside the run directory, and `model.trust_remote_code: true`
in its resolved recipe is honoured only when the user allows it on the command line.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from cft_adapters.tasks_path import use_include_paths
from cft_adapters import modeling, report
from cft_adapters.errors import CftError
from cft_adapters.evaluation import CheckpointScorer, eval_model_config, training_precision, unknown_tasks
from cft_adapters.manifest import MANIFEST, RunManifest
from cft_adapters.rundir import inside, verify_adapter
from cft_adapters.util.fs import RunLock
from cft_adapters.rundir import checked_manifest, run_settings  # noqa: F401  (re-exported: their old home)
from cft_adapters.scoring import eval_settings, record_evaluation, result_set_label
from cft_adapters.task_semantics import classify
from cft_adapters.recipe import EvalConfig, ModelConfig


def rescore_run(
    run_dir: str | Path,
    console: Console,
    *,
    tasks: list[str] | None = None,
    limit: float | None = None,
    batch_size: int | None = None,
    base_precision: str | None = None,
    phases: list[int] | None = None,
    allow_remote_code: bool = False,
) -> bool:
    """Score phase 0 and every finished phase; True when every scoring succeeded. Everything is
    checked before anything is written; then the run directory is locked (a cft-train or another
    cft-eval writing run.json at the same time would lose records) and run.json read again."""
    run_dir = Path(run_dir)
    manifest = checked_manifest(run_dir)
    model_cfg, run_cfg = run_settings(run_dir, allow_remote_code=allow_remote_code)
    use_include_paths(run_cfg.include_path)
    updates = {k: v for k, v in {"tasks": tasks, "limit": limit, "batch_size": batch_size}.items() if v is not None}
    try:  # validated like the recipe's own eval section (a negative or nan --limit is an error)
        eval_cfg = EvalConfig.model_validate({**run_cfg.model_dump(), **updates})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CftError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    if not eval_cfg.tasks:
        raise CftError("no tasks to score: pass --tasks (the run's recipe has eval.tasks: [])")
    problems = unknown_tasks(eval_cfg.tasks)
    if problems:
        raise CftError([p.replace("eval.tasks", "--tasks") for p in problems])
    wanted = _wanted(manifest, phases)
    if phases is not None and {r.index for r in wanted} != set(phases):
        raise CftError(f"--phases: only phase 0 and finished phases can be scored (finished: "
                       f"{[r.index for r in manifest.phases if r.status == 'done']})")
    for record in wanted:  # every adapter is checked before anything is written or loaded
        if record.checkpoint:
            verify_adapter(run_dir, record)

    run_precision = eval_cfg.base_precision or training_precision(model_cfg)
    precision = base_precision or run_precision
    # The run's own settings are those its scores were made with (recorded per phase); the recipe's
    # eval section only for a run scored before settings were recorded.
    recorded = [r.eval_settings for r in manifest.phases if r.eval_status == "done" and r.eval_settings]
    own = recorded[0] if recorded else eval_settings(run_cfg, run_precision)
    settings = eval_settings(eval_cfg, precision)
    # Scores under the run's own settings join its record and report.md; under any other settings
    # they form a labelled result set (eval/<label>/, report-<label>.md): never mixed with the run's.
    label = None if settings == own else result_set_label(settings, own)
    report_name = f"report-{label}.md" if label else "report.md"
    # Every file this command writes is checked to lie inside the run directory before anything loads.
    for out in (run_dir / MANIFEST, run_dir / report_name,
                *(run_dir / r.dirname / "eval" for r in wanted),
                *(run_dir / r.dirname / "eval" / label for r in wanted if label)):
        inside(run_dir, out)
    # The report covers every task of its result set, not only this call's.
    earlier = [t for r in manifest.phases for t in ((r.eval_sets[label].eval_tasks if label in r.eval_sets else [])
                                                    if label else run_cfg.tasks)]
    report_tasks = list(dict.fromkeys([*earlier, *eval_cfg.tasks]))
    classify(report_tasks)  # the report must classify every task (TaskSemanticsError), known before scoring
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        checked = [(r.index, r.checkpoint, r.train.final_digest if r.train else None) for r in wanted]
        manifest = checked_manifest(run_dir)  # as it is now, under the lock: it must say what was checked
        wanted = _wanted(manifest, phases)
        if [(r.index, r.checkpoint, r.train.final_digest if r.train else None) for r in wanted] != checked:
            raise CftError(f"{run_dir / MANIFEST}: changed while cft-eval was checking it; run cft-eval again")
        return _score(run_dir, console, manifest, wanted, model_cfg, eval_cfg, precision, settings, label, own,
                      report_tasks)
    finally:
        lock.release()


def _wanted(manifest: RunManifest, phases: list[int] | None) -> list:
    return [r for r in manifest.phases if (r.index == 0 or r.status == "done") and (phases is None or r.index in phases)]


def _score(run_dir: Path, console: Console, manifest: RunManifest, wanted: list, model_cfg: ModelConfig,
           eval_cfg: EvalConfig, precision: str, settings: dict, label: str | None, own: dict,
           report_tasks: list[str]) -> bool:
    report_name = f"report-{label}.md" if label else "report.md"
    cfg = eval_model_config(model_cfg, precision)
    path = modeling.resolve_model_path(cfg)
    console.print(f"[bold]loading base[/] {model_cfg.name_or_path} at {precision} (once, for all phases)")
    if label:
        console.print(f"these settings differ from the run's own ({report.settings_text(own)}): the scores go to "
                      f"the result set '{label}' and {report_name}; run.json's own scores and report.md are kept")
    scorer = CheckpointScorer(eval_cfg, modeling.load_tokenizer(cfg, path), modeling.load_base_model(cfg, path))
    for record in wanted:
        adapter_dir = inside(run_dir, run_dir / record.checkpoint) if record.checkpoint else None
        console.print(f"phase {record.index} '{record.name}': evaluating {', '.join(eval_cfg.tasks)}")
        record_evaluation(manifest, record, scorer, adapter_dir, run_dir, console, settings, label)
    if label is None:
        manifest.eval_base_precision = precision
        manifest.write(run_dir)
    console.print(*report.rich_tables(manifest, report_tasks, settings, label))
    console.print(f"report: {report.write_report(run_dir, manifest, report_tasks, settings, label)}")
    scored = [r.eval_sets[label] if label else r for r in wanted]
    return all(s.eval_status == "done" for s in scored)
