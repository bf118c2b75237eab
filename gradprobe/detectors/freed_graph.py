"""GP101 / GP102 ``freed_graph``: a backward through a graph whose saved tensors an earlier backward freed.

# NOTE [predicting "backward through the graph a second time"]
# Before every traced backward the detector lists the nodes the engine will run (pruned to paths
# that reach `inputs=` / the inputs of autograd.grad) and asks each whether it holds, released, or
# never had saved tensors (gradprobe.capture.graph.walk: one walk per backward, shared with inplace_saved,
# which reads the stale nodes from it). A released one means PyTorch will raise:
# GP101 is emitted before the call runs, so `on_finding="raise"` turns it into GradProbeError at the
# user's line. At a backward without retain_graph, the nodes it will release are intersected with the
# graphs of other live losses that have not been backwarded (tensors bound in the caller's frame, or
# named with `t.name`): GP102 warns right then that their backward will fail.
# Graph nodes cannot be weakly referenced, so what a backward freed is remembered by node id for the
# last few backwards only, and an id is trusted only while the node it names is really freed.

# NOTE [predictions resolve]
# GP102 is a prediction: metrics computed with grad, logging expressions and
# torch.autograd.gradcheck build graphs nobody backwards. A prediction comes true when a later traced
# backward runs into a node the warned backward freed. It is refuted when the named loss is
# backwarded without meeting such a node (`inputs=` pruned them away), or when the trace ends first:
# then it is revised (`trace.revise`) into an "info" copy whose message starts "predicted, did not
# happen" (the GradProbeWarning issued at the time stays).
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.capture.graph import iter_nodes, sequence_nr, walk
from gradprobe.capture.sites import Site
from gradprobe.detectors._subgraph import shared_tree
from gradprobe.detectors.freed_graph_fixes import fix_for, running_total
from gradprobe.detectors._common import TensorSet, call_text, is_augmented, node_owner, op_name, tensors_in_frame
from gradprobe.findings import Finding, RelatedSite
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from types import FrameType

    from gradprobe.capture.calls import BackwardCall
    from gradprobe.ledger.ledger import BackwardRecord
    from gradprobe.api.trace import Trace

__all__ = ["FreedGraph"]

_ACCUMULATE_GRAD = type(torch.empty(1, requires_grad=True).expand(1).grad_fn.next_functions[0][0])


class _Freed:
    """What one finished backward without retain_graph released."""

    __slots__ = ("record", "nodes", "leaves", "opaque")

    def __init__(
        self,
        record: BackwardRecord | None,
        nodes: set[int],
        leaves: dict[int, tuple[Any, int]],
        opaque: set[tuple[int, int]],
    ) -> None:
        self.record = record
        self.nodes = nodes
        self.leaves = leaves  # id(leaf) -> (weakref to the leaf, its _version at that backward)
        self.opaque = opaque  # (id, sequence number) of the CopySlices nodes it ran (NOTE [CopySlices])


class _Prediction:
    """A GP102 finding and the backward it predicts to fail (NOTE [predictions resolve])."""

    __slots__ = ("finding", "other", "other_id", "nodes")

    def __init__(self, finding: Finding, other: torch.Tensor, nodes: set[int]) -> None:
        self.finding = finding
        self.other = weakref.ref(other)
        self.other_id = id(other)
        self.nodes = nodes  # ids of the nodes the warned backward frees


class FreedGraph:
    """Predicts PyTorch's "Trying to backward through the graph a second time" before it happens."""

    default = True
    gradprobe_name = "freed_graph"

    def __init__(self) -> None:
        self._history: deque[_Freed] = deque(maxlen=16)
        self._pending: dict[int, _Freed] = {}
        self._backwarded = TensorSet()  # roots already backwarded
        self._warned: set[tuple[str, Site | None]] = set()  # GP102 once per (other loss, line)
        self._predicted: list[_Prediction] = []  # GP102s whose predicted backward has not run yet

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        roots = [r.grad_fn for r in call.roots if r.grad_fn is not None]
        if not roots:
            return
        for root in call.roots:
            self._backwarded.add(root)
        found = walk(call)
        nodes, freed, live = found.nodes, found.freed, found.live
        first = found.first
        if found.maybe_freed:  # NOTE [custom Functions after a backward] in capture/graph.py
            confirmed = [n for n in found.maybe_freed if self._freed_by(n) is not None]
            if confirmed:
                freed = freed + confirmed
                first = found.first_failure(freed)
        if self._predicted:
            self._resolve(trace, call, freed)
        if first == "freed":
            trace.emit(self._will_raise(trace, call, nodes, freed))
            return
        opaque = {(id(n), sequence_nr(n)) for n in nodes if type(n).__name__ == "CopySlices"}
        if opaque and first is None:
            self._opaque_notice(trace, call, opaque)
        if call.retain_graph or not (live or opaque) or found.stale:  # stale: this backward raises, frees nothing
            return
        leaves = {}
        for node in nodes:
            if type(node) is _ACCUMULATE_GRAD:
                var = node.variable
                leaves[id(var)] = (weakref.ref(var), var._version)
        self._pending[call.index] = _Freed(None, {id(n) for n in live}, leaves, opaque)
        frame = call.frame
        for finding in self._early_warnings(trace, call, frame, {id(n) for n in nodes}, live):
            trace.emit(finding)

    def _opaque_notice(self, trace: Trace, call: BackwardCall, opaque: set[tuple[int, int]]) -> None:
        """GP103 (info): the graph goes through an in-place-on-a-view node, whose saved tensors are hidden.

        # NOTE [CopySlices]
        # An in-place op through a view (`h[0].mul_(3.0)`) wraps its backward node in a `CopySlices`
        # node, which exposes neither the wrapped node nor its saved tensors. After a backward without
        # retain_graph ran it, a second backward through it raises "backward through the graph a second
        # time" exactly when the wrapped op saved a tensor (`mul_` does, `add_` of a number does not),
        # and a later in-place write to a tensor it saved makes it raise "modified by an inplace
        # operation"; nothing gradprobe can read says which. Predicting either way would be a false
        # alarm or a false all-clear, so when a backward goes through such a node and nothing else is
        # predicted, the detector says what it cannot see, once per line, as an info finding (naming the
        # earlier backward that ran the node, when there was one). Nodes are told apart by (id,
        # sequence number): ids alone are reused once a graph dies.
        """
        if (call.site, "GP103") in self._warned:
            return
        self._warned.add((call.site, "GP103"))
        earlier = next((e for e in reversed(self._history) if e.opaque & opaque), None)
        rec = earlier.record if earlier is not None else None
        where = f" at {rec.site}" if rec is not None and rec.site is not None else ""
        ran = (
            f"that an earlier backward{where} ran without retain_graph"
            if earlier is not None
            else "created before this backward"
        )
        trace.emit(
            Finding(
                code="GP103",
                kind="freed_graph",
                severity="info",
                message=(
                    f"{call_text(call.name, call.kind)} goes through an in-place write to a view (a CopySlices "
                    f"node) {ran}; PyTorch hides the tensors that write saved, so gradprobe cannot check them: "
                    "if PyTorch raises \"Trying to backward through the graph a second time\" or \"modified by "
                    "an inplace operation\" here, that node is where"
                ),
                site=call.site,
                fix="if PyTorch raises here: write out of place instead of through the view (build a new "
                "tensor, e.g. with torch.cat or torch.where), or pass retain_graph=True to the earlier backward",
                plugin="freed_graph",
            )
        )

    @hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: BackwardRecord, error: BaseException | None) -> None:
        pending = self._pending.pop(record.index, None)
        if pending is not None and error is None:
            pending.record = record
            self._history.append(pending)

    @hookimpl
    def gradprobe_trace_end(self, trace: Trace) -> None:
        unresolved, self._predicted = self._predicted, []
        for prediction in unresolved:  # NOTE [predictions resolve]
            self._did_not_happen(trace, prediction)
        self._history.clear()
        self._pending.clear()
        self._backwarded.clear()

    def _resolve(self, trace: Trace, call: BackwardCall, freed: list[Any]) -> None:
        """Settle the GP102 predictions this backward decides.

        It fulfils one when it meets a node that prediction said would be freed. It refutes one when
        it backwards the named loss without meeting such a node (``inputs=`` pruned the freed part
        away, say): that prediction is revised to info at once.
        """
        roots = {id(r): r for r in call.roots}
        freed_ids = {id(n) for n in freed}
        kept = []
        for p in self._predicted:
            if p.nodes & freed_ids:
                continue  # came true
            root = roots.get(p.other_id)
            if root is not None and root is p.other():
                self._did_not_happen(trace, p)
                continue
            kept.append(p)
        self._predicted = kept

    @staticmethod
    def _did_not_happen(trace: Trace, prediction: _Prediction) -> None:
        finding = prediction.finding
        trace.revise(finding, replace(finding, severity="info", message="predicted, did not happen: " + finding.message))

    # -- GP101: this backward will raise -------------------------------------------------------

    def _freed_by(self, node: Any) -> _Freed | None:
        for entry in reversed(self._history):
            if id(node) in entry.nodes:
                return entry
        return None

    def _will_raise(self, trace: Trace, call: BackwardCall, nodes: list[Any], freed: list[Any]) -> Finding:
        frame = call.frame
        freed_ids = {id(n) for n in freed}
        frontier = [n for n in freed if id(n) in {id(r.grad_fn) for r in call.roots}]
        for node in nodes:
            if id(node) in freed_ids:
                continue
            for nxt, _ in node.next_functions:
                if nxt is not None and id(nxt) in freed_ids and all(nxt is not f for f in frontier):
                    frontier.append(nxt)
        top = frontier[0] if frontier else freed[0]
        earlier = self._freed_by(top)
        locals_ = tensors_in_frame(frame)
        shared_name, created = node_owner(frame, top, locals_)
        what = f"`{shared_name}` ({op_name(top)})" if shared_name else op_name(top)
        by = "an earlier backward that gradprobe did not see"
        related: list[RelatedSite] = []
        if earlier is not None and earlier.record is not None:
            rec = earlier.record
            by = call_text(rec.name, rec.kind)
            if rec.site is not None:
                by += f" at {rec.site}"
                related.append(RelatedSite(rec.site.filename, rec.site.lineno, "freed the saved tensors (no retain_graph)"))
        if created is not None:
            related.append(RelatedSite(created.filename, created.lineno, f"created {what}"))
        message = (
            f"{call_text(call.name, call.kind)} will raise \"Trying to backward through the graph a second time\": its graph "
            f"goes through {what}, whose saved tensors {by} already freed"
        )
        fix = fix_for(trace, call, frame, earlier, top, shared_name, locals_)
        return Finding(
            code="GP101",
            kind="freed_graph",
            severity="error",
            message=message,
            site=call.site,
            related=tuple(related),
            fix=fix,
            plugin="freed_graph",
            data={
                "node": type(top).__name__,
                "freed_by": earlier.record.index if earlier and earlier.record else None,
                "graph": shared_tree(trace, frame, top, freed_ids, "freed"),
            },
        )

    # -- GP102: a backward that will make another one fail ---------------------------------------

    def _early_warnings(
        self, trace: Trace, call: BackwardCall, frame: FrameType | None, in_graph: set[int], live: list[Any]
    ) -> list[Finding]:
        candidates: dict[int, tuple[str, Any]] = {}
        for name, t in tensors_in_frame(frame).items():
            if t.grad_fn is not None and t.numel() == 1:
                candidates.setdefault(id(t), (name, t))
        for ref, name in list(trace._names.values()):
            t = ref()
            if t is not None and t.grad_fn is not None:
                candidates[id(t)] = (name, t)
        root_ids = {id(r) for r in call.roots}
        will_free = {id(n): n for n in live}
        findings = []
        for name, t in candidates.values():
            if id(t) in root_ids or id(t.grad_fn) in in_graph:
                continue
            if t in self._backwarded:
                continue
            if (name, call.site) in self._warned:
                continue
            shared = next((n for n in iter_nodes([t.grad_fn]) if id(n) in will_free), None)
            if shared is None:
                continue
            self._warned.add((name, call.site))
            finding = self._warning(trace, call, frame, name, shared, set(will_free))
            self._predicted.append(_Prediction(finding, t, set(will_free)))
            findings.append(finding)
        return findings

    def _warning(
        self, trace: Trace, call: BackwardCall, frame: FrameType | None, other: str, shared: Any, will_free: set[int]
    ) -> Finding:
        locals_ = tensors_in_frame(frame)
        shared_name, created = node_owner(frame, shared, locals_)
        what = f"`{shared_name}` ({op_name(shared)})" if shared_name else op_name(shared)
        related = [RelatedSite(created.filename, created.lineno, f"created {what}")] if created else []
        return Finding(
            code="GP102",
            kind="freed_graph",
            severity="warning",
            message=(
                f"{call_text(call.name, call.kind)} frees the saved tensors of {what}, which `{other}` still needs: "
                f"a later `{other}.backward()` will raise \"Trying to backward through the graph a second time\""
            ),
            site=call.site,
            related=tuple(related),
            fix=(
                running_total(other, call.name)
                if is_augmented(frame, other)
                else f"pass retain_graph=True here, or add the losses and call backward once "
                f"(`({call.name} + {other}).backward()`)"
            ),
            plugin="freed_graph",
            data={
                "other": other,
                "node": type(shared).__name__,
                "graph": shared_tree(trace, frame, shared, will_free, "freed by this backward"),
            },
        )
