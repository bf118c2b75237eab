"""GP112 ``retained_graph``: ``retain_graph=True`` that kept saved tensors alive for no later backward.

# NOTE [retain_graph for nothing]
# PyTorch's "Trying to backward through the graph a second time" suggests `retain_graph=True`, and
# it is often added where the real fix is a `.detach()` (or nowhere): every retained graph keeps its
# saved tensors (activations) alive until the graph dies. At a backward with an explicit
# `retain_graph=True` (not implied by `create_graph=True`), the detector notes the nodes of the
# shared walk (`capture.graph.walk`) that hold saved tensors, by (id, creation number), and measures
# their bytes. The retention was useful when a later traced backward runs one of those nodes. When
# the same line runs again first (the next iteration of a loop), or 8 later backward calls passed,
# with no such backward, the finding is at the `retain_graph=True` line: what it kept alive, for
# nothing (warning). When the trace ends first it is only info: a backward after the trace may
# still use the graph. Decided once per line: after the first decision that line costs nothing
# more (a training loop's retained backward is looked at once, not every step); while a retained
# graph waits, each backward's walk is compared with it (a set of node keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradprobe.capture.graph import sequence_nr, walk
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
    __slots__ = ("site", "text", "keys", "bytes", "nodes", "waited")

    def __init__(self, call: BackwardCall, live: list[Any]) -> None:
        self.site = call.site
        self.text = call_text(call.name, call.kind)
        self.keys = _keys(live)
        self.nodes = len(live)
        self.bytes = saved_bytes(live)
        self.waited = 0


class RetainedGraph:
    """A ``retain_graph=True`` backward whose graph no later backward used."""

    default = True
    gradprobe_name = "retained_graph"

    def __init__(self) -> None:
        self._pending: list[_Retained] = []
        self._decided: set[Site | None] = set()
        self._final: list[Finding] = []  # said at the end (recorded only when the block raised)

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        if self._pending:
            self._check(trace, call)
        if not call.retain_graph or call.create_graph or call.site in self._decided or call.rejected is not None:
            return
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
                continue
            p.waited += 1
            if call.site == p.site:
                self._emit(trace, p, "before the same line ran again")
            elif p.waited >= _PATIENCE:
                self._emit(trace, p, f"in the next {_PATIENCE} backward calls")
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
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        final, self._final = self._final, []
        return final
