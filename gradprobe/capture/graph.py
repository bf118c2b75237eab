"""Walks over autograd graphs (the ``grad_fn`` / ``next_functions`` DAG).

# NOTE [saved tensors and freed nodes]
# After a backward without retain_graph, every node it ran has released its saved tensors, and a
# later backward through such a node raises "Trying to backward through the graph a second time".
# Only nodes that held a *defined* saved tensor count: AddBackward0 or SumBackward0 save none, and
# `x * 2.0` saves only the wrapped scalar `other`, never `self`. Per node type we cache the names of
# its saved-tensor slots (`_saved_<x>` with a `_raw_saved_<x>` twin). The raw slot never raises and
# never runs an unpack hook; its `.data` is None both for a freed slot and for a slot that saved an
# undefined tensor, so only then is `_saved_<x>` read, which raises exactly when the slot was freed
# (and runs no unpack hook: a freed slot has none left, and `unpack_hook` is checked first).
# Custom autograd.Function nodes expose `_raw_saved_tensors`, which itself raises once freed.

# NOTE [which nodes a backward runs]
# `backward()` without `inputs` runs every node reachable from the roots. With `inputs=` (and for
# `autograd.grad`) the engine runs only the nodes with a path to an input. A leaf input is reached
# through its AccumulateGrad node; a non-leaf input's own grad_fn runs under `backward(inputs=...)`
# (the gradient is accumulated there) but is only a capture point under `autograd.grad`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

__all__ = ["SavedState", "iter_nodes", "nodes_to_run", "saved_slots", "saved_state"]

SavedState = Literal["none", "live", "freed"]

_SLOTS: dict[type, tuple[str, ...]] = {}
_CUSTOM = ("<custom>",)


def iter_nodes(roots: Iterable[Any]) -> Iterator[Any]:
    """Yield every node reachable from the ``roots`` nodes once, roots first (iterative DFS).

    Node objects are stable Python wrappers of the C++ nodes while the graph is alive, so identity
    is a sound visited-check.
    """
    stack = [node for node in roots if node is not None]
    seen = {id(node) for node in stack}
    keep_alive = list(stack)  # ids are only unique while the objects live
    while stack:
        node = stack.pop()
        yield node
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                keep_alive.append(nxt)
                stack.append(nxt)


def saved_slots(node: Any) -> tuple[str, ...]:
    """Names ``x`` of the saved-tensor slots (``_saved_x``) of ``node``'s type, cached per type."""
    cls = type(node)
    slots = _SLOTS.get(cls)
    if slots is None:
        names = set(dir(cls))
        if "_raw_saved_tensors" in names and "saved_tensors" in names:
            slots = _CUSTOM
        else:
            slots = tuple(
                sorted(n[len("_raw_saved_"):] for n in names if n.startswith("_raw_saved_") and "_saved_" + n[11:] in names)
            )
        _SLOTS[cls] = slots
    return slots


def saved_state(node: Any) -> SavedState:
    """``"live"``: holds a saved tensor; ``"freed"``: held one and released it; ``"none"``: holds none.

    Never runs a saved-tensor unpack hook (see NOTE [saved tensors and freed nodes]).
    """
    slots = _SLOTS.get(type(node))
    if slots is None:
        slots = saved_slots(node)
    if not slots:
        return "none"
    if slots is _CUSTOM:
        try:
            raw = node._raw_saved_tensors
        except RuntimeError:
            return "freed"
        return "live" if raw else "none"
    undefined = []
    for name in slots:
        raw = getattr(node, "_raw_saved_" + name)
        items = raw if isinstance(raw, (list, tuple)) else (raw,)
        for item in items:
            if item.data is not None or item.unpack_hook is not None:
                return "live"
        if items:
            undefined.append(name)
    for name in undefined:
        try:
            getattr(node, "_saved_" + name)
        except RuntimeError:
            return "freed"
    return "none"


def nodes_to_run(
    roots: Sequence[Any], inputs: Sequence[Any] | None = None, accumulate: bool = True
) -> list[Any]:
    """The nodes a backward from ``roots`` (grad_fn nodes) will run, roots first.

    ``inputs`` are the tensors given as ``inputs=`` (or to ``autograd.grad``); ``accumulate`` is
    True for ``backward`` and False for ``autograd.grad`` (see NOTE [which nodes a backward runs]).
    """
    nodes = list(iter_nodes(roots))
    if inputs is None:
        return nodes
    leaf_ids = {id(t) for t in inputs if t.grad_fn is None}
    targets = {id(t.grad_fn) for t in inputs if t.grad_fn is not None}
    reach: dict[int, bool] = {}
    for node in reversed(_topological(nodes)):  # every child before its parents
        hit = False
        for nxt, _ in node.next_functions:
            if nxt is not None and (reach.get(id(nxt)) or id(nxt) in targets):
                hit = True
                break
        if not hit and leaf_ids and type(node).__name__ == "AccumulateGrad":
            hit = id(node.variable) in leaf_ids
        if not hit and accumulate and id(node) in targets:
            hit = True
        reach[id(node)] = hit
    return [node for node in nodes if reach[id(node)]]


def _topological(nodes: list[Any]) -> list[Any]:
    """``nodes`` (a whole graph from its roots) ordered parents first (Kahn's algorithm)."""
    parents: dict[int, int] = {id(n): 0 for n in nodes}
    for node in nodes:
        for nxt, _ in node.next_functions:
            if nxt is not None:
                parents[id(nxt)] += 1
    ready = [n for n in nodes if parents[id(n)] == 0]
    order = []
    while ready:
        node = ready.pop()
        order.append(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                parents[id(nxt)] -= 1
                if parents[id(nxt)] == 0:
                    ready.append(nxt)
    return order
