"""Finding the component losses of a backward's root: named ones and ``torch.nn.functional`` losses.

# NOTE [component losses]
# A root such as ``l_cls + 0.5 * l_box`` is split along a *cut* of its graph: walking down from the
# root, a walk stops at the first candidate loss it meets (a tensor named with ``t.name`` /
# ``t.losses``, or the output of an ``F.*loss`` function called inside the trace). The candidates met
# are the components; any candidate inside another component's graph is dropped (it is part of
# that one), and paths from the root that reach a leaf without meeting a component are the "rest"
# (a weight-decay term added by hand). Components with the same name (one ``cross_entropy@x.py:42``
# per pyramid level, made by a loop) form one group.

# NOTE [holding loss nodes]
# A discovered loss is often a temporary (``sum(F.cross_entropy(c, y) for c in levels)``): its
# tensor dies at once and only its grad_fn node lives on, inside the graph. Nodes cannot be
# weak-referenced, so the book holds the node (never the tensor) until the next backward that frees
# a graph (no retain_graph) returns, or the trace ends; a loss computed and never backwarded is
# dropped then too. Named losses (``t.name`` / ``t.losses``) are held by weak reference only.

# NOTE [loss functions seen by the interceptor]
# Every ``torch.nn.functional`` loss below checks ``has_torch_function`` and so reaches a
# TorchFunctionMode as ``func`` itself (checked on torch 2.13: the nn loss modules call them too).
# While the mode handles one, it is switched off, so the ops inside the loss are not seen again.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["LOSS_FUNCTIONS", "Component", "LossBook", "find_components"]

_LOSS_NAMES = (
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cosine_embedding_loss",
    "cross_entropy",
    "ctc_loss",
    "gaussian_nll_loss",
    "hinge_embedding_loss",
    "huber_loss",
    "kl_div",
    "l1_loss",
    "margin_ranking_loss",
    "mse_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "nll_loss",
    "poisson_nll_loss",
    "smooth_l1_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "triplet_margin_with_distance_loss",
)
LOSS_FUNCTIONS: tuple[Callable[..., Any], ...] = tuple(getattr(F, n) for n in _LOSS_NAMES if hasattr(F, n))

Candidate = Tuple[int, torch.Size, str, Hashable]  # output_nr, shape, display name, group key


@dataclass(frozen=True)
class Component:
    """One group of component losses of a root (tensors sharing one name), live for one backward."""

    name: str
    edges: tuple[Any, ...]  # GradientEdge per loss tensor of the group
    shapes: tuple[torch.Size, ...]
    leaves: frozenset[int]  # ids of the leaf tensors its graph reaches
    size: int  # nodes in its graph (the cost of a backward of it)


class LossBook:
    """Losses discovered inside one trace (see NOTE [holding loss nodes])."""

    def __init__(self) -> None:
        self._found: dict[Any, Candidate] = {}  # grad_fn node -> (output_nr, shape, name, group key)

    def add(self, out: Any, func: Callable[..., Any], frame: FrameType | None) -> None:
        """Remember the output of a loss function (called from the interceptor).

        Calls from one bytecode position (a loop over pyramid levels) share a group; two calls on
        one line are two groups.
        """
        if not isinstance(out, torch.Tensor) or out.grad_fn is None or out.numel() != 1:
            return
        name = getattr(func, "__name__", "loss")
        if frame is not None:
            name = f"{name}@{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
            key: Hashable = (frame.f_code, frame.f_lasti)
        else:
            key = name
        self._found.setdefault(out.grad_fn, (out.output_nr, out.shape, name, key))

    def release(self) -> None:
        """Drop every discovered loss (a backward freed its graph, or the trace ends)."""
        self._found.clear()

    def candidates(self, named: dict[int, tuple[Any, str]]) -> dict[Any, Candidate]:
        """Live candidate losses keyed by their ``grad_fn``; names given by the user win."""
        out: dict[Any, Candidate] = {}
        for ref, name in named.values():
            tensor = ref()
            if tensor is not None and tensor.grad_fn is not None and tensor.numel() == 1:
                out[tensor.grad_fn] = (tensor.output_nr, tensor.shape, name, ("named", name))
        for node, value in self._found.items():
            out.setdefault(node, value)
        return out  # named losses first (in naming order), then discovered ones (in call order)


def _walk(start: Any, stop: dict[Any, Any]) -> tuple[list[Any], set[int], set[Any]]:
    """Walk down from ``start``, stopping at candidate nodes: (candidates met, leaf ids reached, nodes)."""
    met: list[Any] = []
    leaves: set[int] = set()
    nodes: set[Any] = set()
    for node in _iter_until(start, stop):
        nodes.add(node)
        if node in stop and node is not start:
            met.append(node)
            continue
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
    return met, leaves, nodes


def _iter_until(start: Any, stop: dict[Any, Any]) -> Any:
    stack = [start]
    seen = {start}
    while stack:
        node = stack.pop()
        yield node
        if node in stop and node is not start:
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)


def find_components(
    root: torch.Tensor, candidates: dict[Any, Candidate]
) -> tuple[list[Component], frozenset[int], set[Any]]:
    """The component groups of ``root``, the ids of the leaves its rest (paths outside them) reaches,
    and every node of the root's graph (what gradprobe's extra passes may run)."""
    if root.grad_fn is None or not candidates:
        return [], frozenset(), set()
    met, rest_leaves, every = _walk(root.grad_fn, candidates)
    inner: set[Any] = set()
    reach: dict[Any, tuple[set[int], int]] = {}
    for node in met:
        _, leaves, nodes = _walk(node, {})
        every |= nodes
        nodes.discard(node)
        inner |= nodes.intersection(met)
        reach[node] = (leaves, len(nodes) + 1)
    order = {node: i for i, node in enumerate(candidates)}
    met.sort(key=order.__getitem__)
    groups: dict[Hashable, list[Any]] = {}
    for node in met:
        if node not in inner:
            groups.setdefault(candidates[node][3], []).append(node)
    components = []
    used: dict[str, int] = {}
    for nodes_ in groups.values():
        name = candidates[nodes_[0]][2]
        used[name] = used.get(name, 0) + 1
        if used[name] > 1:  # two calls on one line
            name = f"{name}#{used[name]}"
        leaves = set().union(*(reach[n][0] for n in nodes_))
        edges = tuple(GradientEdge(n, candidates[n][0]) for n in nodes_)
        shapes = tuple(candidates[n][1] for n in nodes_)
        components.append(Component(name, edges, shapes, frozenset(leaves), sum(reach[n][1] for n in nodes_)))
    # a candidate met from the root but also inside another component: the root's own path to it is rest
    for node in inner.intersection(met):
        rest_leaves |= reach[node][0]
    return components, frozenset(rest_leaves), every
