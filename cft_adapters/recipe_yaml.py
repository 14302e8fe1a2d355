"""Reading recipe YAML: safe loading that refuses duplicate keys, `extends` chains, paths made
absolute against the file that wrote them, and `key.path=value` overrides from the command line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from cft_adapters.config_errors import format_loc
from cft_adapters.errors import RecipeError

BUILTIN_PREFIX = "builtin:"


class _DuplicateKeys(yaml.YAMLError):
    def __init__(self, found: list[tuple[str, int, int]]):
        self.found = found  # (key path, first line, repeated line)
        super().__init__("; ".join(f"{loc}: duplicate key (lines {a} and {b})" for loc, a, b in found))


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is an error: plain YAML keeps
    the last silently. Keys merged in with `<<: *anchor` may still be overridden, as YAML intends."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        found = _duplicate_keys(node, self)
        if found:
            raise _DuplicateKeys(found)
        return self.construct_document(node)


def _duplicate_keys(root: yaml.Node, loader: yaml.SafeLoader) -> list[tuple[str, int, int]]:
    """Every key written twice in one mapping, with its key path and both lines, before construction."""
    found: list[tuple[str, int, int]] = []
    visited: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in visited:  # an alias: the anchored node was checked where it was written
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, (*loc, i)) for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges mappings, checked as written
                    stack.append((value_node, loc))
                    continue
                key = _key_of(key_node, loader)
                child = (*loc, str(key))
                line = key_node.start_mark.line + 1
                if key in first_line:
                    found.append((format_loc(child), first_line[key], line))
                else:
                    first_line[key] = line
                stack.append((value_node, child))
    return sorted(found, key=lambda item: item[2])


def _key_of(node: yaml.Node, loader: yaml.SafeLoader) -> Any:
    """The key as YAML constructs it (so `1` and `01` are one key), or its node text when unhashable."""
    if isinstance(node, yaml.ScalarNode):
        try:
            key = loader.construct_object(node)
            hash(key)
            return key
        except (yaml.YAMLError, TypeError):
            pass
    return (node.tag, repr(node.value))


def expand_path(value: str) -> Path:
    """Path(value) with '~' expanded. A path that cannot be one (a NUL character) or a '~user' with no
    home raises ValueError, which the schema reports at the key's path (never a traceback)."""
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL character")
    try:
        return Path(value).expanduser()
    except RuntimeError:  # '~nosuchuser/...': no home directory to expand to
        raise ValueError(f"cannot expand '{value.split('/', 1)[0]}': no such user's home directory") from None


