"""`cft tables RUN_DIR[=PAIR]... | --study STUDY_DIR`: the paper's two tables from run directories,
with the paper's numbers beside ours (`cft_adapters/data/paper_numbers.json`).

- **Main table**: each run of no mitigation (and each mixed baseline), phase by phase: EA, MA,
  Combined, forgetting and language fidelity, in the paper's aggregates (report.paper_scores).
- **Mitigation table**: per pair, the last phase of the no-mitigation run and of every mitigation
  run (and a row for each of the paper's conditions, run or not): EA, MA, Combined and Δ vs no
  mitigation.

How a run finds its row, from what the run directory holds:
- **The mitigation** comes from what the recipe did, not from its name: replay in any phase is
  GR_<pct> (generative) or ER_<pct> (real); layer placement is LF_H1 (random), LF_H2 (most_changed,
  reference_change), Spectrum (spectrum) or LF_explicit; nothing is `none`; several are joined by
  `+`.
- **The pair** (similar / dissimilar / mixed): `mixed_baseline: true` is mixed; else `RUN_DIR=PAIR`
  on the command line; else the words of the recipe file name (run.json's `recipe`) and, for a study
  cell, its condition name: `dissimilar` or `instruct` mean dissimilar, `similar` similar. A run
  whose pair is not known keeps its recipe name as its row and gets no paper numbers.
- **The paper's model** comes from the base model id (`models.*.matches` in the data file), or
  `--paper-model`.
- **The paper's phase**: the last phase is the paper's Phase 2 (for mixed: its one model), the one
  before it Phase 1 (so for the Instruct pair, phase 0, the vendor's model, is Phase 1).

Runs that share the recipe, pair, mitigation and model (the seeds of a study) are averaged, and the
row says over how many. Each place where the comparison is not like for like is a numbered note:
QLoRA against the paper's full fine-tuning, an evaluation limit, a benchmark not scored (AlpacaEval
without a judge) or a stand-in for one, AlpacaEval's judge, a base model or pair the paper does not have.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cft_adapters.tasks_path import use_include_paths
from cft_adapters import report
from cft_adapters.errors import CftError
from cft_adapters.manifest import RESOLVED_RECIPE, write_atomic
from cft_adapters.paper_numbers import SETTINGS, PaperNumbers, paper_numbers
from cft_adapters.recipe import AdapterConfig, EvalConfig, ModelConfig
from cft_adapters.rundir import checked_manifest

# Our placement strategies under the paper's names (README, "Layer freezing").
PLACEMENT_NAMES = {"random": "LF_H1", "most_changed": "LF_H2", "reference_change": "LF_H2", "spectrum": "Spectrum",
                   "explicit": "LF_explicit"}
PHASE_TITLES = {"phase1": "Phase 1", "phase2": "Phase 2"}
METRICS = ("ea", "ma", "combined")


@dataclass
class Run:
    """One run directory as the tables see it."""

    path: Path
    recipe_name: str  # the recipe file's stem (run.json `recipe`)
    description: str | None
    base_model: str
    setting: str | None  # similar | dissimilar | mixed | None (not known)
    setting_from: str
    condition: str  # none | GR_5 | ... | A+B
    model: str | None  # the paper's model key
    training: str
    limit: float | None
    limits: dict[str, int]  # eval.limits: examples per task, by task name or pattern
    judge: str | None  # the AlpacaEval judge, when one scored it
    phases: list[report.PaperScores]
    roles: list[str | None]  # per phase: the paper's phase1 / phase2, or None
    coverage: report.PaperCoverage


@dataclass
class Group:
    """Runs that differ only in their seed."""

    runs: list[Run] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]

    def mean(self, k: int, attr: str) -> float | None:
        values = [v for r in self.runs if k < len(r.phases) for v in [_value(r, k, attr)] if v is not None]
        return sum(values) / len(values) if values else None


def _value(run: Run, k: int, attr: str) -> float | None:
    if attr == "forgetting":
        return report.forgetting(run.phases, k)
    return getattr(run.phases[k], attr)


def condition_of(phases: list[dict[str, Any]]) -> str:
    """The mitigation a recipe's phases apply, in the paper's names."""
    names = []
    for phase in phases:
        replay, placement = phase.get("replay") or {}, phase.get("placement") or {}
        if replay:
            prefix = {"generative": "GR", "real": "ER"}.get(replay.get("kind"), f"replay_{replay.get('kind')}")
            names.append(f"{prefix}_{round(float(replay.get('ratio', 0)) * 100):g}")
        strategy = placement.get("strategy", "none")
        if strategy != "none":
            names.append(PLACEMENT_NAMES.get(strategy, f"placement_{strategy}"))
    return "+".join(dict.fromkeys(names)) or "none"


def setting_of(facts: RecipeFacts, recipe_name: str, given: str | None, hint: str | None) -> tuple[str | None, str]:
    if facts.mixed_baseline:
        return "mixed", "mixed_baseline: true"
    if given is not None:
        return given, "the command line"
    for source, text in (("the recipe's name", recipe_name), ("the study condition's name", hint)):
        words = set(re.split(r"[^a-z0-9]+", (text or "").lower()))
        if words & {"dissimilar", "instruct"}:
            return "dissimilar", source
        if "similar" in words:
            return "similar", source
    return None, "neither the recipe's name nor the command line"


def _training(facts: RecipeFacts) -> str:
    base = "an NF4 base (QLoRA)" if facts.model.quantization == "nf4" else f"a {facts.model.compute_dtype} base"
    return f"LoRA r={facts.adapter.r} on {base}"


def _roles(n_phases: int, mixed: bool) -> list[str | None]:
    roles: list[str | None] = [None] * n_phases
    if n_phases >= 2:
        roles[-1] = "phase2"
        if not mixed:
            roles[-2] = "phase1"
    return roles


@dataclass(frozen=True)
class RecipeFacts:
    """What the tables need of the recipe a run ran."""

    description: str | None
    model: ModelConfig
    adapter: AdapterConfig
    eval: EvalConfig
    mixed_baseline: bool
    condition: str


def recipe_facts(run_dir: Path) -> RecipeFacts:
    """From the run's recipe.resolved.yaml, section by section, like rundir.run_settings: the data
    sources are not validated, since they need not exist where the run directory is read (a run
    copied from the machine that trained it), and nothing here reads them."""
    path = run_dir / RESOLVED_RECIPE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return RecipeFacts(  # a mixed baseline's phases carry no replay or placement (recipe_rules refuses them)
            description=raw.get("description"), model=ModelConfig.model_validate(raw["model"]),
            adapter=AdapterConfig.model_validate(raw.get("adapter") or {}),
            eval=EvalConfig.model_validate(raw.get("eval") or {}),
            mixed_baseline=bool(raw.get("mixed_baseline", False)), condition=condition_of(list(raw.get("phases") or [])),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise CftError(f"{path}: cannot read the run's recipe: {where}: {err['msg']}") from None
    except (OSError, KeyError, TypeError, AttributeError, ValueError, yaml.YAMLError) as exc:
        raise CftError(f"{path}: cannot read the run's recipe: {str(exc).splitlines()[0]}") from None


def read_run(run_dir: Path, given: str | None = None, hint: str | None = None, paper_model: str | None = None) -> Run:
    """A run directory's scores in the paper's aggregates, under the run's own evaluation settings."""
    manifest = checked_manifest(run_dir)
    recipe = recipe_facts(run_dir)
    use_include_paths(recipe.eval.include_path)
    if not recipe.eval.tasks:
        raise CftError(f"{run_dir}: the recipe scores nothing (eval.tasks: []); nothing to tabulate")
    recorded = [r.eval_settings for r in manifest.phases if r.eval_status == "done" and r.eval_settings]
    own = recorded[0] if recorded else None
    scores = report.phase_scores(report.result_set(manifest, own), recipe.eval.tasks)
    recipe_name = Path(manifest.recipe).stem
    setting, setting_from = setting_of(recipe, recipe_name, given, hint)
    limit = (own or {}).get("limit", recipe.eval.limit)
    return Run(
        path=run_dir, recipe_name=recipe_name, description=recipe.description, base_model=manifest.base_model,
        setting=setting, setting_from=setting_from, condition=recipe.condition,
        model=paper_model or paper_numbers().model_for(manifest.base_model), training=_training(recipe),
        limit=limit, limits=(own or {}).get("limits", recipe.eval.limits) or {}, judge=_judge(own, recipe), phases=report.paper_scores(scores), roles=_roles(len(scores), recipe.mixed_baseline),
        coverage=report.paper_coverage(scores),
    )


