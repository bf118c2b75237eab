"""GP112 ``retained_graph``: ``retain_graph=True`` that kept saved tensors alive for no later backward.

# NOTE [retain_graph for nothing]
# PyTorch's "Trying to backward through the graph a second time" suggests `retain_graph=True`, and
# it is often added where the real fix is a `.detach()` (or nowhere): every retained graph keeps its
# saved tensors (activations) alive until the graph dies. At a backward with an explicit
# `retain_graph=True` (not implied by `create_graph=True`), the detector notes the nodes of the
# shared walk (`capture.graph.walk`) that hold saved tensors, by (id, creation number), and measures
# their bytes. The retention was useful when a later traced backward runs one of those nodes. When
# the graph dies first (NOTE [is a retained graph still alive]; in a loop: when the next iteration
# rebinds the loss), with no such backward, the finding is at the `retain_graph=True` line: what it
# kept alive, for nothing (warning). When the trace ends first, or 8 later backward calls passed
# while the graph is still alive, it is only info: a later backward may still use the graph. Decided once per line: after the first decision that line costs nothing
# more (a training loop's retained backward is looked at once, not every step); while a retained
# graph waits, each backward's walk is compared with it (a set of node keys).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from gradprobe.capture.graph import _topological, iter_nodes, sequence_nr, walk
from gradprobe.detectors._common import call_text, format_bytes, saved_bytes
from gradprobe.findings import Finding
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gradprobe.api.trace import Trace
    from gradprobe.capture.calls import BackwardCall
    from gradprobe.findings import Severity, Site

__all__ = ["RetainedGraph"]


_PATIENCE = 8  # later backward calls a retained graph waits for, at most


def _keys(nodes: Iterable[Any]) -> set[tuple[int, int]]:
    """(id, creation number) of nodes: ids alone are reused once a graph dies."""
    return {(id(n), sequence_nr(n)) for n in nodes}


class _Retained:
    __slots__ = ("site", "text", "keys", "bytes", "nodes", "waited", "held")

    def __init__(self, call: BackwardCall, live: list[Any]) -> None:
        self.site = call.site
        self.text = call_text(call.name, call.kind)
        self.keys = _keys(live)
        self.nodes = len(live)
        self.bytes = saved_bytes(live)
        self.waited = 0
        self.held = _watch([r.grad_fn for r in call.roots if r.grad_fn is not None], live)

    def alive(self) -> bool:
        return self.held is None or self.held() is not None


class _Alive:
    """Put in the ``metadata`` of a retained graph's nodes: it lives as long as one of them does."""

    __slots__ = ("__weakref__",)


def _watch(roots: list[Any], live: list[Any]) -> Any:
    """A weak reference that dies with the last of the ``live`` nodes (NOTE [is a retained graph still alive]).

    # NOTE [is a retained graph still alive]
    # Graph nodes cannot be weakly referenced, but each carries a `metadata` dict that lives and dies
    # with it. One small sentinel object is put in the metadata of the lowest live nodes (those with
    # no other live node below them): every live node is one of them or keeps one alive through
    # `next_functions`, so the sentinel dies exactly when no node that held saved tensors is left.
    # The entry ("gradprobe.retained") stays in those nodes' metadata until they die. None when no
    # metadata could be set (then the graph is taken as alive: only the end of the trace decides).
    """
    ids = {id(n) for n in live}
    below: dict[int, bool] = {}
    for node in reversed(_topological(list(iter_nodes(roots)))):  # children first
        below[id(node)] = any(
            nxt is not None and (id(nxt) in ids or below.get(id(nxt), False)) for nxt, _ in node.next_functions
        )
    sentinel, placed = _Alive(), False
    for node in live:
        if not below.get(id(node), False):
            try:
                node.metadata["gradprobe.retained"] = sentinel
                placed = True
            except Exception:
                continue
    return weakref.ref(sentinel) if placed else None


class RetainedGraph:
    """A ``retain_graph=True`` backward whose graph no later backward used."""

    default = True
    gradprobe_name = "retained_graph"

    def __init__(self) -> None:
        self._pending: list[_Retained] = []
        self._decided: set[Site | None] = set()
        self._final: list[Finding] = []  # said at the end (recorded only when the block raised)
        self._measured: list[tuple[_Retained, str]] = []  # each line's first retained backward, and what followed

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        if self._pending:
            self._check(trace, call)
        if not call.retain_graph or call.create_graph or call.site in self._decided or call.rejected is not None:
            return
        if any(p.site == call.site for p in self._pending):
            return  # the same line again while its first graph waits (a loop): that one decides
        found = walk(call)
        if found.live:
            self._pending.append(_Retained(call, found.live))

    def _check(self, trace: Trace, call: BackwardCall) -> None:
        found = walk(call)
        ran = _keys((*found.live, *found.freed, *found.maybe_freed, *(s.node for s in found.stale)))
        kept = []
        for p in self._pending:
            if p.keys & ran:
                self._decided.add(p.site)  # used: retain_graph was needed
                self._measured.append((p, f"used by {call_text(call.name, call.kind)}" + (f" at {call.site}" if call.site else "")))
                continue
            p.waited += 1
            if not p.alive():
                self._emit(trace, p, "before the graph died")
            elif p.waited >= _PATIENCE:  # still alive: it may yet be used, so only a fact (info)
                self._final.append(self._finding(p, f"in the next {_PATIENCE} backward calls (it is still alive)", "info"))
            else:
                kept.append(p)
        self._pending = kept

    @hookimpl
    def gradprobe_trace_end(self, trace: Trace) -> None:
        pending, self._pending = self._pending, []
        for p in pending:
            # a backward after the trace may still use it: a fact worth knowing, not a mistake for sure
            self._final.append(self._finding(p, "before the trace ended", "info"))

    def _emit(self, trace: Trace, p: _Retained, when: str) -> None:
        trace.emit(self._finding(p, when))

    def _finding(self, p: _Retained, when: str, severity: Severity = "warning") -> Finding:
        self._decided.add(p.site)
        self._measured.append((p, f"no later backward {when} (GP112)"))
        return Finding(
            code="GP112",
            kind="retained_graph",
            severity=severity,
            message=(
                f"{p.text} with retain_graph=True kept {format_bytes(p.bytes)} of saved tensors ({p.nodes} graph nodes) "
                f"alive for no later backward: nothing backwarded through that graph again {when}"
            ),
            site=p.site,
            fix=(
                "drop retain_graph=True here; if it was added for \"Trying to backward through the graph a second "
                "time\", the usual fix is a `.detach()` of the tensor carried into the next step, or one backward "
                "of the summed losses"
            ),
            plugin="retained_graph",
            data={"bytes": p.bytes, "nodes": p.nodes},
        )

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any] | None:
        """What each line's first ``retain_graph=True`` backward kept alive, and whether a later backward used it."""
        if not self._measured:
            return None
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        title = Text("retain_graph=True · the saved tensors each retained backward kept alive", style="italic")
        table = Table(box=box.SIMPLE_HEAD)
        for column in ("line", "backward", "saved tensors", "graph nodes", "then"):
            table.add_column(column, justify="right" if column in ("saved tensors", "graph nodes") else "left")
        for p, outcome in self._measured:
            table.add_row(str(p.site) if p.site else "?", p.text, format_bytes(p.bytes), str(p.nodes), outcome)
        note = Text("measured at the first retained backward of each line; later ones of that line are not", style="dim")
        return [Group(title, table, note)]

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        final, self._final = self._final, []
        return final
