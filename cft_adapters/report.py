"""The forgetting/gain report: English task ability (EA) and multilingual language ability (MA)
of every phase's model, from the per-task scores in run.json.

What each task measures is declared in the task YAMLs, not here (`task_semantics.py`,
`lm_eval_tasks/README.md`): every scoring unit has an ability (EA or MA), a language and a primary
metric. A requested task the report cannot classify is an error naming it (TaskSemanticsError).

Definitions of the finer, per-unit view (ours; the paper's own aggregates are below):
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

Two views of the same units:
- **paper** (the default; the paper's aggregates, `paper_scores`): benchmark first. Each unit's
  declared `benchmark` (metadata.cft) groups it; a benchmark's score is the mean over its languages
  (units of one language averaged first), EA the mean over EA benchmarks, MA the mean over MA
  benchmarks of every language, seen or not, except language fidelity (the benchmarks the paper
  definition lists as `beside_MA`, cft_adapters/data/paper_numbers.json), which is its own column
  beside MA. Combined = (EA + MA) / 2. `paper_coverage` says which of the paper's benchmarks are
  missing and which stand-ins were averaged instead.
- **unit** (the finer view, `phase_scores`): every unit counts once, MA split into seen / unseen
  languages, language fidelity inside MA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from cft_adapters.manifest import RunManifest, write_atomic
from cft_adapters.paper_numbers import paper_numbers
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


@dataclass
class PaperScores:
    """One phase in the paper's terms (see the module docstring, view "paper")."""

    index: int
    name: str
    benchmarks: dict[tuple[str, str], float] = field(default_factory=dict)  # (EA|MA|LF, benchmark) -> its mean
    ea: float | None = None
    ma: float | None = None
    fidelity: float | None = None  # language fidelity, beside MA
    combined: float | None = None


def benchmark_of(unit: str, semantics: Semantics) -> str:
    """The declared benchmark; a unit that declares none is a benchmark of its own (paper_coverage says so)."""
    return semantics.benchmark or unit


def _paper_group(semantics: Semantics, benchmark: str) -> str:
    if semantics.ability == "EA":
        return "EA"
    return "LF" if benchmark in paper_numbers().aggregation.beside_MA else "MA"


def paper_scores(scores: list[PhaseScores]) -> list[PaperScores]:
    """The paper's aggregates of every phase: benchmark first (its languages averaged), then EA / MA."""
    out = []
    for s in scores:
        by_language: dict[tuple[str, str], dict[str, list[float]]] = {}
        for unit, value in s.units.items():
            semantics = s.semantics[unit]
            bench = benchmark_of(unit, semantics)
            key = (_paper_group(semantics, bench), bench)
            by_language.setdefault(key, {}).setdefault(semantics.language, []).append(value)
        benchmarks = {key: _mean([_mean(v) for v in langs.values()]) for key, langs in by_language.items()}
        ea, ma, lf = (_mean([v for (g, _), v in benchmarks.items() if g == group]) for group in ("EA", "MA", "LF"))
        combined = None if ea is None or ma is None else (ea + ma) / 2
        out.append(PaperScores(s.index, s.name, benchmarks, ea, ma, lf, combined))
    return out


