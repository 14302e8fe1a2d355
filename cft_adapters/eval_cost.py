"""What scoring one checkpoint costs, before anything runs: requests and tokens per task, and time.

Per scoring unit (task_semantics' units: a task, or an lm-eval group such as `mmlu` counted as one)
the facts come from `data/eval_costs.json`: test-split size, request kind, prompt and generated
tokens per example. Limits apply per leaf task, as lm-eval applies them (`eval.limits` by name, else
`eval.limit`): `limits: {mmlu: 20}` scores 20 questions in each of MMLU's 57 subjects.

Time = prompt tokens / prefill throughput + generated tokens / decode throughput, with throughputs
from `benchmarks/results/eval_throughput.json` (written by `benchmarks/eval_throughput.py`): the
entry measured for this model on this device when there is one, else the reference entry for a
7-8B NF4 model on a 24 GB GPU, which says how it was obtained.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cft_adapters.errors import CftError

COSTS_FILE = Path(__file__).parent / "data" / "eval_costs.json"
THROUGHPUT_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "eval_throughput.json"
REFERENCE = "reference-7b-nf4-24gb"


@lru_cache(maxsize=1)
def unit_facts() -> dict[str, dict[str, Any]]:
    return json.loads(COSTS_FILE.read_text(encoding="utf-8"))["units"]


def facts_for(unit: str) -> dict[str, Any] | None:
    """The unit's facts: an exact entry, else the first matching pattern (e.g. 'xquad_*')."""
    table = unit_facts()
    if unit in table:
        return table[unit]
    for pattern, facts in table.items():
        if "*" in pattern and fnmatch.fnmatchcase(unit, pattern):
            if "docs_by_language" in facts:
                language = unit.rsplit("_", 1)[-1]
                if language not in facts["docs_by_language"]:
                    return None
                return {**facts, "docs": facts["docs_by_language"][language]}
            return facts
    return None


def limit_for(names: tuple[str, ...], limits: dict[str, int]) -> int | None:
    """The limit of a leaf task: `names` is the leaf, then the groups above it, innermost first. An
    exact name wins (the innermost one); else the longest glob pattern matching any of the names."""
    for name in names:
        if name in limits:
            return limits[name]
    matching = [key for key in limits if any(c in key for c in "*?[") and any(fnmatch.fnmatchcase(n, key) for n in names)]
    return limits[max(matching, key=len)] if matching else None


def examples_limit(names: tuple[str, ...], limits: dict[str, int], limit: float | None,
                   size: int | None = None) -> int | None:
    """How many examples of a leaf task are scored: its `limits` entry (limit_for), else `limit`, a
    count, or a fraction of `size` (None when the size is not known). None: the whole task."""
    n = limit_for(names, limits)
    if n is not None or limit is None:
        return n
    if limit >= 1:
        return int(limit)
    return math.ceil(size * limit) if size is not None else None


def limit_problems(limits: dict[str, int], units: dict[str, tuple[str, ...]]) -> list[str]:
    """A limit that applies to nothing scored is a typo: one message per such key."""
    problems = []
    for key in limits:
        if not any(limit_for((unit, *reversed(above)), {key: 1}) for unit, above in units.items()):
            close = [u for u in units if key.rstrip("*") and u.startswith(key.rstrip("*")[:4])][:3]
            hint = f" (scored tasks include {', '.join(close)})" if close else ""
            problems.append(f"eval.limits.{key}: matches none of the tasks eval.tasks scores{hint}")
    return problems


@dataclass
class UnitCost:
    unit: str
    kind: str  # loglikelihood | generate
    docs: int  # examples scored
    full_docs: int  # the test split
    requests: int
    prompt_tokens: int
    gen_tokens: int  # typical
    max_gen_tokens: int  # at most
    judged: bool


def unit_cost(unit: str, limit: float | None, per_unit_limit: int | None) -> UnitCost | None:
    facts = facts_for(unit)
    if facts is None:
        return None
    full = int(facts["docs"])
    leaves = int(facts.get("leaves", 1))
    docs = full
    if per_unit_limit is not None:
        docs = min(full, leaves * per_unit_limit)
    elif limit is not None:
        docs = min(full, math.ceil(full * limit) if limit < 1 else leaves * int(limit))
    choices = int(facts.get("choices", 1))
    generate = facts["kind"] == "generate"
    return UnitCost(
        unit=unit, kind=facts["kind"], docs=docs, full_docs=full, requests=docs * choices,
        prompt_tokens=docs * choices * int(facts["prompt_tokens"]),
        gen_tokens=docs * int(facts.get("gen_tokens", 0)) if generate else 0,
        max_gen_tokens=docs * int(facts.get("max_gen_tokens", 0)) if generate else 0,
        judged=bool(facts.get("judged")),
    )


@dataclass
class Throughput:
    name: str
    device: str
    prefill: float  # prompt tokens / s
    decode: float  # generated tokens / s, all sequences of a batch together
    batch_size: int
    how: str  # measured ... / assumed ...


def throughputs(path: Path = THROUGHPUT_FILE) -> list[Throughput]:
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["entries"]
        return [Throughput(r["name"], r["device"], float(r["prefill_tokens_per_s"]), float(r["decode_tokens_per_s"]),
                           int(r["batch_size"]), r["how"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CftError(f"{path}: not a throughput file ({exc}); rerun benchmarks/eval_throughput.py") from None


def this_device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def pick_throughput(model: str, entries: list[Throughput] | None = None, device: str | None = None) -> Throughput | None:
    """The entry measured for `model` on this device, else the 24 GB reference entry."""
    entries = throughputs() if entries is None else entries
    device = device or this_device()
    for entry in entries:
        if entry.name == model and entry.device == device:
            return entry
    return next((e for e in entries if e.name == REFERENCE), None)


@dataclass
class CheckpointCost:
    units: list[UnitCost]
    unknown: list[str]  # units without facts
    throughput: Throughput | None

    def seconds(self, unit: UnitCost, typical: bool = True) -> float | None:
        if self.throughput is None:
            return None
        gen = unit.gen_tokens if typical else unit.max_gen_tokens
        return unit.prompt_tokens / self.throughput.prefill + gen / self.throughput.decode

    def total_seconds(self, typical: bool = True) -> float | None:
        if self.throughput is None:
            return None
        return sum(self.seconds(u, typical) or 0.0 for u in self.units)


def checkpoint_cost(units: list[str], limit: float | None, limits: dict[str, int], groups: dict[str, tuple[str, ...]],
                    model: str, entries: list[Throughput] | None = None) -> CheckpointCost:
    """The cost of scoring `units` once. `groups`: unit -> the groups above it, outermost first (a
    limit on a group applies to its members)."""
    costs, unknown = [], []
    for unit in units:
        per_unit = limit_for((unit, *reversed(groups.get(unit, ()))), limits)
        cost = unit_cost(unit, limit, per_unit)
        (costs.append(cost) if cost else unknown.append(unit))
    return CheckpointCost(costs, unknown, pick_throughput(model, entries))


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
