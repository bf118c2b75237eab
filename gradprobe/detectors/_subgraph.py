"""The shared subgraph of a GP101 / GP102 finding as plain data, for the report's tree.

# NOTE [drawing where two losses meet]
# When `freed_graph` finds that two backward calls share nodes that held saved tensors, the graph is
# still alive; by the time the report is drawn it may not be. So the finding carries the subgraph as
# JSON-safe data (`finding.data["graph"]`): from the top shared node down through `next_functions`,
# the nodes that held saved tensors (freed, or about to be), each with the local variable of the
# user's frames (the backward's frame and up to two callers) whose grad_fn it is and the line that
# assigned it, and the traced parameters just below it. Nodes that held nothing are folded away;
# a node met again is shown once more as a reference. Bounded: at most `_MAX_SHOWN` nodes drawn
# and `_MAX_VISITED` visited. Built only when such a finding is made (never per backward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gradprobe.detectors._common import assignment_site, op_name, user_frames

if TYPE_CHECKING:
    from types import FrameType

    from gradprobe.api.trace import Trace

__all__ = ["shared_tree"]

_MAX_SHOWN = 40
_MAX_VISITED = 5000
_MAX_PARAMS = 3


def _owners(frame: FrameType | None) -> dict[int, tuple[str, Any]]:
    """id(grad_fn) -> (local name, the line that assigned it) over the user's frames."""
    from gradprobe.capture.sites import frame_locals

    found: dict[int, tuple[str, Any]] = {}
    for f in user_frames(frame):
        for name, value in frame_locals(f).items():
            if isinstance(value, torch.Tensor) and not name.startswith("_") and value.grad_fn is not None:
                found.setdefault(id(value.grad_fn), (name, assignment_site(f, name)))
    return found


def shared_tree(trace: Trace, frame: FrameType | None, top: Any, marked: set[int], state: str) -> dict[str, Any]:
    """The subgraph below ``top`` whose nodes in ``marked`` (ids) held saved tensors, as nested dicts.

    ``state`` says what happened to those tensors (``"freed"``, ``"will be freed"``).
    """
    owners = _owners(frame)
    shown: dict[int, int] = {}  # id(node) -> its number in the drawing
    counts = {"shown": 0, "visited": 0, "folded": 0}

    def params_below(node: Any) -> list[str]:
        names = []
        stack, seen = [node], {id(node)}
        while stack and len(names) < _MAX_PARAMS:
            current = stack.pop()
            for nxt, _ in current.next_functions:
                if nxt is None or id(nxt) in seen:
                    continue
                seen.add(id(nxt))
                var = getattr(nxt, "variable", None)
                if isinstance(var, torch.Tensor):
                    leaf = trace._by_id.get(id(var))
                    if leaf is not None:
                        names.append(leaf.leaf.name)
                elif id(nxt) not in marked and len(seen) < 32:
                    stack.append(nxt)  # through views, transposes, casts between the node and the parameter
        return names

    def entry(node: Any) -> dict[str, Any]:
        counts["shown"] += 1
        shown[id(node)] = counts["shown"]
        owner = owners.get(id(node))
        site = owner[1] if owner else None
        return {
            "id": counts["shown"],
            "op": op_name(node),
            "state": state if id(node) in marked else "",
            "name": owner[0] if owner else None,
            "line": [site.filename, site.lineno] if site is not None else None,
            "source": site.source if site is not None else "",
            "params": params_below(node),
            "children": [],
        }

    passed: set[int] = set()  # folded nodes already gone through

    def descend(node: Any, into: list[dict[str, Any]]) -> None:
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            counts["visited"] += 1
            if counts["visited"] > _MAX_VISITED:
                return
            if id(nxt) in shown:
                into.append({"ref": shown[id(nxt)], "op": op_name(nxt)})
            elif id(nxt) in marked:
                if counts["shown"] >= _MAX_SHOWN:
                    counts["folded"] += 1
                    continue
                child = entry(nxt)
                into.append(child)
                descend(nxt, child["children"])
            elif getattr(nxt, "variable", None) is None and id(nxt) not in passed:
                passed.add(id(nxt))
                descend(nxt, into)

    root = entry(top)
    descend(top, root["children"])
    return {"root": root, "state": state, "folded": counts["folded"], "nodes": counts["shown"]}