def _judge(own: dict[str, Any] | None, recipe: Any) -> str | None:
    from cft_adapters.alpacaeval import describe
    from cft_adapters.recipe import JudgeConfig

    recorded = (own or {}).get("judge")
    judge = JudgeConfig.model_validate(recorded) if recorded else recipe.eval.judge
    return describe(judge) if judge is not None else None


def study_runs(study_dir: Path) -> list[tuple[Path, str]]:
    """A study's cells (<output_dir>/cells/<condition>/seed_<s>/) that have a run.json, with their condition."""
    cells = sorted(p.parent for p in study_dir.glob("cells/*/seed_*/run.json"))
    if not cells:
        raise CftError(f"{study_dir}: no cells/<condition>/seed_<s>/run.json here; is this a cft-study output_dir?")
    return [(cell, cell.parent.name) for cell in cells]


def parse_run_arg(arg: str) -> tuple[Path, str | None]:
    """RUN_DIR or RUN_DIR=PAIR."""
    if "=" in arg and not Path(arg).exists():
        path, _, pair = arg.rpartition("=")
        if pair not in SETTINGS:
            raise CftError(f"{arg}: expected RUN_DIR or RUN_DIR=PAIR with PAIR one of {', '.join(SETTINGS)}")
        return Path(path), pair
    return Path(arg), None


