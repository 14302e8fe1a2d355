"""The forgetting/gain report: English task ability (EA) and multilingual language ability (MA)
of every phase's model, from the per-task scores in run.json.

What each task measures is declared in the task YAMLs, not here (`task_semantics.py`,
`lm_eval_tasks/README.md`): every scoring unit has an ability (EA or MA), a language and a primary
metric. A requested task the report cannot classify is an error naming it (TaskSemanticsError).

Definitions (the paper leaves the averaging open; these are ours):
- A *scoring unit* is a requested task with a declaration, or a member of a group of ours (cft_en,
  cft_ml_seen, ...) expanded until a declared task or a declared lm-eval group (mmlu,
  global_mmlu_fr, which lm-eval aggregates itself) is reached.
- Each unit contributes its *primary metric*, on a 0-1 scale.
- EA = unweighted mean over EA units. MA_seen / MA_unseen = unweighted mean over MA units whose
  language is / is not among the languages of the run's training data (other than English).
- Δ0 = score - phase 0's score. Δbest = score - the best earlier phase's score.
- Forgetting (per phase k) = max over phases j ≤ k of EA_j, minus EA_k (≥ 0).
- Backward transfer (run) = mean over trained phases i < N of S_N(a_i) - S_i(a_i), where a_i is
  the ability phase i trained: EA for an English-only phase, MA_seen otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from cft_adapters.manifest import RunManifest, write_atomic
from cft_adapters.task_semantics import Semantics, classify


@dataclass
class PhaseScores:
    index: int
    name: str
    units: dict[str, float] = field(default_factory=dict)  # unit -> its primary metric, where scored
    semantics: dict[str, Semantics] = field(default_factory=dict)  # every unit of the requested tasks
    ea: float | None = None
    ma_seen: float | None = None
    ma_unseen: float | None = None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def seen_languages(manifest: RunManifest) -> set[str]:
    langs: set[str] = set()
    for rec in manifest.phases:
        langs |= set((rec.data or {}).get("languages", {}))
    return langs - {"en"}


def _ability(semantics: Semantics, seen: set[str]) -> str:
    if semantics.ability == "EA":
        return "ea"
    return "ma_seen" if semantics.language in seen else "ma_unseen"


def phase_scores(manifest: RunManifest, tasks: list[str]) -> list[PhaseScores]:
    """Every phase's units and abilities. Raises TaskSemanticsError for a task it cannot classify."""
    seen = seen_languages(manifest)
    out = []
    for rec in manifest.phases:
        scores = PhaseScores(rec.index, rec.name, semantics=classify(tasks, rec.eval_groups or {}))
        by_ability: dict[str, list[float]] = {"ea": [], "ma_seen": [], "ma_unseen": []}
        for unit, semantics in scores.semantics.items():
            value = (rec.eval.get(unit) or {}).get(semantics.metric)
            if value is not None:
                scores.units[unit] = float(value)
                by_ability[_ability(semantics, seen)].append(float(value))
        scores.ea, scores.ma_seen, scores.ma_unseen = (_mean(by_ability[k]) for k in ("ea", "ma_seen", "ma_unseen"))
        out.append(scores)
    return out


def _delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def forgetting(scores: list[PhaseScores], k: int) -> float | None:
    history = [s.ea for s in scores[: k + 1] if s.ea is not None]
    return None if scores[k].ea is None or not history else max(history) - scores[k].ea


def best_earlier(scores: list[PhaseScores], k: int, attr: str) -> float | None:
    earlier = [getattr(s, attr) for s in scores[:k] if getattr(s, attr) is not None]
    return max(earlier) if earlier else None


def backward_transfer(manifest: RunManifest, scores: list[PhaseScores]) -> float | None:
    last = len(scores) - 1
    gaps = []
    for i in range(1, last):
        langs = set((manifest.phases[i].data or {}).get("languages", {}))
        attr = "ea" if langs == {"en"} else "ma_seen"
        now, then = getattr(scores[last], attr), getattr(scores[i], attr)
        if now is not None and then is not None:
            gaps.append(now - then)
    return _mean(gaps)


