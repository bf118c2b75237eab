"""Folding a big model's breakdown rows into a module tree: a depth limit and "… N more" rows.

# NOTE [folding]
# A model with hundreds of parameter tensors gives a report nobody reads. Leaves are grouped by
# the dotted path of their names (``backbone.body.layer1.0.conv1.weight``); a chain of modules with
# one child each is shown as one row (``backbone.body``), and the module every leaf is under (the
# ``model`` of ``model.backbone…``) is no level of its own: its children are the top rows, named in
# full (``model.backbone``). Up to ``MAX_ROWS`` leaves are shown flat,
# one row each, in model order. Above that the tree is cut at the deepest level that fits in about
# ``MAX_ROWS`` rows, each module shows its ``CHILDREN`` largest children (by ‖.grad‖) and one
# "… N more" row for the rest, and a folded module's numbers are those of all its leaves together,
# which is exact: the parameters of a module are one vector, parts of different tensors are
# orthogonal in it, so norms add in squares and projection shares are weighted by ‖.grad‖².
# ``t.report(depth=None)`` shows every leaf; ``t.report(depth=N)`` folds at level N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from gradprobe.analysis.breakdown import CarriedIn, Part

if TYPE_CHECKING:
    from gradprobe.analysis.breakdown import LeafBreakdown

__all__ = ["CHILDREN", "MAX_ROWS", "Depth", "Group", "Shown", "fold"]

MAX_ROWS = 40
CHILDREN = 8
Depth = Union[int, str, None]  # "auto", a level, or None (every leaf)


@dataclass
class _Node:
    label: str
    children: dict[str, _Node] = field(default_factory=dict)
    own: LeafBreakdown | None = None
    size: float = 0.0
    total: LeafBreakdown | Group | None = None
    rest: Group | None = None  # the "… N more" children together


class _Summed:
    """One backward call's part of several leaves together (read like a :class:`Part`)."""

    __slots__ = ("record", "norm", "absmax", "finite", "in_grad", "share")
    cos_before = None

    def __init__(self, record: int, norm: float, absmax: float, finite: bool, in_grad: bool, share: float | None) -> None:
        self.record, self.norm, self.absmax, self.finite, self.in_grad, self.share = record, norm, absmax, finite, in_grad, share

    @property
    def zero(self) -> bool:
        return self.absmax == 0.0


@dataclass(frozen=True)
class Group:
    """Several leaves' numbers together (a module, or the "… N more" siblings): quacks like a LeafBreakdown."""

    parts: dict[int, Part | _Summed]
    carried_in: CarriedIn | None
    grad_norm: float | None
    grad_finite: bool | None
    check: bool | None
    count: int

    def part(self, record: int) -> Part | _Summed | None:
        return self.parts.get(record)


@dataclass(frozen=True)
class Shown:
    """One row of the report: its label, indentation, and a leaf's row or a group's numbers."""

    label: str
    indent: int
    row: LeafBreakdown | Group
    more: bool = False  # a "… N more" row


def _sq(x: float | None) -> float:
    return x * x if x is not None and math.isfinite(x) else 0.0


def _share(pairs: list[tuple[float | None, float]]) -> float | None:
    """Projection share of several leaves together: shares weighted by ‖.grad‖²."""
    total = sum(w for _, w in pairs)
    if not pairs or any(s is None for s, _ in pairs) or not total > 0:
        return None
    return sum(s * w for s, w in pairs) / total  # type: ignore[operator]


def group(rows: list[LeafBreakdown]) -> Group:
    """The numbers of ``rows`` together (exact; see NOTE [folding])."""
    by_record: dict[int, list[tuple[Part, float]]] = {}
    carried: list[tuple[CarriedIn, float]] = []
    count = 0
    for row in rows:
        w = _sq(row.grad_norm)
        count += 1
        for p in row.parts:
            by_record.setdefault(p.record, []).append((p, w))
        if row.carried_in is not None:
            carried.append((row.carried_in, w))
    out = {}
    for record, items in sorted(by_record.items()):
        in_grad = [(p.share, w) for p, w in items if p.in_grad]
        out[record] = _Summed(
            record,
            math.sqrt(sum(p.norm * p.norm for p, _ in items)),
            max(p.absmax for p, _ in items),
            all(p.finite for p, _ in items),
            bool(in_grad),
            _share(in_grad) if in_grad else None,
        )
    carried_in = None
    if carried:
        norm = math.sqrt(sum(c.norm * c.norm for c, _ in carried))
        carried_in = CarriedIn(norm, _share([(c.share, w) for c, w in carried]), carried[0][0].reason)
    norms = [row.grad_norm for row in rows if row.grad_norm is not None]
    finite = [row.grad_finite for row in rows if row.grad_finite is not None]
    checks = [row.check for row in rows if row.check is not None]
    grad_norm = None
    if norms:
        grad_norm = math.sqrt(sum(x * x for x in norms)) if all(finite) else math.inf
    return Group(
        parts=out,
        carried_in=carried_in,
        grad_norm=grad_norm,
        grad_finite=all(finite) if finite else None,
        check=all(checks) if checks else None,
        count=count,
    )