# --------------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------------


class Notes:
    """Numbered notes, each text once, in the order first used."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


def _group_key(run: Run) -> tuple:
    return (run.model or run.base_model, run.setting, run.condition, run.recipe_name)


def _groups(runs: list[Run]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for run in runs:
        groups.setdefault(_group_key(run), Group()).runs.append(run)
    return list(groups.values())


def _run_notes(group: Group, notes: Notes, paper: PaperNumbers) -> list[int]:
    run = group.first
    ids = [notes.add(f"ours: {run.training}; the paper: full fine-tuning")]
    if run.limit is not None:
        how = f"{run.limit:.0%} of each task" if run.limit < 1 else f"at most {run.limit:g} examples per task"
        ids.append(notes.add(f"scored on {how} (eval.limit); the paper scores the full test sets"))
    if run.limits:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(run.limits.items()))
        ids.append(notes.add(f"scored on at most this many examples per task (eval.limits): {listed}; the paper "
                             f"scores the full test sets"))
    ids += [notes.add(n) for n in run.coverage.notes()]
    if run.judge and "alpacaeval" in run.coverage.scored.get("EA", []):
        ids.append(notes.add(f"AlpacaEval judged by {run.judge}; AlpacaEval 2.0's own judge is GPT-4 Turbo"))
    if run.model is None:
        ids.append(notes.add(f"base {run.base_model} is none of the paper's models "
                             f"({', '.join(m.name for m in paper.models.values())}): paper: n/a "
                             f"(compare anyway with --paper-model)"))
    elif paper.model_for(run.base_model) != run.model:
        ids.append(notes.add(f"base {run.base_model} compared with the paper's {paper.models[run.model].name} "
                             f"(--paper-model)"))
    if run.setting == "dissimilar" and len(run.phases) > 2:
        ids.append(notes.add(f"the paper's dissimilar pair is {paper.settings['dissimilar']}, one training phase; "
                             f"this run trains {len(run.phases) - 1} phases (its own English phase first)"))
    if run.setting is None:
        ids.append(notes.add(f"pair not known from the recipe name '{run.recipe_name}': paper: n/a (give "
                             f"RUN_DIR=similar|dissimilar|mixed to compare)"))
    if len(group.runs) > 1:
        ids.append(notes.add(f"mean over {len(group.runs)} runs"))
    return ids


def _paper_main(paper: PaperNumbers, model: str | None, setting: str | None, role: str | None) -> dict[str, Any]:
    rows = {(r.model, r.setting, r.phase): r for r in paper.main.rows}
    row = rows.get((model, setting, role))
    out: dict[str, Any] = {"ea": None, "ma": None, "combined": None, "forgetting": None, "source": None}
    if row is None:
        return out
    out.update(ea=paper.to_unit(row.EA), ma=paper.to_unit(row.MA), combined=paper.to_unit(row.Combined),
               source=row.source)
    earlier = rows.get((model, setting, "phase1"))
    if role == "phase2" and earlier is not None and row.EA is not None and earlier.EA is not None:
        out["forgetting"] = max(0.0, paper.to_unit(earlier.EA) - paper.to_unit(row.EA))  # derived: EA1 - EA2
    return out


def _paper_mitigation(paper: PaperNumbers, model: str | None, condition: str) -> dict[str, Any]:
    rows = {(r.model, r.condition): r for r in paper.mitigation.rows}
    row, none = rows.get((model, condition)), rows.get((model, "none"))
    out: dict[str, Any] = {"ea": None, "ma": None, "combined": None, "source": None,
                           "vs_none": {m: None for m in METRICS}}
    if row is None:
        return out
    out.update(ea=paper.to_unit(row.EA), ma=paper.to_unit(row.MA), combined=paper.to_unit(row.Combined),
               source=row.source)
    if none is not None:
        base = {"ea": paper.to_unit(none.EA), "ma": paper.to_unit(none.MA), "combined": paper.to_unit(none.Combined)}
        out["vs_none"] = {m: _minus(out[m], base[m]) for m in METRICS}
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def main_rows(runs: list[Run], notes: Notes, paper: PaperNumbers) -> list[dict[str, Any]]:
    rows = []
    for group in _groups([r for r in runs if r.condition == "none" or r.setting == "mixed"]):
        run = group.first
        ids = _run_notes(group, notes, paper)
        for k, phase in enumerate(run.phases):
            role = run.roles[k]
            theirs = _paper_main(paper, run.model, run.setting, role)
            ours = {m: group.mean(k, m) for m in (*METRICS, "fidelity", "forgetting")}
            rows.append({
                "setting": run.setting, "setting_from": run.setting_from, "recipe": run.recipe_name,
                "model": run.model, "runs": [str(r.path) for r in group.runs], "n": len(group.runs),
                "phase": {"index": phase.index, "name": phase.name, "paper": role},
                "ours": ours, "paper": theirs,
                "delta": {m: _minus(ours[m], theirs[m]) for m in (*METRICS, "forgetting")},
                "notes": ids,
            })
    return rows


def _baseline(group: Group, candidates: list[Group]) -> Group | None:
    """The no-mitigation runs a mitigation is measured against: same model and pair, and, when several
    qualify, the one whose recipe name the mitigation's extends (mistral_dissimilar -> mistral_dissimilar_gr5)."""
    run = group.first
    same = [c for c in candidates if (c.first.model or c.first.base_model, c.first.setting)
            == (run.model or run.base_model, run.setting)]
    if len(same) > 1:
        same = [c for c in same if run.recipe_name.startswith(c.first.recipe_name)] or same
    return same[0] if len(same) == 1 else None


