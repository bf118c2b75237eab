"""Walks over autograd graphs (the ``grad_fn`` / ``next_functions`` DAG).

# NOTE [saved tensors and freed nodes]
# After a backward without retain_graph, every node it ran has released its saved tensors, and a
# later backward through such a node raises "Trying to backward through the graph a second time".
# Only nodes that held a *defined* saved tensor count: AddBackward0 or SumBackward0 save none, and
# `x * 2.0` saves only the wrapped scalar `other`, never `self`. Per node type we cache the names of
# its saved-tensor slots (`_saved_<x>` with a `_raw_saved_<x>` twin). A slot is asked once: first
# its raw twin, which never runs an unpack hook; a slot whose raw item has an unpack hook (the
# user's saved_tensors_hooks, save_on_cpu, checkpoint, allow_mutation_on_saved_tensors) counts as
# live and is left to that hook. Otherwise `_saved_<x>` is read, which is PyTorch's own check: it
# returns None for an undefined tensor, the tensor when live, and raises "... a second time" when
# freed or "... modified by an inplace operation ... is at version N; expected version M" when the
# tensor was written in place since it was saved ("stale"): the backward would raise the same.
# Custom autograd.Function nodes expose `_raw_saved_tensors` (which itself raises once freed) and
# `saved_tensors`. List-valued slots (`IndexBackward0._raw_saved_indices`) also raise through
# `_raw_` once freed. Any other error, on any read, makes the slot "unknown" and it is skipped:
# a walk never raises. `CopySlices` (an in-place op through a view, `h[0].mul_(3)`) does not expose
# the node it wraps (not in `next_functions`, no attribute): its saved tensors are invisible, so
# neither a freed nor a stale one is predicted there (PyTorch still raises its own error).

# NOTE [which nodes a backward runs]
# `backward()` without `inputs` runs every node reachable from the roots. With `inputs=` (and for
# `autograd.grad`) the engine runs only the nodes with a path to an input. A leaf input is reached
# through its AccumulateGrad node; a non-leaf input's own grad_fn runs under `backward(inputs=...)`
# (the gradient is accumulated there) but is only a capture point under `autograd.grad`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from gradprobe.capture.calls import BackwardCall

__all__ = ["SavedState", "Stale", "Walk", "iter_nodes", "nodes_to_run", "saved_slots", "saved_state", "walk"]

SavedState = Literal["none", "live", "freed", "stale", "maybe_freed"]

_SLOTS: dict[type, tuple[str, ...]] = {}
_CUSTOM = ("<custom>",)
_FREED = "backward through the graph a second time"
_STALE = "modified by an inplace operation"


class Stale(NamedTuple):
    """A saved tensor written in place since it was saved: PyTorch's message and the raw slot."""

    node: Any
    slot: str  # "self", "result", ... ("tensors" for a custom Function)
    message: str
    items: tuple[Any, ...]  # the raw SavedTensors (``.data`` shares storage and version with the tensor)


class Walk:
    """The nodes a backward will run, classified once (see NOTE [saved tensors and freed nodes])."""

    __slots__ = ("nodes", "live", "freed", "maybe_freed", "stale", "first", "__weakref__")

    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes
        self.live: list[Any] = []
        self.freed: list[Any] = []
        self.maybe_freed: list[Any] = []  # custom Function nodes (NOTE [custom Functions after a backward])
        self.stale: list[Stale] = []
        for node in nodes:
            state, stale = _inspect(node)
            if state == "live":
                self.live.append(node)
            elif state == "freed":
                self.freed.append(node)
            elif state == "maybe_freed":
                self.maybe_freed.append(node)
            elif stale is not None:
                self.stale.append(stale)
        self.first = self.first_failure(self.freed)

    def first_failure(self, freed: list[Any]) -> Literal["freed", "stale"] | None:
        """Which error PyTorch raises first: the failing node with the highest sequence number runs first.

        # NOTE [which failing node runs first]
        # The engine's ready queue runs the node with the highest sequence number first, and a node's
        # inputs (next_functions) were created before it (lower numbers). So of two failing nodes, the
        # one created later always runs first: its error is the one PyTorch raises.
        """
        if not freed and not self.stale:
            return None
        if not self.stale:
            return "freed"
        if not freed:
            return "stale"
        last_freed = max(sequence_nr(n) for n in freed)
        last_stale = max(sequence_nr(s.node) for s in self.stale)
        return "freed" if last_freed > last_stale else "stale"


# BackwardCall -> its Walk: every detector asks in gradprobe_before_backward, one walk is done
_WALKS: weakref.WeakKeyDictionary[Any, Walk] = weakref.WeakKeyDictionary()


def walk(call: BackwardCall) -> Walk:
    """The classified nodes ``call`` will run, walked once per call and shared by the detectors."""
    found = _WALKS.get(call)
    if found is None:
        roots = [r.grad_fn for r in call.roots if r.grad_fn is not None]
        if call.rejected is not None:  # NOTE [arguments PyTorch refuses first] in calls.py
            roots = []
        found = Walk(nodes_to_run(roots, call.inputs, accumulate=call.kind == "backward") if roots else [])
        _WALKS[call] = found
    return found


def sequence_nr(node: Any) -> int:
    """The node's creation number (-1 when it has none)."""
    try:
        return int(node._sequence_nr())
    except Exception:
        return -1


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
    """``"live"``: holds a saved tensor; ``"freed"``: held one and released it; ``"stale"``: holds one
    written in place since it was saved; ``"none"``: holds none (or none gradprobe can read).

    Never runs a saved-tensor unpack hook and never raises (see NOTE [saved tensors and freed nodes]).
    """
    return _inspect(node)[0]


def _inspect(node: Any) -> tuple[SavedState, Stale | None]:
    slots = _SLOTS.get(type(node))
    if slots is None:
        slots = saved_slots(node)
    if not slots:
        return "none", None
    if slots is _CUSTOM:
        # NOTE [custom Functions after a backward]: once a backward without retain_graph ran a custom
        # Function's node, reading its saved tensors raises whether or not it saved any, and a second
        # backward fails only if its `backward` reads `ctx.saved_tensors`. So a released custom node
        # is only "maybe freed": the freed_graph detector counts it when it saw the node hold saved
        # tensors at the backward that released it.
        state, stale = _slot(node, "tensors", "_raw_saved_tensors", "saved_tensors")
        return ("maybe_freed" if state == "freed" else state), stale
    state: SavedState = "none"
    for name in slots:
        found, stale = _slot(node, name, "_raw_saved_" + name, "_saved_" + name)
        if found == "stale" or found == "freed":
            return found, stale
        if found == "live":
            state = "live"
    return state, None


def _slot(node: Any, name: str, raw_attr: str, attr: str) -> tuple[SavedState, Stale | None]:
    """One slot's state; errors other than PyTorch's two known ones make it "none" (unknown)."""
    items: tuple[Any, ...] = ()
    try:
        raw = getattr(node, raw_attr)
        items = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
        if not items:
            return "none", None
        for item in items:
            if item is not None and item.unpack_hook is not None:
                return "live", None  # a saved-tensor hook's business (and reading would run it)
        value = getattr(node, attr)
    except RuntimeError as exc:
        text = str(exc)
        if _FREED in text:
            return "freed", None
        if _STALE in text:
            return "stale", Stale(node, name, text, tuple(i for i in items if i is not None))
        return "none", None
    except Exception:  # an extension node, a slot type gradprobe does not know: skip, never raise
        return "none", None
    if isinstance(value, (list, tuple)):
        return ("live" if any(v is not None for v in value) else "none"), None
    return ("none" if value is None else "live"), None


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