def local_path(value: str, base_dir: Path) -> Path:
    """A local path as a recipe writes it: '~' expanded, relative to `base_dir` (the recipe's folder)."""
    path = expand_path(value)
    return (path if path.is_absolute() else base_dir / path).resolve()


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise RecipeError([f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, column {column}); "
                           "save the file as UTF-8"]) from None
    try:
        data = _safe_load(text)
    except RecursionError:
        raise RecipeError([f"{path}: not a recipe: its values are nested too deeply to read"]) from None
    except _DuplicateKeys as exc:
        raise RecipeError([f"{path}: {loc}: key written twice ({f'lines {a} and {b}' if a != b else f'both on line {a}'}); "
                           "YAML would silently keep only the last, so remove one" for loc, a, b in exc.found]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise RecipeError([f"{path}: not valid YAML (line {line}): character #x{exc.character:04x} is not "
                           "allowed in YAML"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{path}: not valid YAML{where}: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: expected a mapping of recipe keys at the top level, got {type(data).__name__}"])
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError([f"{path}: extends: cycle {cycle}"])
    data = _absolutize_paths(_read_yaml(path), path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError([f"{path}: extends: expected a path to another recipe, got {parent!r}"])
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file():
        raise RecipeError([f"{path}: extends: recipe file not found: {parent_path}"])
    return deep_merge(_read_with_extends(parent_path, (*chain, resolved)), data)


def _absolutize_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Relative data paths are relative to the file that wrote them, also through `extends`; '~' is
    expanded. A path that cannot be resolved is left as written, for the schema to report at its key."""

    def absolute(value: Any) -> Any:
        if not isinstance(value, str) or value.startswith(BUILTIN_PREFIX):
            return value
        try:
            return str(local_path(value, base_dir))
        except ValueError:
            return value

    def fix(src: Any) -> None:
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            src["path"] = absolute(src["path"])

    analysis = data.get("analysis")
    for key in ("drift_probe", "forgetting_model"):
        if isinstance(analysis, dict) and isinstance(analysis.get(key), str):
            analysis[key] = absolute(analysis[key])
    ev = data.get("eval")
    if isinstance(ev, dict) and isinstance(ev.get("include_path"), list):
        ev["include_path"] = [absolute(p) for p in ev["include_path"]]
    for phase in data.get("phases") or []:
        if not isinstance(phase, dict):
            continue
        for src in phase.get("datasets") or [] if isinstance(phase.get("datasets"), list) else []:
            fix(src)
        if isinstance(phase.get("replay"), dict):
            fix(phase["replay"].get("prompts"))
            fix(phase["replay"].get("source"))
        placement = phase.get("placement")
        reference = placement.get("reference") if isinstance(placement, dict) else None
        if isinstance(reference, dict):
            for key in ("base", "tuned"):
                value = reference.get(key)
                # A checkpoint folder relative to this file; a hub id ('org/name') is left as it is.
                if isinstance(value, str) and "\0" not in value and not value.startswith(("/", "~")) and (
                    value.startswith(".") or (base_dir / value).is_dir()
                ):
                    reference[key] = absolute(value)
    return data


def deep_merge(base: Any, child: Any) -> Any:
    """Child wins. Mappings merge key by key. Lists of mappings that all carry a 'name' (phases) merge
    by name, keeping the base order and appending new names; any other list is replaced whole."""
    if isinstance(base, dict) and isinstance(child, dict):
        merged = dict(base)
        for key, value in child.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    if _named_list(base) and _named_list(child):
        merged_list = list(base)
        index = {item["name"]: i for i, item in enumerate(base)}
        for item in child:
            if item["name"] in index:
                merged_list[index[item["name"]]] = deep_merge(base[index[item["name"]]], item)
            else:
                merged_list.append(item)
        return merged_list
    return child


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                                           for v in value)


_OVERRIDE = re.compile(r"^(?P<key>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*)=(?P<value>.*)$", re.S)
_SEGMENT = re.compile(r"\.?([A-Za-z_]\w*)|\[(\d+)\]")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    match = _OVERRIDE.match(text)
    if not match:
        raise ValueError("expected key.path=value, e.g. phases[1].training.learning_rate=1e-4")
    segments: list[str | int] = [
        name if name else int(index) for name, index in _SEGMENT.findall(match.group("key"))
    ]
    try:
        value = _safe_load(match.group("value")) if match.group("value") != "" else None
    except RecursionError:
        raise ValueError("the value is nested too deeply to read") from None
    except _DuplicateKeys as exc:
        keys = ", ".join(f"'{loc}'" for loc, _, _ in exc.found)
        raise ValueError(f"the value writes {keys} twice; YAML would silently keep only the last") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"value is not valid YAML: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
    return segments, value


def apply_override(raw: dict[str, Any], text: str) -> None:
    segments, value = parse_override(text)
    node: Any = raw
    for depth, segment in enumerate(segments[:-1]):
        nxt = segments[depth + 1]
        where = format_loc(segments[: depth + 1])
        if isinstance(segment, int):
            if not isinstance(node, list) or segment >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ValueError(f"{where}: index out of range (the list has {size} items)")
            if node[segment] is None:
                node[segment] = [] if isinstance(nxt, int) else {}
            node = node[segment]
        else:
            if not isinstance(node, dict):
                raise ValueError(f"{where}: cannot set a key inside a {type(node).__name__}")
            if node.get(segment) is None:
                if isinstance(nxt, int):
                    raise ValueError(f"{where}: no list here to index")
                node[segment] = {}
            node = node[segment]
    last = segments[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ValueError(f"{format_loc(segments)}: index out of range")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise ValueError(f"{format_loc(segments[:-1])}: cannot set a key inside a {type(node).__name__}")
        node[last] = value
