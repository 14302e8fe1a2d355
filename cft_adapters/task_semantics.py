"""What each eval task means to the report: the ability it measures (EA or MA), its language and its
primary metric, as the task YAMLs in `lm_eval_tasks/` declare them.

Where the declarations live (lm-eval 0.4 passes `metadata` through untouched):
- A task of ours declares its own, in `metadata.cft`:
  `metadata: {version: 1.0, cft: {ability: MA, language: fr, metric: chrf, benchmark: smoke_ml}}`.
- lm-eval's own tasks and groups (ifeval, mmlu, xquad_fr, ...) cannot be edited. The group of ours
  that includes one declares it, in `metadata.cft.members`:
  `metadata: {version: 1.0, cft: {members: {mmlu: {ability: EA, language: en, metric: acc}}}}`.

The keys sit under `cft` because lm-eval calls a `custom_dataset` function with the metadata as
keyword arguments next to `dataset_kwargs`: a top-level `language` would collide with the smoke
tasks' `dataset_kwargs.language`.

`benchmark` (optional) names the benchmark the unit is one language of (`xquad` for every `xquad_<l>`):
the report's paper view averages a benchmark over its languages first, then the benchmarks
(report.py). Every shipped task declares one; a unit without one counts as a benchmark of its own,
and the report says so.

A declaration holds wherever the name is scored: `eval.tasks: [mmlu]` is classified by cft_en's
declaration as well. Two different declarations of one name are an error.

A *scoring unit* is a requested name, or a member of a group of ours, that has a declaration. A group
of ours without one is expanded into its members (the ones lm-eval scored, else the ones its YAML
lists), a tag of ours into its tasks. Anything else cannot be classified, and that is an error
naming it: a task missing from a table would otherwise drop out of EA/MA unnoticed.

The report reads the declarations from the YAMLs, by task name, rather than from the results files
the eval step writes: lm-eval's results carry task configs but not group configs (so not the
`members` declarations), and run directories scored before the declarations existed have none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from cft_adapters.errors import CftError

ABILITIES = ("EA", "MA")
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")  # ISO 639-1 (or -3) code
_BENCHMARK = re.compile(r"^[a-z][a-z0-9_]*$")
HOW_TO_DECLARE = ("declare metadata.cft: {ability: EA|MA, language: <code>, metric: <name>, benchmark: <name>} in "
                  "its task YAML, or, for lm-eval's own tasks, under metadata.cft.members of a group of ours that includes it "
                  "(lm_eval_tasks/README.md)")


class TaskSemanticsError(CftError):
    """An eval task the report cannot classify: no ability, language or primary metric declared,
    or a declaration that is malformed."""


@dataclass(frozen=True)
class Semantics:
    ability: str  # "EA" (English task ability) or "MA" (multilingual language ability)
    language: str
    metric: str  # the primary metric: one value on a 0-1 scale per unit feeds EA / MA
    # The benchmark this unit is one language of (the paper view's grouping); None: not declared.
    # Left out of ==, so that (ability, language, metric) compare as before; Catalog.declare compares it.
    benchmark: str | None = field(default=None, compare=False)


@dataclass
class Catalog:
    """The declarations of every task, group and tag in one task folder."""

    declared: dict[str, Semantics] = field(default_factory=dict)  # name -> its semantics
    declared_in: dict[str, Path] = field(default_factory=dict)  # name -> the YAML that declares it
    tasks: list[str] = field(default_factory=list)  # the tasks defined here
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> members its YAML lists
    tags: dict[str, list[str]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # name -> what is wrong with its declaration

    def declare(self, name: str, semantics: Semantics, path: Path) -> None:
        known = self.declared.get(name)
        if known is not None and (known != semantics or known.benchmark != semantics.benchmark):
            self.problems[name] = (f"declared twice, differently: {known} in {self.declared_in[name]}, "
                                   f"{semantics} in {path}")
        self.declared.setdefault(name, semantics)
        self.declared_in.setdefault(name, path)


def _parse(raw: Any, where: str) -> Semantics:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping {{ability, language, metric}}, got {raw!r}")
    missing = [key for key in ("ability", "language", "metric") if not raw.get(key)]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    ability, language, metric = raw["ability"], raw["language"], raw["metric"]
    if ability not in ABILITIES:
        raise ValueError(f"{where}.ability: expected EA or MA, got {ability!r}")
    if not isinstance(language, str) or not _LANGUAGE.match(language):
        raise ValueError(f"{where}.language: expected a language code such as 'en' or 'fr', got {language!r}")
    if not isinstance(metric, str):
        raise ValueError(f"{where}.metric: expected a metric name, got {metric!r}")
    benchmark = raw.get("benchmark")
    if benchmark is not None and not (isinstance(benchmark, str) and _BENCHMARK.match(benchmark)):
        raise ValueError(f"{where}.benchmark: expected a lower-case name such as 'xquad', got {benchmark!r}")
    unknown = sorted(set(raw) - {"ability", "language", "metric", "benchmark"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: ability, language, metric, benchmark)")
    return Semantics(ability, language, metric, benchmark)


class _Loader(yaml.SafeLoader):
    """lm-eval's YAML dialect, read as data: `!function utils.fn` stays a string."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _load(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One task YAML with its `include:`s applied as lm-eval applies them: the file's own keys win,
    and a mapping (such as `metadata`) replaces the included one whole. A file that is not a task
    YAML (not UTF-8, not YAML, not a mapping, an include cycle) is an error naming it."""
    if path in chain:
        raise CftError(f"{path}: include: cycle {' -> '.join(str(p) for p in (*chain, path))}")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        why = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise CftError(f"{path}: not a task YAML lm-eval can read{where}: {why}") from None
    if not isinstance(cfg, dict):
        raise CftError(f"{path}: not a task YAML: expected a mapping of task keys, got {type(cfg).__name__}")
    includes = cfg.pop("include", [])
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        if not isinstance(inc, str):
            raise CftError(f"{path}: include: expected a file name, got {inc!r}")
        merged.update(_load(path.parent / inc, (*chain, path)))
    merged.update(cfg)
    return merged


def _add(catalog: Catalog, name: str, cfg: dict[str, Any], path: Path) -> None:
    spec = (cfg.get("metadata") or {}).get("cft") or {}
    try:
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: metadata.cft: expected a mapping, got {spec!r}")
        if spec.keys() - {"members"}:
            own = {k: v for k, v in spec.items() if k != "members"}
            catalog.declare(name, _parse(own, f"{path}: metadata.cft"), path)
        members = spec.get("members") or {}
        if not isinstance(members, dict):
            raise ValueError(f"{path}: metadata.cft.members: expected a mapping of member names")
        for member, raw in members.items():
            try:
                catalog.declare(member, _parse(raw, f"{path}: metadata.cft.members.{member}"), path)
            except ValueError as exc:
                catalog.problems[member] = str(exc)
    except ValueError as exc:
        catalog.problems[name] = str(exc)


def load_catalog(root: Path) -> Catalog:
    catalog = Catalog()
    for path in sorted(root.rglob("*.yaml")):
        cfg = _load(path)
        if isinstance(cfg.get("group"), str):
            name = cfg["group"]
            catalog.groups[name] = [m if isinstance(m, str) else m.get("task", m.get("group")) for m in cfg.get("task") or []]
        elif isinstance(cfg.get("task"), str):
            name = cfg["task"]
            catalog.tasks.append(name)
            tags = cfg.get("tag") or []
            for tag in [tags] if isinstance(tags, str) else tags:
                catalog.tags.setdefault(tag, []).append(name)
        else:
            continue
        _add(catalog, name, cfg, path)
    return catalog


def catalog(root: Path | None = None) -> Catalog:
    """The declarations in `root` (default: the installed lm_eval_tasks folder and the include paths
    in use, tasks_path.task_dirs), read once."""
    from cft_adapters.tasks_path import task_dirs

    return _catalog((root,) if root is not None else task_dirs())


@lru_cache(maxsize=8)
def _catalog(roots: tuple[Path, ...]) -> Catalog:
    merged = Catalog()
    for root in roots:
        part = load_catalog(root)
        for name, semantics in part.declared.items():
            merged.declare(name, semantics, part.declared_in[name])
        merged.tasks += part.tasks
        for group, members in part.groups.items():
            merged.groups.setdefault(group, members)
        for tag, members in part.tags.items():
            merged.tags.setdefault(tag, []).extend(members)
        for name, problem in part.problems.items():
            merged.problems.setdefault(name, problem)
    return merged


def classify(requested: list[str], groups: dict[str, list[str]] | None = None,
             cat: Catalog | None = None, paths: dict[str, tuple[str, ...]] | None = None) -> dict[str, Semantics]:
    """The scoring units of `requested` with their semantics, in order. `groups` is what lm-eval
    scored (`eval_groups` in run.json: group -> members); a group missing there is expanded as its
    YAML lists it. `cat` defaults to the installed task folder's declarations. Raises
    TaskSemanticsError naming the first name that cannot be classified."""
    cat = cat or catalog()
    groups = groups or {}
    units: dict[str, Semantics] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in cat.problems:
            raise TaskSemanticsError(f"{_where(name, path)}: {cat.problems[name]}")
        if name in cat.declared:
            units.setdefault(name, cat.declared[name])
            if paths is not None:
                paths.setdefault(name, path)  # the groups and tags above it, outermost first
        elif name in cat.groups:
            for member in groups.get(name, cat.groups[name]):
                visit(member, (*path, name))
        elif name in cat.tags:
            for member in cat.tags[name]:
                visit(member, (*path, name))
        else:
            raise TaskSemanticsError(f"{_where(name, path)}: the report cannot classify it (no ability, language "
                                     f"or primary metric declared); {HOW_TO_DECLARE}")

    for name in requested:
        visit(name, ())
    return units


def _where(name: str, path: tuple[str, ...]) -> str:
    return f"eval task '{name}'" + (f" (in {' > '.join(path)})" if path else "")


def unclassified_tasks(names: list[str], cat: Catalog | None = None) -> list[str]:
    """One message per requested name that the report could not classify (for checks up front)."""
    problems = []
    for i, name in enumerate(names):
        try:
            classify([name], cat=cat)
        except TaskSemanticsError as exc:
            problems.append(f"eval.tasks[{i}]: {exc}")
    return problems