def mitigation_rows(runs: list[Run], notes: Notes, paper: PaperNumbers) -> list[dict[str, Any]]:
    """Per pair (model, setting), the no-mitigation row, then every condition: the paper's in its order
    (a row without a run of ours shows the paper's numbers alone), then any other of ours."""
    groups = _groups([r for r in runs if r.setting != "mixed"])
    baselines = [g for g in groups if g.first.condition == "none"]
    families: dict[tuple, list[Group]] = {}
    for g in groups:
        base = g if g.first.condition == "none" else _baseline(g, baselines)
        families.setdefault(_group_key((base or g).first), []).append(g)
    paper_conditions = list(dict.fromkeys(r.condition for r in paper.mitigation.rows))
    rows = []
    for family in families.values():
        none = next((g for g in family if g.first.condition == "none"), None)
        anchor = (none or family[0]).first
        base = {m: none.mean(len(none.first.phases) - 1, m) if none else None for m in METRICS}
        ours_conditions = [g.first.condition for g in family]
        for condition in dict.fromkeys([*paper_conditions, *ours_conditions]):
            runs_of = [g for g in family if g.first.condition == condition]
            theirs = _paper_mitigation(paper, anchor.model if anchor.setting else None, condition)
            for group in runs_of or [None]:
                rows.append(_mitigation_row(group, anchor, condition, base, theirs, notes, paper, none is not None))
    return rows