def _fmt(value: float | None, signed: bool = False, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


SUMMARY_COLUMNS = ("phase", "EA", "MA seen", "MA unseen", "ΔEA vs 0", "ΔMA vs 0", "ΔEA vs best", "ΔMA vs best", "forgetting")
_SHORT = ("phase", "EA", "MA-s", "MA-u", "ΔEA0", "ΔMA0", "ΔEAb", "ΔMAb", "forget")


def summary_rows(scores: list[PhaseScores], digits: int = 4) -> list[list[str]]:
    base = scores[0]
    rows = []
    for k, s in enumerate(scores):
        rows.append([
            f"{s.index} {s.name}", _fmt(s.ea, digits=digits), _fmt(s.ma_seen, digits=digits), _fmt(s.ma_unseen, digits=digits),
            _fmt(_delta(s.ea, base.ea), True, digits), _fmt(_delta(s.ma_seen, base.ma_seen), True, digits),
            _fmt(_delta(s.ea, best_earlier(scores, k, "ea")), True, digits),
            _fmt(_delta(s.ma_seen, best_earlier(scores, k, "ma_seen")), True, digits),
            _fmt(forgetting(scores, k), digits=digits),
        ])
    return rows


def rich_tables(manifest: RunManifest, tasks: list[str], settings: dict | None = None,
                label: str | None = None) -> list[Table]:
    """The ability summary (rows: phases) and the per-task primary metrics (rows: tasks)."""
    from rich import box

    manifest = result_set(manifest, settings, label)
    scores = phase_scores(manifest, tasks)
    summary = Table(title="English task ability (EA), multilingual ability (MA-s seen, MA-u unseen)",
                    box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for col in _SHORT:
        if col == "phase":
            summary.add_column(col, no_wrap=True, max_width=14, overflow="ellipsis")
        else:
            summary.add_column(col, justify="right", no_wrap=True, min_width=max(6, len(col)))
    for row in summary_rows(scores, digits=3):
        summary.add_row(*row)
    summary.caption = (f"Δ…0: vs phase 0. Δ…b: vs the best earlier phase. forget: EA drop from its best. BWT "
                       f"{_fmt(backward_transfer(manifest, scores), True, 3)}; seen: "
                       f"{', '.join(sorted(seen_languages(manifest))) or '-'}")
    per_task = Table(title="per-task primary metric", box=box.SIMPLE_HEAD)
    per_task.add_column("task", no_wrap=True)
    per_task.add_column("metric", no_wrap=True)
    for s in scores:
        per_task.add_column(f"{s.index}", justify="right", no_wrap=True)
    for unit, semantics in _ordered_units(scores).items():
        per_task.add_row(unit, semantics.metric, *(_fmt(s.units.get(unit), digits=3) for s in scores))
    return [summary, per_task]


def _ordered_units(scores: list[PhaseScores]) -> dict[str, Semantics]:
    """The units scored in any phase, English ones first."""
    units = {u: s.semantics[u] for s in scores for u in s.units}
    return dict(sorted(units.items(), key=lambda item: (item[1].language != "en", item[0])))


def result_set(manifest: RunManifest, settings: dict | None = None, label: str | None = None) -> RunManifest:
    """The run as one result set sees it: every phase keeps its record, but only scores made under
    `settings` (the labelled set `label`, or the run's own scores) count; others read as not scored.
    A report built from it only ever compares phases scored the same way."""
    view = manifest.model_copy(deep=True)
    for rec in view.phases:
        if label is not None:
            scored = rec.eval_sets.get(label)
            ok = scored is not None and scored.eval_status == "done" and (settings is None or scored.settings == settings)
            rec.eval, rec.eval_groups = (scored.eval, scored.eval_groups) if ok else ({}, {})
        elif settings is not None and rec.eval_settings not in (None, settings):
            rec.eval, rec.eval_groups = {}, {}
    return view


def settings_text(settings: dict | None) -> str:
    if not settings:
        return "the run's recipe settings"
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def write_report(run_dir: Path, manifest: RunManifest, tasks: list[str], settings: dict | None = None,
                 label: str | None = None) -> Path:
    """report.md for the run's own scores, report-<label>.md for a labelled result set; `manifest` is
    the full run, narrowed here with result_set."""
    manifest = result_set(manifest, settings, label)
    scores = phase_scores(manifest, tasks)
    units = _ordered_units(scores)
    lines = [
        f"# Run report: {manifest.recipe}" + (f" (result set `{label}`)" if label else ""),
        "",
        f"Base model: `{manifest.base_model}`. Eval tasks: {', '.join(f'`{t}`' for t in tasks)}. "
        f"Seen languages: {', '.join(sorted(seen_languages(manifest))) or '-'}.",
        "",
        f"Scored with: {settings_text(settings)}. Every phase below was scored this way; a phase shown as "
        f"`-` was not scored with these settings.",
        "",
        "## Abilities per phase",
        "",
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(SUMMARY_COLUMNS) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in summary_rows(scores)),
        "",
        f"Backward transfer: {_fmt(backward_transfer(manifest, scores), True)}.",
        "",
        "## Per-task primary metrics",
        "",
        "| task | metric | language | " + " | ".join(f"{s.index} {s.name}" for s in scores) + " |",
        "|---|---|---|" + "---:|" * len(scores),
        *(
            f"| {u} | {semantics.metric} | {semantics.language} | "
            + " | ".join(_fmt(s.units.get(u)) for s in scores) + " |"
            for u, semantics in units.items()
        ),
        "",
        "EA and MA are unweighted means of the primary metrics above; see `cft_adapters/report.py`.",
        "",
    ]
    from cft_adapters.rundir import inside

    path = run_dir / (f"report-{label}.md" if label else "report.md")
    inside(run_dir, path)
    write_atomic(path, "\n".join(lines))
    return path
