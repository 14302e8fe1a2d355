"""The package's import graph has no cycles, counting imports inside functions too (a cycle hidden in
a function is still a cycle: it only fails later, at the call)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cft_adapters"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t not in (name, "cft_adapters")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "cft_adapters.modeling" in import_graph()["cft_adapters.fetch"]  # fetch imports it inside main()


# The layers, bottom to top, and each module's layer: the module table of docs/DESIGN.md, read here so
# the document cannot drift from the code. A module imports only from its own layer or below, so the
# building blocks never reach up into the runner or a command, and `analysis` never imports the
# training runner (it is handed one where it needs training: `cft analyze mpd`).
DESIGN = PACKAGE.parent / "docs" / "DESIGN.md"
LAYER_NAMES = ["base", "config", "blocks", "analysis", "train", "commands", "cli"]


def design_layers() -> list[tuple[str, set[str]]]:
    rows = re.findall(r"^\| `([\w.]+)` \| (\w+) \|", DESIGN.read_text(encoding="utf-8"), flags=re.M)
    unknown = sorted({layer for _, layer in rows} - set(LAYER_NAMES))
    assert not unknown, f"{DESIGN}: unknown layer(s) {unknown}; expected one of {LAYER_NAMES}"
    return [(name, {module for module, layer in rows if layer == name}) for name in LAYER_NAMES]


LAYERS = design_layers()


def _layer_of(module: str) -> int:
    short = module.removeprefix("cft_adapters.") if module != "cft_adapters" else module
    found = [i for i, (_, members) in enumerate(LAYERS) if short in members]
    assert len(found) == 1, f"{module}: give it exactly one row in the module table of docs/DESIGN.md"
    return found[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} ({LAYERS[_layer_of(a)][0]}) imports {b} ({LAYERS[_layer_of(b)][0]})"
        for a, targets in graph.items() for b in targets if _layer_of(b) > _layer_of(a)
    )


def test_every_module_has_a_layer_and_imports_only_downwards() -> None:
    assert layer_violations(import_graph()) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {"cft_adapters.analysis.drift": {"cft_adapters.phases"}, "cft_adapters.phases": set()}
    assert layer_violations(graph) == ["cft_adapters.analysis.drift (analysis) imports cft_adapters.phases (train)"]


def test_the_design_document_lists_no_module_that_does_not_exist() -> None:
    listed = {m for _, members in LAYERS for m in members}
    existing = {name.removeprefix("cft_adapters.") if name != "cft_adapters" else name for name in import_graph()}
    assert listed - existing == set()
