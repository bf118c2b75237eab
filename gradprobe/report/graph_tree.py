"""The freed-graph findings drawn: a rich tree of where two backward calls meet (GP101 / GP102).

Place in the flow: report. Renders ``finding.data["graph"]``, which the ``freed_graph`` detector
builds while the graph is alive (NOTE [drawing where two losses meet] in
``gradprobe/detectors/_subgraph.py``): the shared nodes that held saved tensors, each with the user's
variable and the line that created it, and the traced parameters just below. A built-in report
section (``trace(..., disable=["report.graph_tree"])`` leaves it out).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.text import Text
from rich.tree import Tree

from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from gradprobe.api.trace import Trace
    from gradprobe.findings import Finding

__all__ = ["GraphTreeSection", "graph_tree"]

_CODES = ("GP101", "GP102")


def _label(node: dict[str, Any]) -> Text:
    if "ref" in node:
        return Text.assemble((f"#{node['ref']} ", "dim"), (node["op"], "dim"), (" (shown above)", "dim italic"))
    text = Text.assemble((f"#{node['id']} ", "dim"), (node["op"], "bold"))
    if node.get("state"):
        text.append(f"  saved tensors {node['state']}", style="red" if node["state"] == "freed" else "yellow")
    if node.get("name"):
        text.append(f"  `{node['name']}`", style="cyan")
    line = node.get("line")
    if line:
        text.append(f"  {os.path.basename(line[0])}:{line[1]}", style="blue")
        if node.get("source"):
            text.append(f"  {node['source']}", style="dim")
    params = node.get("params") or []
    if params:
        text.append("  ← " + ", ".join(params), style="green")
    return text


def _grow(tree: Tree, node: dict[str, Any]) -> None:
    branch = tree.add(_label(node))
    for child in node.get("children", ()):
        _grow(branch, child)


def graph_tree(finding: Finding) -> Tree | None:
    """The shared subgraph of a GP101 / GP102 ``finding`` as a rich Tree (None without graph data)."""
    graph = finding.data.get("graph") if finding.code in _CODES else None
    if not graph:
        return None
    where = f" at {finding.site}" if finding.site is not None else ""
    title = Text.assemble(
        (f"{finding.code}{where}", "bold"), " · where the two backward calls meet: the shared nodes that held saved tensors"
    )
    tree = Tree(title)
    _grow(tree, graph["root"])
    if graph.get("folded"):
        tree.add(Text(f"… {graph['folded']} more shared nodes not drawn", style="dim"))
    return tree


class GraphTreeSection:
    """One tree per GP101 / GP102 finding of the trace."""

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any] | None:
        trees = [tree for f in trace.findings if (tree := graph_tree(f)) is not None]
        return [Group(*trees)] if trees else None