def _leaves(node: _Node, out: list[LeafBreakdown]) -> list[LeafBreakdown]:
    if node.own is not None:
        out.append(node.own)
    for child in node.children.values():
        _leaves(child, out)
    return out


def _group_of(node: _Node) -> LeafBreakdown | Group:
    """A shown node's numbers (only shown nodes are summed: a 5,000-leaf model stays fast)."""
    if node.total is None:
        node.total = group(_leaves(node, [])) if node.children else node.own
    return node.total  # type: ignore[return-value]


def _build(rows: list[LeafBreakdown]) -> _Node:
    root = _Node("")
    for row in rows:
        node = root
        for piece in row.leaf.name.split("."):
            child = node.children.get(piece)
            if child is None:
                child = node.children[piece] = _Node(piece)
            node = child
        node.own = row
    _collapse(root)
    if len(root.children) == 1:  # every leaf under one model (`model.…`, NOTE [leaf names]): its modules are the top
        (top,) = root.children.values()
        if top.own is None:
            for child in top.children.values():
                child.label = f"{top.label}.{child.label}"
            root.children = top.children
    return root


def _collapse(node: _Node) -> float:
    """Merge chains of single children into one node; set and return each node's ‖.grad‖²."""
    sq = _sq(node.own.grad_norm) if node.own is not None else 0.0
    for key, child in list(node.children.items()):
        while child.own is None and len(child.children) == 1:
            (grand,) = child.children.values()
            grand.label = f"{child.label}.{grand.label}"
            child = grand
        node.children[key] = child
        sq += _collapse(child)
    node.size = math.sqrt(sq)
    return sq


def _levels(node: _Node) -> int:
    return 1 + max((_levels(c) for c in node.children.values()), default=0)


def _rows(node: _Node, depth: int, level: int, out: list[Shown]) -> None:
    children = sorted(node.children.values(), key=lambda c: -c.size)
    shown, rest = children[:CHILDREN], children[CHILDREN:]
    if len(rest) == 1:
        shown, rest = children, []
    for child in shown:
        indent = 2 * (level - 1)
        if not child.children:
            out.append(Shown(child.label, indent, child.own))  # type: ignore[arg-type]
            continue
        out.append(Shown(child.label, indent, _group_of(child)))
        if level < depth:
            _rows(child, depth, level + 1, out)
    if rest:
        if node.rest is None:  # the same at every depth tried
            leaves: list[LeafBreakdown] = []
            for c in rest:
                _leaves(c, leaves)
            node.rest = group(leaves)
        out.append(Shown(f"… {len(rest)} more", 2 * (level - 1), node.rest, more=True))


def fold(rows: list[LeafBreakdown], depth: Depth = "auto") -> tuple[list[Shown], str]:
    """The rows to show for ``depth``, and a note saying how they were folded ("" when not)."""
    if depth is None or (depth == "auto" and len(rows) <= MAX_ROWS):
        return [Shown(row.leaf.name, 0, row) for row in rows], ""
    root = _build(rows)
    if depth == "auto":
        levels = _levels(root) - 1
        chosen: list[Shown] = []
        for d in range(1, levels + 1):
            out: list[Shown] = []
            _rows(root, d, 1, out)
            if chosen and len(out) > MAX_ROWS:
                break
            chosen = out
            depth_used = d
        shown = chosen
    else:
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"report(depth=...) must be a level >= 1, 'auto' or None, got {depth!r}")
        shown = []
        _rows(root, depth, 1, shown)
        depth_used = depth
    note = (
        f"{len(rows)} leaves folded into a module tree {depth_used} level{'s' * (depth_used != 1)} deep, "
        f"largest first; t.report(depth=None) shows every leaf"
    )
    return shown, note
