"""Walks over autograd graphs (the ``grad_fn`` / ``next_functions`` DAG)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["iter_nodes"]


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
