"""The package's import structure: the core never imports the plugin or the CLI, the plugin never
imports the CLI, and no two modules import each other, directly or in a loop (every import
counts, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "napari_maskclip"
SRC = Path(__file__).resolve().parents[1] / "src"


def module_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (resolved to the deepest existing module)."""
    files = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path

    def existing(dotted: str) -> str | None:
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                heads = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                head = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                heads = [f"{head}.{alias.name}" for alias in node.names] + [head]
            else:
                continue
            for head in heads:
                target = existing(head) if head and head.startswith(PACKAGE) else None
                # A module's own package (its __init__) is not a dependency worth a cycle.
                if target and target != name and not name.startswith(target + "."):
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str:
    for part in ("plugin", "cli"):
        if module == f"{PACKAGE}.{part}" or module.startswith(f"{PACKAGE}.{part}."):
            return part
    return "core"


def test_no_import_cycles():
    graph = module_graph()
    assert f"{PACKAGE}.plugin._qt.segment_panel" in graph and len(graph) > 50
    assert cycles(graph) == []


def test_the_core_and_the_plugin_import_no_layer_above_them():
    allowed = {"core": {"core"}, "plugin": {"core", "plugin"}, "cli": {"core", "plugin", "cli"}}
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in module_graph().items()
        for target in targets
        if layer_of(target) not in allowed[layer_of(module)]
    )
    assert wrong == []


def test_the_checks_see_cycles_and_layer_breaks():
    """Guards the checks above: a loop and a core -> plugin import are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of(f"{PACKAGE}.plugin.layers") == "plugin"
    assert layer_of(f"{PACKAGE}.cli.demo") == "cli" and layer_of(f"{PACKAGE}.stacks") == "core"
    graph = module_graph()
    # The CLI's demo opens napari with the plugin: a CLI -> plugin import, which is allowed.
    assert f"{PACKAGE}.plugin.sample_data" in graph[f"{PACKAGE}.cli.demo"]
