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

__all__ = ["LOSS_CODE_NAMES", "LOSS_FUNCTIONS", "Component", "LossBook", "call_key", "find_components", "register_loss"]

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

# NOTE [loss functions outside torch.nn.functional]
# Loss functions written in Python elsewhere (torchvision.ops, detection and segmentation code) are
# plain functions the interceptor never sees. They are recognised by the name of the function
# whose frame computes a scalar (see analysis/loss_watch.py): every scalar with a graph made
# directly in such a frame is a candidate; scalars made on the way to the returned one fall inside
# its graph and are dropped as parts of it. The names below are those of torchvision.ops
# (sigmoid_focal_loss, the box IoU losses) and common re-implementations; plugins extend the
# registry with :func:`register_loss` (a function, or the name of one).
LOSS_CODE_NAMES: set[str] = {
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_jit",
    "py_sigmoid_focal_loss",
    "focal_loss",
    "softmax_focal_loss",
    "generalized_box_iou_loss",
    "distance_box_iou_loss",
    "complete_box_iou_loss",
    "giou_loss",
    "diou_loss",
    "ciou_loss",
    "iou_loss",
    "dice_loss",
    "sigmoid_dice_loss",
    "tversky_loss",
    "lovasz_softmax",
    "lovasz_hinge",
    "label_smoothing_cross_entropy",
    "info_nce",
    "info_nce_loss",
    "contrastive_loss",
    "triplet_loss",
}
_FRAMES_IN_KEY = 4  # call-stack depth that tells call sites apart (per decoder layer vs final layer)


def register_loss(function: Callable[..., Any] | str) -> None:
    """Recognise ``function`` (or any function of that name) as a loss while decomposing."""
    name = function if isinstance(function, str) else getattr(function, "__name__", None)
    if not name:
        raise TypeError(f"register_loss() takes a function or its name, got {function!r}")
    LOSS_CODE_NAMES.add(name)


def call_key(frame: FrameType | None) -> Hashable:
    """The call site of a loss: bytecode positions of the user's frames, innermost first.

    Calls from one place in a loop (one per pyramid level, per decoder layer) share a key; the same
    loss line reached from two places (the final layer's loss and the auxiliary ones) does not.
    """
    key = []
    while frame is not None and len(key) < _FRAMES_IN_KEY:
        key.append((frame.f_code, frame.f_lasti))
        frame = frame.f_back
    return tuple(key)

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

    def add(self, out: Any, func: Callable[..., Any] | str, frame: FrameType | None, inner: Hashable = None) -> None:
        """Remember the output of a loss function (called from the interceptor or the loss watch).

        Calls from one call site (a loop over pyramid levels) share a group; two calls on one line
        are two groups (see :func:`call_key`). ``inner``: where inside a recognised loss function
        the scalar was made (two losses of one function call are two groups).
        """
        if not isinstance(out, torch.Tensor) or out.grad_fn is None or out.numel() != 1:
            return
        name = func if isinstance(func, str) else getattr(func, "__name__", "loss")
        if frame is not None:
            name = f"{name}@{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
            key: Hashable = (call_key(frame), inner)
        else:
            key = (name, inner)
        self._found.setdefault(out.grad_fn, (out.output_nr, out.shape, name, key))

    def release(self) -> None:
        """Drop every discovered loss (a backward freed its graph, or the trace ends)."""
        self._found.clear()

    def candidates(self, named: dict[int, tuple[Any, str]]) -> dict[Any, Candidate]:
        """Live candidate losses keyed by their ``grad_fn``; names given by the user win."""
        out: dict[Any, Candidate] = {}
        live = []
        for ref, name in named.values():
            tensor = ref()
            if tensor is not None and tensor.grad_fn is not None and tensor.numel() == 1:
                live.append((tensor.grad_fn._sequence_nr(), tensor, name))
        # in the order the forward made them: the naming dict's own order is not stable from step to
        # step (a new tensor that reuses a freed one's id takes its old place)
        for _, tensor, name in sorted(live, key=lambda x: x[0]):
            out[tensor.grad_fn] = (tensor.output_nr, tensor.shape, name, ("named", name))
        for node, value in self._found.items():
            out.setdefault(node, value)
        return out  # named losses first (in the order they were computed), then discovered ones (in call order)


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
    for key, nodes_ in groups.items():
        name = candidates[nodes_[0]][2]
        used[name] = used.get(name, 0) + 1
        if used[name] > 1:  # two calls on one line
            name = f"{name}#{used[name]}"
        if len(nodes_) > 1 and not (isinstance(key, tuple) and key and key[0] == "named"):
            name = f"{name} ×{len(nodes_)}"  # one call site reached several times (levels, layers)
        leaves = set().union(*(reach[n][0] for n in nodes_))
        edges = tuple(GradientEdge(n, candidates[n][0]) for n in nodes_)
        shapes = tuple(candidates[n][1] for n in nodes_)
        components.append(Component(name, edges, shapes, frozenset(leaves), sum(reach[n][1] for n in nodes_)))
    # a candidate met from the root but also inside another component: the root's own path to it is rest
    for node in inner.intersection(met):
        rest_leaves |= reach[node][0]
    return components, frozenset(rest_leaves), every