def _mitigation_row(group: Group | None, anchor: Run, condition: str, base: dict[str, float | None],
                    theirs: dict[str, Any], notes: Notes, paper: PaperNumbers, have_none: bool) -> dict[str, Any]:
    """One condition of one pair: the last phase of its runs (None: a condition no run of ours has)."""
    run = group.first if group else None
    k = len(run.phases) - 1 if run else 0
    ours = {m: group.mean(k, m) if group else None for m in (*METRICS, "fidelity")}
    ids = _run_notes(group, notes, paper) if group else []
    if run and run.setting == "similar":
        ids.append(notes.add(f"the paper's mitigations are on the dissimilar pair; this one is {run.setting}"))
    if run and condition != "none" and not have_none:
        ids.append(notes.add("no single no-mitigation run of this pair and model to compare with: Δ vs none "
                             "left out"))
    return {
        "setting": anchor.setting, "recipe": run.recipe_name if run else None, "model": anchor.model,
        "condition": condition, "runs": [str(r.path) for r in group.runs] if group else [],
        "n": len(group.runs) if group else 0,
        "phase": {"index": run.phases[k].index, "name": run.phases[k].name} if run else None,
        "ours": ours, "vs_none": {m: _minus(ours[m], base[m]) for m in METRICS},
        "paper": theirs, "delta": {m: _minus(ours[m], theirs[m]) for m in METRICS},
        "notes": ids,
    }


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    value = round(value, 3) + 0.0  # no "-0.000" from rounding noise
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _cell(ours: float | None, theirs: float | None, delta: float | None, signed: bool = False,
          have_run: bool = True) -> str:
    mine = _num(ours, signed) if have_run else "-"
    if theirs is None:
        return f"{mine} (paper: n/a)"
    if delta is None:
        return f"{mine} (paper: {_num(theirs, signed)})"
    return f"{mine} (paper: {_num(theirs, signed)}, Δ {_num(delta, True)})"


def _refs(ids: list[int]) -> str:
    return " ".join(f"[{i}]" for i in ids)