@dataclass
class PaperCoverage:
    """Which of the paper's benchmarks the scores cover, and what stands in for the others."""

    scored: dict[str, list[str]]  # EA|MA|LF -> the benchmarks scored in some phase
    missing: dict[str, list[str]]  # EA|MA -> the paper's benchmarks not scored
    extra: dict[str, list[str]]  # EA|MA -> benchmarks averaged that are not the paper's
    undeclared: list[str]  # units without a declared benchmark

    def notes(self) -> list[str]:
        definition = paper_numbers()
        name = definition.benchmark_name
        lines = []
        for group, paper in (("EA", definition.aggregation.EA), ("MA", definition.aggregation.MA)):
            present = [b for b in paper if b in self.scored[group]]
            if self.missing[group]:
                text = (f"{group} over {len(present)} of the paper's {len(paper)} benchmarks: "
                        f"{', '.join(name(b) for b in self.missing[group])} missing")
                reasons = [definition.benchmarks[b].missing for b in self.missing[group]
                           if b in definition.benchmarks and definition.benchmarks[b].missing]
                lines.append(text + (f" ({'; '.join(reasons)})" if reasons else ""))
            if self.extra[group]:
                lines.append(f"{group} averages benchmarks the paper does not use: {', '.join(self.extra[group])}")
        if self.scored["LF"]:
            lines.append(f"language fidelity ({', '.join(self.scored['LF'])}) is reported beside MA, not inside it")
        if self.undeclared:
            lines.append(f"no benchmark declared (metadata.cft.benchmark), each counted as a benchmark of its own: "
                         f"{', '.join(self.undeclared)}")
        return lines

    def short(self) -> str:
        """One line for the console: how many of the paper's benchmarks are covered."""
        definition = paper_numbers().aggregation
        parts = []
        for group, paper in (("EA", definition.EA), ("MA", definition.MA)):
            text = f"{group}: {len(paper) - len(self.missing[group])} of the paper's {len(paper)} benchmarks"
            if self.extra[group]:
                text += f" (+ {', '.join(self.extra[group])})"
            parts.append(text)
        return "; ".join(parts) + "."


def paper_coverage(scores: list[PhaseScores]) -> PaperCoverage:
    definition = paper_numbers().aggregation
    scored: dict[str, list[str]] = {"EA": [], "MA": [], "LF": []}
    undeclared = []
    for s in scores:
        for unit in s.units:
            semantics = s.semantics[unit]
            bench = benchmark_of(unit, semantics)
            group = _paper_group(semantics, bench)
            if bench not in scored[group]:
                scored[group].append(bench)
            if semantics.benchmark is None and unit not in undeclared:
                undeclared.append(unit)
    paper = {"EA": definition.EA, "MA": definition.MA}
    return PaperCoverage(
        scored={g: sorted(v) for g, v in scored.items()},
        missing={g: [b for b in paper[g] if b not in scored[g]] for g in paper},
        extra={g: sorted(b for b in scored[g] if b not in paper[g]) for g in paper},
        undeclared=sorted(undeclared),
    )


def _delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def forgetting(scores: Sequence[PhaseScores | PaperScores], k: int) -> float | None:
    history = [s.ea for s in scores[: k + 1] if s.ea is not None]
    return None if scores[k].ea is None or not history else max(history) - scores[k].ea


def best_earlier(scores: Sequence[PhaseScores | PaperScores], k: int, attr: str) -> float | None:
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


def _phase_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """A markdown table of phases: the phase column left-aligned, the numbers right-aligned."""
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _fmt(value: float | None, signed: bool = False, digits: int = 4) -> str:
    if value is None:
        return "-"
    value = round(value, digits) + 0.0  # no "-0.0000" from rounding noise
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


PAPER_COLUMNS = ("phase", "EA", "MA", "Combined", "language fidelity", "ΔEA vs 0", "ΔMA vs 0", "ΔCombined vs 0",
                 "forgetting")
_PAPER_SHORT = ("phase", "EA", "MA", "Comb", "LF", "ΔEA0", "ΔMA0", "ΔComb0", "forget")
VIEWS = ("paper", "unit")


def paper_rows(paper: list[PaperScores], digits: int = 4) -> list[list[str]]:
    base = paper[0]
    return [[
        f"{p.index} {p.name}", _fmt(p.ea, digits=digits), _fmt(p.ma, digits=digits), _fmt(p.combined, digits=digits),
        _fmt(p.fidelity, digits=digits), _fmt(_delta(p.ea, base.ea), True, digits),
        _fmt(_delta(p.ma, base.ma), True, digits), _fmt(_delta(p.combined, base.combined), True, digits),
        _fmt(forgetting(paper, k), digits=digits),
    ] for k, p in enumerate(paper)]


