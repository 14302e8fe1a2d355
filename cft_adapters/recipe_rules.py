"""The recipe's rules across keys, checked on the raw (merged) dict so that they run even when a
field is invalid, and every problem shows at once. The schema's model validators call the same
functions, so a rule is written once."""

from __future__ import annotations

import re
from typing import Any


def source_problems(src: dict[str, Any]) -> list[str]:
    """Rules across the keys of one data source. Shared by the model validator and the raw-dict
    pass (which still runs when a field of the source is invalid, so all problems show at once)."""
    given = {k for k, v in src.items() if v is not None}
    problems = []
    if ("hub" in given) == ("path" in given):
        problems.append("set exactly one of 'hub' and 'path'")
    if ("language" in given) == ("language_column" in given):
        problems.append("set exactly one of 'language' and 'language_column'")
    fmt = src.get("format", "alpaca")
    if fmt == "columns" and "columns" not in given:
        problems.append("format 'columns' needs 'columns' (prompt, response)")
    if fmt != "columns" and "columns" in given:
        problems.append(f"'columns' is only used with format 'columns', not '{fmt}'")
    if {"max_examples", "fraction"} <= given:
        problems.append("set at most one of 'max_examples' and 'fraction'")
    hub_only = sorted(given & {"name", "data_files", "revision"} | ({"split"} if src.get("split", "train") != "train" else set()))
    if "path" in given and hub_only:
        problems.append(f"{', '.join(repr(k) for k in hub_only)} apply to 'hub' sources only (a local file has one split)")
    return problems


MAX_LAYERS = 10_000  # a layer index at or above this is no model's


def parse_layers(spec: str | list[int], num_layers: int | None = None) -> list[int]:
    """'0-7,12' or [0, 1] -> sorted unique indices, checked against num_layers when known."""
    if isinstance(spec, list):
        layers = list(spec)
    else:
        layers = []
        for part in (p.strip() for p in spec.split(",")):
            match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not match:
                raise ValueError(f"cannot read layer range '{part}' (expected e.g. '0-7,12')")
            lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
            if hi < lo:
                raise ValueError(f"layer range '{part}' runs backwards")
            if hi >= MAX_LAYERS:  # checked before the range is expanded (memory), whatever the model
                raise ValueError(f"layer range '{part}' goes past {MAX_LAYERS - 1:,}; no model has that many layers")
            layers.extend(range(lo, hi + 1))
    if num_layers is not None:
        bad = sorted({i for i in layers if i < 0 or i >= num_layers})
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (f", ... ({len(bad)} in all)" if len(bad) > 8 else "")
            raise ValueError(f"layer(s) [{shown}] out of range: the model has layers 0-{num_layers - 1}")
    return sorted(set(layers))


def _reads_true(value: Any) -> bool:
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(bool).validate_python(value) is True
    except ValidationError:
        return False


def raw_cross_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Rules that span keys, checked on the raw dict so they run even when fields are invalid."""
    problems: list[tuple[str, str]] = []
    phases = raw.get("phases")
    if not isinstance(phases, list):
        return problems
    if _reads_true(raw.get("mixed_baseline")):  # 1, "yes", ...: whatever the schema reads as true
        for i, phase in enumerate(phases):
            for key in ("placement", "replay", "training"):
                # A saved recipe.resolved.yaml lists every phase's training overrides, all null: not a setting.
                value = phase.get(key) if isinstance(phase, dict) else None
                if isinstance(value, dict) and all(v is None for v in value.values()):
                    continue
                if value:
                    problems.append((f"phases[{i}].{key}", "not used with mixed_baseline: the single mixed phase "
                                     "takes the top-level training settings"))
    seen: dict[str, int] = {}
    for i, phase in enumerate(phases):
        if not isinstance(phase, dict):
            continue
        name = phase.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append((f"phases[{i}].name", f"duplicate phase name '{name}' (also phases[{seen[name]}].name)"))
            seen.setdefault(name, i)
        placement = phase.get("placement")
        ref = placement.get("reference_phase") if isinstance(placement, dict) else None
        if isinstance(ref, str) and seen.get(ref, i) >= i:  # another type: the schema says what is expected
            problems.append((f"phases[{i}].placement.reference_phase", f"'{ref}' must name an earlier phase of this recipe"))
        replay = phase.get("replay")
        if isinstance(replay, dict) and replay.get("kind") == "real" and not replay.get("source") and i == 0:
            problems.append((f"phases[{i}].replay", "real replay without 'source' replays earlier phases' data, "
                             "and this is the first phase"))
        if isinstance(placement, dict) and placement.get("strategy") == "most_changed" and i == 0:
            problems.append((f"phases[{i}].placement.strategy", "'most_changed' ranks layers by an earlier trained "
                             "phase's adapter change, and this is the first phase; to rank them by how a reference "
                             "model changed (a vendor base -> its Instruct model), use strategy 'reference_change' "
                             "with 'reference: {base: ..., tuned: ...}'"))
        if isinstance(placement, dict) and isinstance(placement.get("layers"), str):
            try:
                parse_layers(placement["layers"])
            except ValueError as exc:
                problems.append((f"phases[{i}].placement.layers", str(exc)))
        datasets = phase.get("datasets")
        for j, src in enumerate(datasets if isinstance(datasets, list) else []):
            if isinstance(src, dict):
                problems += [(f"phases[{i}].datasets[{j}]", p) for p in source_problems(src)]
    return problems