def markdown(result: dict[str, Any]) -> str:
    p = result["paper"]
    lines = [
        f"# The paper's tables: ours beside the paper's ({p['title']}, arXiv {p['arxiv']}, {p['compared_version']} "
        f"version)",
        "",
        "EA: English task ability, MA: multilingual ability, each benchmark averaged over its languages first; "
        "Combined = (EA + MA) / 2; LF: language fidelity, beside MA. Scores on 0-1; each cell: ours (paper, "
        "Δ = ours - paper).",
        "",
        f"Paper numbers: {p['numbers']} (`cft_adapters/data/paper_numbers.json`).",
        "",
        "## Main table: pairs x phases",
        "",
        "| pair | phase | EA | MA | Combined | forgetting | LF | notes |",
        "|---|---|---|---|---|---|---:|---|",
    ]
    for row in result["main"]:
        ph = row["phase"]
        o, t, d = row["ours"], row["paper"], row["delta"]
        phase = f"{ph['index']} {ph['name']}" + (f" ({PHASE_TITLES[ph['paper']]})" if ph["paper"] else "")
        lines.append(
            f"| {row['setting'] or row['recipe'] + ' (pair not known)'} | {phase} | "
            + " | ".join(_cell(o[m], t[m], d[m]) for m in (*METRICS, "forgetting"))
            + f" | {_num(o['fidelity'])} | {_refs(row['notes'])} |")
    if not result["main"]:
        lines.append("| (no run without a mitigation given) | | | | | | | |")
    lines += [
        "",
        "## Mitigation table: the last phase of each condition",
        "",
        "| pair | condition | EA | MA | Combined | ΔEA vs none | ΔMA vs none | ΔCombined vs none | LF | notes |",
        "|---|---|---|---|---|---|---|---|---:|---|",
    ]
    for row in result["mitigation"]:
        o, t, d, v = row["ours"], row["paper"], row["delta"], row["vs_none"]
        have = bool(row["runs"])
        lines.append(
            f"| {row['setting'] or '(pair not known)'} | {row['condition']}{'' if have else ' (no run)'} | "
            + " | ".join(_cell(o[m], t[m], d[m], have_run=have) for m in METRICS) + " | "
            + " | ".join(_cell(v[m], t["vs_none"][m], _minus(v[m], t["vs_none"][m]), True, have) for m in METRICS)
            + f" | {_num(o['fidelity']) if have else '-'} | {_refs(row['notes'])} |")
    if not result["mitigation"]:
        lines.append("| (no run given) | | | | | | | | | |")
    sources = sorted({r["paper"]["source"] for r in [*result["main"], *result["mitigation"]] if r["paper"]["source"]})
    lines += ["", "## Notes", "", *(f"{i}. {text}" for i, text in result["notes"].items()), ""]
    if sources:
        lines += ["The paper's numbers above come from: " + "; ".join(sources) + ".", ""]
    lines += ["## Runs", ""]
    for run in result["runs"]:
        lines.append(f"- `{run['run_dir']}`: recipe `{run['recipe']}`, base `{run['base_model']}`, pair "
                     f"{run['setting'] or 'not known'} (from {run['setting_from']}), mitigation {run['condition']}"
                     + (f". {run['description']}" if run["description"] else ""))
    return "\n".join(lines) + "\n"


def build(runs: list[Run], paper: PaperNumbers | None = None) -> dict[str, Any]:
    """Both tables, their notes and the runs behind them, as JSON-ready data."""
    paper = paper or paper_numbers()
    notes = Notes()
    main = main_rows(runs, notes, paper)
    mitigation = mitigation_rows(runs, notes, paper)
    transcribed = any(v is not None for r in [*paper.main.rows, *paper.mitigation.rows] for v in (r.EA, r.MA, r.Combined))
    return {
        "paper": {
            "title": paper.paper.get("title"), "arxiv": paper.paper.get("arxiv"),
            "compared_version": paper.paper.get("compared_version"), "versions": paper.paper.get("versions"),
            "numbers": ("as cited per row" if transcribed else
                        f"none transcribed yet, so every paper cell reads n/a; main: {paper.main.source}; "
                        f"mitigation: {paper.mitigation.source}"),
            "aggregation": paper.aggregation.model_dump(),
        },
        "main": main,
        "mitigation": mitigation,
        "notes": {str(i): text for i, text in enumerate(notes.texts, 1)},  # the ids rows refer to
        "runs": [{"run_dir": str(r.path), "recipe": r.recipe_name, "description": r.description,
                  "base_model": r.base_model, "paper_model": r.model, "setting": r.setting,
                  "setting_from": r.setting_from, "condition": r.condition, "training": r.training,
                  "eval_limit": r.limit, "eval_limits": r.limits} for r in runs],
    }


def tables(run_args: list[str], study: str | None = None, out: str | None = None,
           paper_model: str | None = None) -> str:
    """The markdown of both tables; with `out`, their JSON written there too."""
    paper = paper_numbers()
    if paper_model is not None and paper_model not in paper.models:
        raise CftError(f"--paper-model: expected one of {', '.join(paper.models)}, got {paper_model!r}")
    wanted = [(*parse_run_arg(a), None) for a in run_args]
    if study:
        wanted += [(path, None, condition) for path, condition in study_runs(Path(study))]
    if not wanted:
        raise CftError("give run directories (RUN_DIR or RUN_DIR=similar|dissimilar|mixed) or --study STUDY_DIR")
    runs = [read_run(path, given, hint, paper_model) for path, given, hint in wanted]
    result = build(runs, paper)
    if out:
        write_atomic(Path(out), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return markdown(result)
