"""GP111 ``kept_graph``: a graph kept alive across training steps (``total_loss += loss``, a list of losses).

# NOTE [graphs kept across steps]
# `total_loss += loss` (or `ema = 0.9 * ema + 0.1 * loss`, or `losses.append(loss)` for logging)
# keeps a tensor with a grad_fn past the optimizer step, and with it every earlier step's graph:
# its nodes and whatever saved tensors were never freed (all activations, when those losses are not
# backwarded, as in an evaluation loop run with grad on). Memory grows every step until it runs out.
# After each optimizer step (NOTE [steps before the core knows them]) the detector looks at the
# locals of the user's frame that called `step()` and of its two user callers that the function's
# source adds to (`x += ...`, `x = f(x, ...)`, `x.append(...)`; read once per function): per such
# tensor with a grad_fn it keeps the node's (id, sequence number); per such list (and list inside
# such a dict) whose last item has a grad_fn, the list's id, length and a weak reference to that item. At the next
# step, the same name's graph growing from the one seen a step earlier is the mistake: its new grad_fn
# reaches the old node within a few nodes (a running total chains one `AddBackward0` per step), or
# the same list grew and still holds the tensor seen last time. Nothing of the user's graph is kept
# (no strong reference to a node or a tensor). Then, once per name, the graph is walked to say what
# it holds: nodes and saved-tensor bytes in all, and what the last step added.
# Cost: a frame lookup and a look at a few named locals per optimizer step; nothing per backward.
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.capture.graph import iter_nodes, sequence_nr
from gradprobe.capture.sites import Site, frame_locals
from gradprobe.detectors._common import assignment_site, format_bytes, saved_bytes, user_frames
from gradprobe.capture.steps import steps_of
from gradprobe.findings import Finding
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from types import FrameType

    from gradprobe.api.trace import Trace
    from gradprobe.capture.steps import StepEvent

__all__ = ["KeptGraph"]

_DEPTH = 3  # a running total reaches last step's node in one hop; `0.9 * ema + 0.1 * loss` in two
_BUDGET = 24  # nodes looked at per name per step, at most
_WALK_LIMIT = 200_000  # nodes walked to measure a kept graph, at most


def _key(node: Any) -> tuple[int, int]:
    return id(node), sequence_nr(node)


def _reaches(node: Any, target: tuple[int, int]) -> Any:
    """The node named ``target`` if ``node`` reaches it within ``_DEPTH`` hops (``_BUDGET`` nodes), else None."""
    frontier, looked = [node], 0
    for _ in range(_DEPTH):
        following = []
        for current in frontier:
            for nxt, _ in current.next_functions:
                if nxt is None:
                    continue
                looked += 1
                if id(nxt) == target[0] and sequence_nr(nxt) == target[1]:
                    return nxt
                following.append(nxt)
                if looked >= _BUDGET:
                    return None
        frontier = following
    return None


def _measure(roots: list[Any], stop: Any = None) -> tuple[int, int]:
    """(nodes, saved bytes) of the graph from ``roots``, not going past ``stop``."""
    nodes = []
    for node in iter_nodes(roots):
        if stop is not None and node is stop:
            continue
        nodes.append(node)
        if len(nodes) >= _WALK_LIMIT:
            break
    if stop is not None:  # iter_nodes went past `stop`; keep only what `stop` does not reach
        behind = {id(n) for n in iter_nodes([stop])}
        nodes = [n for n in nodes if id(n) not in behind]
    return len(nodes), saved_bytes(nodes)


class _Seen:
    __slots__ = ("node", "list_id", "length", "last")

    def __init__(self, node: tuple[int, int] | None, list_id: int = 0, length: int = 0, last: Any = None) -> None:
        self.node = node  # a tensor local: its grad_fn's key
        self.list_id = list_id  # a list local: its id, length and a weakref to its last item
        self.length = length
        self.last = last


class KeptGraph:
    """A tensor with a grad_fn carried across optimizer steps whose graph grows every step."""

    default = True
    gradprobe_name = "kept_graph"

    def __init__(self) -> None:
        self._seen: dict[tuple[int, str], _Seen] = {}
        self._reported: set[tuple[int, str]] = set()
        self._names: dict[int, tuple[Any, frozenset[str]]] = {}  # id(code) -> (code, names it adds to)

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        steps_of(trace).after_step(self.gradprobe_name, self._on_step)

    def _on_step(self, trace: Trace, event: StepEvent) -> None:
        seen: dict[tuple[int, str], _Seen] = {}
        for frame in user_frames(event.frame):
            code = frame.f_code
            names = self._names.get(id(code))
            if names is None or names[0] is not code:
                names = self._names[id(code)] = (code, _accumulated_names(code))
            if not names[1]:
                continue
            values = frame_locals(frame) if code.co_flags & _CO_OPTIMIZED else frame.f_locals
            for name in names[1]:
                value = values.get(name)
                key = (id(code), name)
                if isinstance(value, torch.Tensor):
                    self._tensor(trace, event, frame, key, name, value, seen)
                elif isinstance(value, list):
                    self._list(trace, event, frame, key, name, value, seen)
                elif isinstance(value, dict) and len(value) <= 16:
                    for k, item in value.items():
                        if isinstance(item, list) and isinstance(k, str):
                            self._list(trace, event, frame, (id(code), f"{name}[{k!r}]"), f"{name}[{k!r}]", item, seen)
        self._seen = seen

    def _tensor(
        self, trace: Trace, event: StepEvent, frame: FrameType, key: tuple[int, str], name: str, value: torch.Tensor,
        seen: dict[tuple[int, str], _Seen],
    ) -> None:
        node = value.grad_fn
        if node is None:
            return
        seen[key] = _Seen(_key(node))
        before = self._seen.get(key)
        if before is None or before.node is None or key in self._reported:
            return
        old = _reaches(node, before.node)
        if old is None:
            return
        self._reported.add(key)
        total_nodes, total_bytes = _measure([node])
        new_nodes, new_bytes = _measure([node], stop=old)
        site = _accumulating_site(frame, name) or assignment_site(frame, name) or event.site
        added = _added_expression(site, name)
        fix = (
            f"accumulate a number: `{name} += {added}.item()` (or `{added}.detach()` to keep a tensor)"
            if added
            else f"accumulate a number (`.item()`) or a detached tensor (`.detach()`) into `{name}`"
        )
        trace.emit(self._finding(
            f"`{name}` carries a grad_fn across optimizer steps and its graph grows every step: it keeps every "
            "earlier step's graph alive",
            total_nodes, total_bytes, new_nodes, new_bytes, site, fix, name, event,
        ))

    def _list(
        self, trace: Trace, event: StepEvent, frame: FrameType, key: tuple[int, str], name: str, value: list[Any],
        seen: dict[tuple[int, str], _Seen],
    ) -> None:
        if not value:
            return
        last = value[-1]
        if not isinstance(last, torch.Tensor) or last.grad_fn is None:
            return
        seen[key] = _Seen(None, id(value), len(value), weakref.ref(last))
        before = self._seen.get(key)
        if before is None or before.node is not None or key in self._reported:
            return
        if before.list_id != id(value) or len(value) <= before.length or value[before.length - 1] is not before.last():
            return
        self._reported.add(key)
        graphs = [t.grad_fn for t in value if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        total_nodes, total_bytes = _measure(graphs)
        fresh = [t.grad_fn for t in value[before.length:] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        new_nodes, new_bytes = _measure(fresh)
        per_step = max(1, len(value) - before.length)
        site = _append_site(frame, name) or event.site
        item = _appended_expression(site, name)
        fix = (
            f"store a number or a detached tensor: `{name}.append({item}.item())` (or `{item}.detach()`)"
            if item
            else f"append `.item()` (a number) or `.detach()` (a tensor without graph) to `{name}`"
        )
        trace.emit(self._finding(
            f"`{name}` collects tensors with a grad_fn across optimizer steps ({len(value)} so far, "
            f"{per_step} per step): each keeps its step's graph alive",
            total_nodes, total_bytes, new_nodes, new_bytes, site, fix, name, event,
        ))

    @staticmethod
    def _finding(
        what: str, nodes: int, held: int, new_nodes: int, new_bytes: int, site: Site | None, fix: str, name: str,
        event: StepEvent,
    ) -> Finding:
        freed = " (the backward calls freed their saved tensors; the nodes stay)" if held == 0 else ""
        return Finding(
            code="GP111",
            kind="kept_graph",
            severity="warning",
            message=(
                f"{what}: {nodes} graph nodes holding {format_bytes(held)} of saved tensors so far, growing by "
                f"{new_nodes} nodes and {format_bytes(new_bytes)} per step{freed} (seen at step {event.index + 1}); memory "
                "grows until it runs out"
            ),
            site=site,
            fix=fix,
            plugin="kept_graph",
            data={"name": name, "nodes": nodes, "bytes": held, "nodes_per_step": new_nodes, "bytes_per_step": new_bytes},
        )


def _added_expression(site: Site | None, name: str) -> str | None:
    """``loss`` in ``total += loss`` or ``total = total + loss`` on the accumulating line."""
    if site is None:
        return None
    line = site.source.split("#", 1)[0].strip()
    match = re.match(rf"{re.escape(name)}\s*\+=\s*(\w+)$", line) or re.match(
        rf"{re.escape(name)}\s*=\s*{re.escape(name)}\s*\+\s*(\w+)$", line
    )
    return match.group(1) if match else None


_CO_OPTIMIZED = 0x0001  # a function's frame (module and class bodies use a real dict for locals)
_ADDS = re.compile(r"^\s*(\w+)\s*[-+*/]=")
_REBINDS = re.compile(r"^\s*(\w+)\s*=(.*)$")
_APPENDS = re.compile(r"\b(\w+)(?:\[[^\]]*\])?\.(?:append|extend)\(")


def _accumulated_names(code: Any) -> frozenset[str]:
    """Names the source of ``code`` adds to: ``x += ...``, ``x = f(x, ...)``, ``x.append(...)``.

    Read once per function per trace, so that each step looks at these few locals only.
    """
    import linecache

    lines = linecache.getlines(code.co_filename)
    if code.co_name == "<module>":
        body = lines
    else:
        numbers = [line for _, _, line in code.co_lines() if line is not None]
        body = lines[code.co_firstlineno - 1 : max(numbers, default=code.co_firstlineno)]
    found = set()
    for line in body:
        match = _ADDS.match(line)
        if match:
            found.add(match.group(1))
        match = _REBINDS.match(line)
        if match and re.search(rf"\b{re.escape(match.group(1))}\b", match.group(2)):
            found.add(match.group(1))
        found.update(m.group(1) for m in _APPENDS.finditer(line))
    return frozenset(n for n in found if not n.startswith("_"))


def _accumulating_site(frame: FrameType, name: str) -> Site | None:
    """The line of ``frame``'s function that adds to ``name`` (``name += ...``, ``name = f(name, ...)``)."""
    n = re.escape(name)
    return _line_matching(frame, re.compile(rf"^\s*{n}\s*([-+*/]=|=.*\b{n}\b)"))


def _line_matching(frame: FrameType, pattern: re.Pattern[str]) -> Site | None:
    import linecache

    lines = linecache.getlines(frame.f_code.co_filename)
    start = frame.f_code.co_firstlineno if frame.f_code.co_name != "<module>" else 1
    hits = [i for i in range(start, len(lines) + 1) if pattern.search(lines[i - 1])]
    if not hits:
        return None
    before = [i for i in hits if i <= frame.f_lineno]
    return Site(frame.f_code.co_filename, max(before) if before else hits[0])


def _append_site(frame: FrameType, name: str) -> Site | None:
    """The line of ``frame``'s function that appends to ``name`` (``name.append(`` / ``+=`` / ``extend``)."""
    base = name.split("[", 1)[0]
    return _line_matching(frame, re.compile(rf"\b{re.escape(base)}\b.*(\.append\(|\.extend\(|\+=)"))


def _appended_expression(site: Site | None, name: str) -> str | None:
    if site is None:
        return None
    match = re.search(r"\.append\(\s*(\w+)\s*\)", site.source.split("#", 1)[0])
    return match.group(1) if match else None
