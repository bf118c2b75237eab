"""The built-in ``decompose`` plugin: splits backwards of combined losses, finds conflicting losses.

It watches ``torch.nn.functional`` losses through the interceptor (only when ``decompose`` is on),
computes per-loss parts before a backward runs (see :mod:`gradprobe.analysis.decompose`), reduces them in
that backward's own leaf hooks, and turns everything into :class:`~gradprobe.Split` objects and
conflict findings (:mod:`gradprobe.analysis.decompose_results`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from gradprobe.analysis.decompose import LeafReduction, compute_rows, reduce_rows, weights_of
from gradprobe.analysis.decompose_results import Pending, conflict_findings, cost_text, to_split
from gradprobe.analysis.loss_watch import LossWatch
from gradprobe.analysis.losses import LOSS_FUNCTIONS, LossBook, find_components
from gradprobe.analysis.side_effects import HookBook, quiet_passes, scan
from gradprobe.analysis.strategy import facts_for, next_strategy, record_passes, signature
from gradprobe.capture.sites import user_frame
from gradprobe.analysis.split import Split
from gradprobe.analysis.split_sources import per_backward_split
from gradprobe.findings import Finding
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from gradprobe.capture.calls import BackwardCall
    from gradprobe.ledger.ledger import BackwardRecord
    from gradprobe.api.trace import Trace

__all__ = ["Decomposer", "parse_decompose"]


def parse_decompose(value: object) -> int:
    """``True`` → 1, ``False`` → 0, ``"every:N"`` → N (decompose every N-th backward)."""
    if value is True:
        return 1
    if value is False or value is None:
        return 0
    if isinstance(value, str) and value.startswith("every:"):
        try:
            every = int(value[6:])
        except ValueError:
            every = 0
        if every >= 1:
            return every
    raise ValueError(
        f"trace(decompose=...) must be True, False or 'every:N' with N >= 1 (e.g. 'every:100'), got {value!r}"
    )


class Decomposer:
    """Built-in plugin behind ``trace(..., decompose=...)``."""

    def __init__(self) -> None:
        self.every = 0
        self.book = LossBook()
        self.hooks = HookBook()
        self.skipped: set[str] = set()  # reasons already told (GP410), once each per trace
        self.calls = 0
        self.pending: dict[int, Pending] = {}
        self.done: list[Pending] = []
        self._splits: tuple[int, list[Split]] | None = None
        self.cost = ""  # what splitting cost over all decomposed backwards of the trace, in words

    # -- hooks -------------------------------------------------------------------------------

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        self.every = parse_decompose(trace.decompose)
        if self.every:
            table = trace._mode.table
            table.update(dict.fromkeys(LOSS_FUNCTIONS, self._on_loss))
            _chain(table, torch.Tensor.register_hook, self.hooks.on_register_hook)
            _chain(table, torch._C.TensorBase.retain_grad, self.hooks.on_retain_grad)
            trace.own_context(LossWatch(self.book))  # losses outside torch.nn.functional (registry)

    def _on_loss(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = func(*args, **kwargs)
        self.book.add(out, func, user_frame())
        return out

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        if not self.every or call.create_graph or call.is_grads_batched or len(call.roots) != 1:
            return
        self.calls += 1
        if (self.calls - 1) % self.every:
            return
        root = call.roots[0]
        if root.grad_fn is None or root.numel() != 1:
            return
        components, rest_leaves, nodes = find_components(root, self.book.candidates(trace._names))
        rest = bool(rest_leaves)
        if not components or (len(components) == 1 and not rest):
            return
        reached: set[int] = set().union(*(c.leaves for c in components), rest_leaves)
        allowed = None if call.inputs is None else {id(t) for t in call.inputs}
        states = [
            s
            for s in trace._ledger.leaves
            if id(s.leaf.tensor) in reached and (allowed is None or id(s.leaf.tensor) in allowed)
        ]
        if not states:
            return
        leaves = [s.leaf.tensor for s in states]
        hazards = scan(nodes, leaves, self.hooks)
        if hazards.blocking:
            self._skip(trace, call, hazards.blocking)
            return
        sig, node_names = signature(nodes, leaves, components, rest)
        facts, new_graph = facts_for(sig, node_names)
        chosen = next_strategy(facts)
        derived = None
        computed = list(components)
        if facts.checked and not rest and not hazards.hook_names:
            derived = max(range(len(components)), key=lambda i: components[i].size)
            computed.pop(derived)
        try:
            with trace.muted(), quiet_passes(hazards, [root, *leaves]):
                weights = weights_of(root, components)
                wmap = dict(zip((c.name for c in components), weights))
                rows, strategy, note, seconds = compute_rows(
                    computed, [wmap[c.name] for c in computed], leaves, chosen
                )
        except RuntimeError as exc:  # the user's backward code refused to run again (it will run once, as usual)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            self._skip(trace, call, [f"gradprobe's extra autograd passes raised ({first})"])
            return
        record_passes(facts, strategy, seconds, len(computed))
        names = [c.name for c in components] + (["(rest)"] if rest else [])
        notes = [note] if note else []
        if hazards.hook_names:
            notes.append(
                "not run in gradprobe's extra passes: " + "; ".join(hazards.hook_names)
                + " (so every part is computed, and Σ shows whether the hooks change the gradient)"
            )
        how = _how(strategy, chosen, facts, len(computed), note)
        entry = Pending(call.index, names, [[w.detach() for w in ws] for ws in weights], how, notes)
        entry.derived = derived if derived is not None else (len(components) if rest else None)
        entry.facts = facts
        entry.first = new_graph
        entry.passes_s = seconds
        entry.device = leaves[0].device
        keep = trace.keep == "tensors"
        for state, leaf, row in zip(states, leaves, rows):
            flags = tuple(id(leaf) in c.leaves for c in components) + ((id(leaf) in rest_leaves,) if rest else ())
            red = LeafReduction(state, flags, rows=row)
            entry.entries.append(red)
            entry.handles.append(leaf.register_hook(self._reducer(trace, red, entry, keep)))
        self.pending[call.index] = entry
        if entry.device.type == "cuda":
            torch.cuda.synchronize(entry.device)
        entry.started = time.perf_counter()

    def _skip(self, trace: Trace, call: BackwardCall, reasons: list[str]) -> None:
        """One GP410 info finding per reason and trace: this backward is not split, and why."""
        for reason in reasons:
            if reason in self.skipped:
                continue
            self.skipped.add(reason)
            trace.emit(
                Finding(
                    code="GP410",
                    kind="decompose_skipped",
                    severity="info",
                    message=f"{call.name!r} was not split into per-loss parts: {reason}",
                    site=call.site,
                    fix="nothing is wrong with your code; the backward ran once, as without the trace",
                    plugin="decompose",
                    data={"reason": reason},
                )
            )

    @staticmethod
    def _reducer(trace: Trace, red: LeafReduction, entry: Pending, keep: bool) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not trace._muted and red.gram is None:
                start = time.perf_counter()
                reduce_rows(red, grad, entry.derived, keep)
                entry.reduce_s += time.perf_counter() - start

        return hook

    @hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: BackwardRecord, error: BaseException | None) -> None:
        if not record.retain_graph:
            self.book.release()
            self.hooks.release()
        entry = self.pending.pop(record.index, None)
        if entry is None:
            return
        if entry.device is not None and entry.device.type == "cuda":
            torch.cuda.synchronize(entry.device)
        entry.backward_s = max(time.perf_counter() - entry.started - entry.reduce_s, 0.0)
        for handle in entry.handles:
            handle.remove()
        entry.handles = []
        if error is not None:
            return
        if entry.derived is None or entry.names[entry.derived] != "(rest)":
            entry.facts.checked = True  # this graph's parts were all computed and checked once
        for red in entry.entries:
            if red.rows is not None or red.gram is None:
                reduce_rows(red, None, entry.derived, trace.keep == "tensors")
        self.done.append(entry)
        self._splits = None

    @hookimpl
    def gradprobe_trace_end(self, trace: Trace) -> None:
        self.book.release()
        self.hooks.release()
        for entry in self.pending.values():
            for handle in entry.handles:
                handle.remove()
        self.pending.clear()

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> list[Finding]:
        return conflict_findings(self.splits(trace))

    # -- data --------------------------------------------------------------------------------

    def splits(self, trace: Trace) -> list[Split]:
        """Decomposed splits in call order, then the per-backward split (if 2+ backwards fed .grad)."""
        version = trace._ledger.version
        if self._splits is not None and self._splits[0] == version:
            return self._splits[1]
        out = [to_split(trace, entry) for entry in self.done]
        self.cost = cost_text(self.done)
        per = per_backward_split(trace)
        if per is not None:
            out.append(per)
        self._splits = (version, out)
        return out


def _how(strategy: str, chosen: str, facts: Any, passes: int, note: str) -> str:
    """The strategy in words: which, why, and how many extra passes."""
    count = f"{passes} extra pass{'es' * (passes != 1)}" if strategy == "loop" else f"one vectorized call for {passes} losses"
    if strategy != chosen:
        why = "vmap could not run this graph"
    elif facts.slow:
        shown = ", ".join(facts.slow[:3]) + (" …" if len(facts.slow) > 3 else "")
        why = f"chosen from the graph: vmap is slow on {shown}"
    elif len(facts.per_pass) == 2:
        t = facts.per_pass
        why = f"faster per loss on this graph (batched {t['batched'] * 1e3:.1f} ms, loop {t['loop'] * 1e3:.1f} ms)"
    elif strategy == "batched":
        why = "chosen from the graph: no op in it is slow under vmap"
    else:
        why = "timing it against the batched call on this backward"
    return f"{strategy} ({count}; {why})"


def _chain(table: dict[Any, Any], func: Any, handler: Callable[..., Any]) -> None:
    """Route ``func`` through ``handler`` in the interceptor's table, after any handler already there."""
    before = table.get(func)
    if before is None:
        table[func] = handler
    else:
        table[func] = lambda f, args, kwargs: handler(lambda *a, **k: before(f, a, k), args, kwargs)
