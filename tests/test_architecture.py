"""The package's import graph: data flows one way (ARCHITECTURE.md), with no cycles at run time.

Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted; imports inside
functions are (they run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gradprobe"

# Lower layers never import higher ones (ARCHITECTURE.md, "The rules").
LAYERS: list[tuple[str, ...]] = [
    ("gradprobe.exceptions", "gradprobe.findings", "gradprobe.hookspecs", "gradprobe._format"),
    ("gradprobe.ledger",),
    ("gradprobe.capture",),
    ("gradprobe.analysis",),
    ("gradprobe.detectors",),
    ("gradprobe.report",),
    ("gradprobe.api",),
    ("gradprobe.integrations", "gradprobe.__main__"),
]


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to ARCHITECTURE.md")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(source: str, module: str, is_package: bool) -> set[str]:
    """gradprobe modules ``module`` imports when it runs (not under ``if TYPE_CHECKING``)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _exists(candidate) else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return {m for m in found if m.startswith("gradprobe.") or m == "gradprobe"}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        module = ".".join(parts)
        # the facade is lazy (PEP 562): importing it imports nothing, so it is nobody's dependency
        graph[module] = runtime_imports(path.read_text(encoding="utf-8"), module, is_package) - {"gradprobe"}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imports in graph.items():
        if module == "gradprobe":
            continue
        for target in imports:
            if layer_of(target) > layer_of(module):
                bad.append(f"{module} imports {target} (layer {layer_of(target)} > {layer_of(module)})")
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a submodule imports its package's __init__ first; that edge is how Python works, not a cycle
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_every_module_belongs_to_a_layer() -> None:
    """Each module of the package is placed in the layer order (a new folder must be placed too)."""
    for module in package_graph():
        if module != "gradprobe":
            layer_of(module)


def test_no_upward_imports() -> None:
    """capture and ledger import nothing from analysis, detectors, report or integrations, and so on up."""
    assert upward_imports(package_graph()) == []


def test_no_import_cycles() -> None:
    """No two modules import each other at run time, directly or through others."""
    assert find_cycle(package_graph()) is None


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    """The checks above fail on a graph with an upward import or a cycle (they are not vacuous)."""
    graph = package_graph()
    graph["gradprobe.capture.recorder"] = graph["gradprobe.capture.recorder"] | {"gradprobe.report.tables"}
    assert upward_imports(graph) == [
        "gradprobe.capture.recorder imports gradprobe.report.tables (layer 5 > 2)"
    ]
    graph = package_graph()
    graph["gradprobe.capture.graph"] = graph["gradprobe.capture.graph"] | {"gradprobe.capture.targets"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"gradprobe.capture.graph", "gradprobe.capture.targets"}


def test_type_checking_imports_and_lazy_imports_are_told_apart() -> None:
    """Annotation-only imports are ignored; an import inside a function counts."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gradprobe.api.trace import Trace\n"
        "def f():\n    from gradprobe.report import tables\n"
    )
    assert runtime_imports(source, "gradprobe.capture.x", False) == {"gradprobe.report.tables"}


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_says_its_place(path: Path) -> None:
    """Every module opens with a docstring (its place in the flow)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc, f"{path} has no module docstring"
