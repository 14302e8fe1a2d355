"""One formatter for the errors of every YAML file the package validates (recipes and studies):
one line per key path, `file: key.path: what was expected`, with a did-you-mean for unknown keys."""

from __future__ import annotations

import difflib
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


def format_loc(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_lines(exc: ValidationError, source: str, root: type[BaseModel], covered: set[str] = frozenset()) -> list[str]:
    """One line per key path of a file validated against `root`. `covered`: paths whose cross-key
    rules a raw pass reported already."""
    by_loc: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        where = format_loc(loc) or "(top level)"
        if err["type"] == "value_error" and where in covered:
            continue
        if err["type"] == "extra_forbidden":
            allowed = allowed_keys(root, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown key; " + (f"did you mean '{hint[0]}'? " if hint else "") + f"allowed: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = _short(err.get("input"))
            if got is not None and err["type"] != "value_error":
                msg += f", got {got}"
        if msg not in by_loc.setdefault(where, []):
            by_loc[where].append(msg)
    # A union field (e.g. str | list[int]) fails once per member: one line, alternatives joined.
    return [f"{source}: {where}: {' | or: '.join(msgs)}" for where, msgs in by_loc.items()]


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-member segments ('str', 'list[int]', 'literal[...]')."""
    cleaned = []
    for part in loc:
        if isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or part.startswith("function-")):
            continue
        cleaned.append(part)
    return tuple(cleaned)


def _short(value: Any) -> str | None:
    if isinstance(value, (dict, list)) and len(repr(value)) > 60:
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at `loc` accepts, found by walking the schema from `root`."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _model_of(model.model_fields[part].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, list, getattr(__import__("types"), "UnionType", Union)):
        for arg in get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None
