"""The freed-graph findings drawn: the shared subgraph of GP101 / GP102 as a rich tree with the user's lines."""

from __future__ import annotations

import inspect
import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

import gradprobe
from gradprobe.report.graph_tree import graph_tree


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno  # type: ignore[union-attr]


def two_heads() -> tuple[gradprobe.Trace, dict[str, int]]:
    backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    model = nn.ModuleDict({"backbone": backbone, "a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    lines = {}
    with gradprobe.trace(model, on_finding="record") as t:
        feats = backbone(torch.randn(3, 4))
        lines["feats"] = _line() - 1
        hidden = feats * 2
        lines["hidden"] = _line() - 1
        loss_a = model["a"](hidden).pow(2).mean()
        loss_b = model["b"](hidden).pow(2).mean()
        loss_a.backward()
        with pytest.raises(RuntimeError, match="second time"):
            loss_b.backward()
    return t, lines


def _nodes(node: dict) -> list[dict]:
    return [node] + [n for child in node.get("children", ()) for n in _nodes(child)]


def test_gp101_carries_the_shared_subgraph() -> None:
    """GP101's data holds the shared nodes that held saved tensors, each with its variable and line."""
    t, lines = two_heads()
    (gp101,) = [f for f in t.findings if f.code == "GP101"]
    nodes = _nodes(gp101.data["graph"]["root"])
    named = {n["name"]: n["line"][1] for n in nodes if n.get("name")}
    assert named == {"hidden": lines["hidden"], "feats": lines["feats"]}
    assert all(n["state"] == "freed" for n in nodes)
    assert any("model.backbone.0.weight" in n["params"] for n in nodes)
    json.dumps(gp101.to_dict())  # JSON-safe, for to_dict() and the CLI's --json


def test_tree_is_drawn_in_the_report() -> None:
    """The report draws one tree per GP101 / GP102 with the source lines."""
    t, _ = two_heads()
    out = io.StringIO()
    t.report(console=Console(file=out, width=120))
    text = out.getvalue()
    assert text.count("where the two backward calls meet") == 2
    assert "hidden = feats * 2" in text and "feats = backbone(" in text and "backbone.0.weight" in text
    (gp102,) = [f for f in t.findings if f.code == "GP102"]
    assert graph_tree(gp102) is not None


def test_no_tree_without_freed_graph_findings() -> None:
    """A clean trace has no tree section; a finding of another code draws none."""
    model = nn.Linear(3, 1)
    with gradprobe.trace(model, on_finding="record") as t:
        model(torch.randn(2, 3)).sum().backward()
    out = io.StringIO()
    t.report(console=Console(file=out, width=120))
    assert "where the two backward calls meet" not in out.getvalue()
    assert graph_tree(gradprobe.Finding(code="GP503", kind="x", severity="info", message="m")) is None


def test_tree_is_bounded_on_a_deep_graph() -> None:
    """A 200-layer shared chain draws at most 40 nodes and says how many it left out."""
    w = nn.Parameter(torch.ones(3))
    with gradprobe.trace(w, on_finding="record") as t:
        h = w
        for _ in range(200):
            h = torch.tanh(h * 1.01)
        a, b = h.sum(), h.mean()
        a.backward()
        with pytest.raises(RuntimeError):
            b.backward()
    (gp101,) = [f for f in t.findings if f.code == "GP101"]
    graph = gp101.data["graph"]
    assert graph["nodes"] == 40 and graph["folded"] > 0