def _summary_table(title: str, columns: tuple[str, ...], rows: list[list[str]], caption: str) -> Table:
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, caption=caption)
    for col in columns:
        if col == "phase":
            table.add_column(col, no_wrap=True, max_width=14, overflow="ellipsis")
        else:
            table.add_column(col, justify="right", no_wrap=True, min_width=max(6, len(col)))
    for row in rows:
        table.add_row(*row)
    return table


def rich_tables(manifest: RunManifest, tasks: list[str], settings: dict | None = None,
                label: str | None = None, view: str = "paper") -> list[Table]:
    """The ability summary (rows: phases) in the paper's aggregates or, with view="unit", per
    scoring unit with MA seen / unseen; then the per-task primary metrics (rows: tasks)."""
    from rich import box

    manifest = result_set(manifest, settings, label)
    scores = phase_scores(manifest, tasks)
    if view == "paper":
        summary = _summary_table(
            "The paper's aggregates: English task ability (EA), multilingual ability (MA), Combined",
            _PAPER_SHORT, paper_rows(paper_scores(scores), digits=3),
            "benchmark first; LF: language fidelity, beside MA. Δ…0: vs phase 0. forget: EA drop from its best. "
            + paper_coverage(scores).short() + " Per unit, MA seen / unseen: report.md.")
    elif view == "unit":
        summary = _summary_table(
            "English task ability (EA), multilingual ability (MA-s seen, MA-u unseen)", _SHORT,
            summary_rows(scores, digits=3),
            f"Δ…0: vs phase 0. Δ…b: vs the best earlier phase. forget: EA drop from its best. BWT "
            f"{_fmt(backward_transfer(manifest, scores), True, 3)}; seen: "
            f"{', '.join(sorted(seen_languages(manifest))) or '-'}")
    else:
        raise ValueError(f"view: expected one of {VIEWS}, got {view!r}")
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


def _paper_section(scores: list[PhaseScores]) -> list[str]:
    """report.md's first section: the paper's aggregates, the per-benchmark means behind them, and
    what they cover."""
    paper = paper_scores(scores)
    keys = sorted({key for p in paper for key in p.benchmarks}, key=lambda k: (("EA", "MA", "LF").index(k[0]), k[1]))
    languages: dict[tuple[str, str], set[str]] = {}
    for s in scores:
        for unit in s.units:
            semantics = s.semantics[unit]
            bench = benchmark_of(unit, semantics)
            languages.setdefault((_paper_group(semantics, bench), bench), set()).add(semantics.language)
    return [
        "## The paper's aggregates (benchmark first)",
        "",
        "EA: the mean over English benchmarks; MA: the mean over multilingual benchmarks, each averaged over its "
        "languages first; Combined = (EA + MA) / 2. Language fidelity is reported beside MA, not inside it.",
        "",
        *_phase_table(PAPER_COLUMNS, paper_rows(paper)),
        "",
        *(f"- {note}." for note in paper_coverage(scores).notes()),
        "",
        "| benchmark | counts toward | languages | " + " | ".join(f"{p.index} {p.name}" for p in paper) + " |",
        "|---|---|---|" + "---:|" * len(paper),
        *(f"| {bench} | {group} | {', '.join(sorted(languages[(group, bench)]))} | "
          + " | ".join(_fmt(p.benchmarks.get((group, bench))) for p in paper) + " |" for group, bench in keys),
        "",
    ]


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
        *_paper_section(scores),
        "## Abilities per phase, per scoring unit (the finer view)",
        "",
        "Every unit counts once; MA is split by whether the unit's language was trained in this run, and "
        "language fidelity counts inside it.",
        "",
        *_phase_table(SUMMARY_COLUMNS, summary_rows(scores)),
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
        "The paper's aggregates average each benchmark over its languages first; the finer view averages the "
        "primary metrics above directly. Definitions: `cft_adapters/report.py`.",
        "",
    ]
    if not label and (run_dir / "loss_curve.png").is_file():
        lines += ["## Training loss", "", "![training loss per phase](loss_curve.png)", ""]
    from cft_adapters.rundir import inside

    path = run_dir / (f"report-{label}.md" if label else "report.md")
    inside(run_dir, path)
    write_atomic(path, "\n".join(lines))
    return path
