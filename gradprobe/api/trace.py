"""The Trace: enter/exit, owns every hook handle, the ledger and the plugin host.

# NOTE [which backward a hook belongs to]
# `torch._C._current_graph_task_id()` is one id per backward call, shared by all its hooks, but it
# is only assigned once the engine starts. So before running a call, the trace registers a prehook
# on each root's grad_fn; the root runs first, and its prehook binds the task id to the call's
# record. A hook with a task id nobody bound belongs to a backward nested in a traced one (a
# reentrant checkpoint) when a traced call is running on that thread or the hook runs on an engine
# device thread, and otherwise to a backward started on a thread the interceptor cannot see (modes
# are thread-local); that one gets a record of its own, named from what its hooks can learn.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from gradprobe._assertions import TraceAssertions
from gradprobe._breakdown import FinalGrad, LeafBreakdown, compute_breakdown, snapshot_final
from gradprobe._calls import BackwardCall, describe_call
from gradprobe._decompose_plugin import parse_decompose
from gradprobe._intercept import Interceptor
from gradprobe._ledger import BackwardRecord, Leaf, Ledger, LeafState
from gradprobe._plugins import PluginHost
from gradprobe._sites import expression_at, name_in_frame, site_of, thread_name, user_frame, user_site
from gradprobe._targets import LeafNamer, leaves_of_graph, resolve_targets, tensor_label
from gradprobe._transforms import COMPILED_CODE, compiled_notice, functorch_active, functorch_notice, has_compiled_node
from gradprobe.exceptions import GradProbeError, GradProbeWarning, TraceStateError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rich.console import Console, ConsoleOptions, RenderResult
    from torch.utils.hooks import RemovableHandle

    from gradprobe._distributed import MergedTrace
    from gradprobe._split import Split
    from gradprobe.findings import Finding

__all__ = ["Trace", "trace"]

_current_task = torch._C._current_graph_task_id
_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
_no_torch_function = torch._C.DisableTorchFunction

Keep = Literal["stats", "tensors"]
Policy = Literal["warn", "raise", "record"]


def trace(
    *targets: Any,
    keep: Keep = "stats",
    report: bool = False,
    on_finding: Policy = "warn",
    plugins: Iterable[Any] = (),
    disable: Iterable[str] = (),
    console: Console | None = None,
    detect: str | Iterable[str] = "default",
    decompose: bool | str = False,
) -> Trace:
    """Record every backward call's exact contribution to the gradients of ``targets``.

    Args:
        *targets: ``nn.Module`` objects (their parameters that require grad), leaf tensors, or
            iterables of them. With none, every leaf any traced backward reaches is recorded.
        keep: ``"stats"`` keeps per-part statistics on the device (cheap); ``"tensors"`` also keeps
            each part, so the parts can be summed and compared with ``.grad`` bit for bit.
        report: print :meth:`Trace.report` when the block exits.
        on_finding: ``"warn"`` issues a :class:`~gradprobe.GradProbeWarning` per finding,
            ``"raise"`` raises :class:`~gradprobe.GradProbeError` at an error finding, ``"record"``
            only collects them in :attr:`Trace.findings`.
        plugins: extra plugins (objects, or classes instantiated for this trace).
        disable: names of plugins to leave out (built-in or installed).
        console: the rich console ``report=True`` prints to.
        detect: which built-in mistake detectors run: ``"default"`` (the cheap ones), ``"all"``, or
            an iterable of detector names (see :mod:`gradprobe.detectors`).
        decompose: split each backward of a combined loss (``(l_cls + 0.5 * l_box).backward()``) into
            the part each component loss adds: ``True``, ``False`` or ``"every:N"`` (every N-th backward).
            Components are losses named with :meth:`Trace.name` / :meth:`Trace.losses` and the outputs of
            ``torch.nn.functional`` losses called inside the trace. See :meth:`Trace.splits`.

    Example::

        with gradprobe.trace(model) as t:
            loss_cls.backward(retain_graph=True)
            loss_box.backward()
        t.report()
    """
    return Trace(
        targets,
        keep=keep,
        report=report,
        on_finding=on_finding,
        plugins=plugins,
        disable=disable,
        console=console,
        detect=detect,
        decompose=decompose,
    )


class Trace(TraceAssertions):
    """A gradient trace; use it as a context manager (see :func:`gradprobe.trace`)."""

    def __init__(
        self,
        targets: tuple[Any, ...] = (),
        *,
        keep: Keep = "stats",
        report: bool = False,
        on_finding: Policy = "warn",
        plugins: Iterable[Any] = (),
        disable: Iterable[str] = (),
        console: Console | None = None,
        detect: str | Iterable[str] = "default",
        decompose: bool | str = False,
        _frame_depth: int = 2,
    ) -> None:
        if keep not in ("stats", "tensors"):
            raise ValueError(f"trace(keep=...) must be 'stats' or 'tensors', got {keep!r}")
        if on_finding not in ("warn", "raise", "record"):
            raise ValueError(f"trace(on_finding=...) must be 'warn', 'raise' or 'record', got {on_finding!r}")
        parse_decompose(decompose)  # validates
        self.keep: Keep = keep
        self.decompose = decompose
        self.on_finding: Policy = on_finding
        self._print_report = report
        self._console = console
        self._serial = itertools.count()
        self._ledger = Ledger(keep)
        self._findings: list[Finding] = []
        self._notices: set[str] = set()
        self._names: dict[int, tuple[Any, str]] = {}
        self._by_id: dict[int, LeafState] = {}
        self._handles: list[RemovableHandle] = []
        self._state: Literal["new", "active", "done"] = "new"
        self._mode = Interceptor(self)
        self._by_task: dict[int, BackwardRecord] = {}
        self._active: dict[int, list[BackwardRecord]] = {}  # thread ident -> running traced calls
        self._quiet_records: set[int] = set()
        self._flushing: set[int] = set()  # graph tasks with a flush callback queued
        self._unhooked: list[tuple[torch.Tensor, LeafState]] = []  # tracked before __enter__
        self._muted = 0
        self._finals: list[FinalGrad] | None = None
        self._cache: list[LeafBreakdown] | None = None  # the breakdown, once the trace is done
        self.every_leaf = not targets
        frame = user_frame(_frame_depth)
        for tensor, name, module in resolve_targets(targets, frame, self._serial):
            self._track(tensor, name, module)
        self._plugins = PluginHost(self, plugins, disable, detect)

    # -- public data API ---------------------------------------------------------------------

    @property
    def records(self) -> tuple[BackwardRecord, ...]:
        """One :class:`BackwardRecord` per backward / autograd.grad call, in call order."""
        return tuple(self._ledger.records)

    @property
    def leaves(self) -> tuple[Leaf, ...]:
        """Every recorded leaf, in the order it was first tracked."""
        return tuple(state.leaf for state in self._ledger.leaves)

    @property
    def findings(self) -> list[Finding]:
        """Findings so far (detectors and plugins add to it; see :meth:`emit`)."""
        return list(self._findings)

    @property
    def active(self) -> bool:
        return self._state == "active"

    @property
    def plugin_names(self) -> list[str]:
        return self._plugins.names

    def name(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Name a loss (or a leaf) for the report; returns ``tensor`` so it can wrap an expression."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Trace.name() names tensors; got {type(tensor).__name__} for {name!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Trace.name() needs a non-empty string name, got {name!r}")
        self._names[id(tensor)] = (weakref.ref(tensor), name)
        state = self._by_id.get(id(tensor))
        if state is not None and state.leaf.tensor is tensor:
            state.leaf = replace(state.leaf, name=name)
        return tensor

    def losses(self, losses: Any) -> Any:
        """Name the component losses of a combined loss (a dict ``{name: loss}``); returns ``losses``.

        Example: ``total = sum(t.losses({"cls": l_cls, "box": l_box}).values())``.
        """
        if not isinstance(losses, Mapping):
            raise TypeError(f"Trace.losses() takes a dict {{name: loss tensor}}, got {type(losses).__name__}")
        for name, loss in losses.items():
            self.name(loss, str(name))
        return losses

    def splits(self) -> list[Split]:
        """Per-loss splits: one per decomposed backward, then the final .grad split by backward call."""
        return self._decomposer().splits(self)

    def plot(self, path: str | None = None, split: int = -1) -> Any:
        """Draw "gradient flow by loss" per module (needs ``pip install gradprobe[plot]``); returns the figure."""
        from gradprobe._plot import plot_split

        splits = self.splits()
        if not splits:
            raise ValueError("Trace.plot(): nothing to plot; use trace(..., decompose=True) or 2+ backward calls")
        return plot_split(splits[split], path)

    def _decomposer(self) -> Any:
        plugin = self._plugins.pm.get_plugin("decompose")
        if plugin is None:
            raise RuntimeError("the 'decompose' plugin is disabled in this trace (trace(disable=['decompose']))")
        return plugin

    def given_name(self, tensor: torch.Tensor) -> str | None:
        """The name given with :meth:`name`, if any."""
        entry = self._names.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        return None

    def breakdown(self) -> list[LeafBreakdown]:
        """Per leaf: the part each backward call added, what was carried in, the total and the check.

        Statistics are read back from the device here, once (cached after the trace ended).
        """
        if self._state == "done" and self._cache is not None:
            return self._cache
        finals = self._finals if self._finals is not None else snapshot_final(self._ledger)
        rows = compute_breakdown(self._ledger, finals)
        if self._state == "done":
            self._cache = rows
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Everything recorded, JSON-safe (non-finite numbers as strings)."""
        from gradprobe import __version__

        return {
            "gradprobe": __version__,
            "keep": self.keep,
            "records": [r.to_dict() for r in self._ledger.records],
            "leaves": [leaf.to_dict() for leaf in self.leaves],
            "breakdown": [row.to_dict() for row in self.breakdown()],
            "findings": [f.to_dict() for f in self._findings],
        }

    def gather(self, dst: int = 0, group: Any = None) -> MergedTrace | None:
        """Merge all ranks' traces of a torch.distributed job on rank ``dst`` (a collective call).

        Every rank must call it. Returns a :class:`~gradprobe._distributed.MergedTrace` on ``dst``
        (``.report()`` prints per-rank part norms, their spread, and whether the all-reduced ``.grad``
        agrees), None on the other ranks. Only small statistics travel (``gather_object``).
        """
        from gradprobe._distributed import gather_trace

        return gather_trace(self, dst, group)

    def report(self, console: Console | None = None) -> None:
        """Print the report (calls, gradient breakdown, findings) to ``console`` (default: rich's)."""
        import rich

        (console or self._console or rich.get_console()).print(self)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for sections in self._plugins.call("gradprobe_report_sections", trace=self):
            yield from sections

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Jupyter displays a trace as its rich report."""
        from gradprobe.report._export import mimebundle

        return mimebundle(self, include, exclude)

    def emit(self, finding: Finding) -> None:
        """Add a finding and apply ``on_finding`` (this raises :class:`GradProbeError` under "raise")."""
        self._add_finding(finding, self.on_finding)

    def notice_once(self, finding: Finding) -> None:
        """Emit ``finding`` unless one with the same code was already emitted by this trace."""
        if finding.code not in self._notices:
            self._notices.add(finding.code)
            self.emit(finding)

    def _add_finding(self, finding: Finding, policy: Policy) -> None:
        self._findings.append(finding)
        if policy == "raise" and finding.severity == "error":
            raise GradProbeError(finding.format(), finding)
        if policy in ("warn", "raise") and finding.severity != "info":
            site = finding.site
            if site is not None:
                warnings.warn_explicit(finding.format(), GradProbeWarning, site.filename, site.lineno)
            else:
                warnings.warn(finding.format(), GradProbeWarning, stacklevel=2)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Trace:
        if self._state != "new":
            raise TraceStateError(
                f"this gradprobe trace is {'already active' if self._state == 'active' else 'finished'}; "
                "a trace records one block: create a new one with gradprobe.trace(...) for each `with`"
            )
        self._state = "active"
        if "torch._dynamo" in sys.modules:  # NOTE [torch.compile] at _run_backward
            self._run_backward = torch.compiler.disable(self._run_backward)  # type: ignore[method-assign]
        try:
            unhooked, self._unhooked = self._unhooked, []
            for tensor, state in unhooked:
                self._hook(tensor, state)
            self._mode.watch_grad_reads = self._plugins.implemented("gradprobe_grad_read")
            self._mode.watch_writes = self._plugins.implemented("gradprobe_inplace_write")
            self._mode.__enter__()
            self._handles.append(_ModeHandle(self._mode))
            self._plugins.call("gradprobe_trace_start", trace=self)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        pending: GradProbeError | None = None
        try:
            with _no_torch_function():
                self._ledger.flush(everything=True)
            self._plugins.call("gradprobe_trace_end", trace=self)
            with _no_torch_function():
                self._finals = snapshot_final(self._ledger)
            # The block raised: the step never finished, so end-of-trace findings are only recorded
            # (in t.findings and the report); warning about them would bury the real error.
            policy: Policy = self.on_finding if exc_type is None else "record"
            for found in self._plugins.call("gradprobe_collect_findings", trace=self):
                for finding in found:
                    try:
                        self._add_finding(finding, policy)
                    except GradProbeError as error:
                        pending = pending or error
        finally:
            self._close()
        if self._print_report:
            self.report()
        if pending is not None:
            raise pending

    def _close(self) -> None:
        self._state = "done"
        self._unhooked = []
        handles, self._handles = self._handles, []
        for handle in reversed(handles):
            handle.remove()
        self._by_task.clear()
        self._active.clear()

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Run gradprobe's own autograd calls (e.g. decomposition) without recording them."""
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    # -- leaves and hooks --------------------------------------------------------------------

    def _track(self, tensor: torch.Tensor, name: str, module: str | None) -> LeafState:
        state = self._ledger.add_leaf(tensor, self.given_name(tensor) or name, module)
        self._by_id[id(tensor)] = state
        if self._state == "active":
            self._hook(tensor, state)
        else:  # hooks go on at __enter__: a trace never entered (or failing in __init__) leaves none
            self._unhooked.append((tensor, state))
        return state

    def _hook(self, tensor: torch.Tensor, state: LeafState) -> None:
        hooks = _LeafHooks(self, state)
        self._handles.append(tensor.register_hook(hooks.on_grad))
        self._handles.append(tensor.register_post_accumulate_grad_hook(hooks.on_accumulated))

    def _flush_task(self, task: int) -> None:
        """End of a backward (engine callback): take the deferred statistics (NOTE [deferred stats])."""
        self._flushing.discard(task)
        with _no_torch_function():
            self._ledger.flush()

    def _tracked(self, tensor: torch.Tensor) -> bool:
        state = self._by_id.get(id(tensor))
        return state is not None and state.leaf.tensor is tensor

    def _discover(self, roots: tuple[torch.Tensor, ...], frame: Any) -> None:
        new = [t for t in leaves_of_graph(roots) if not self._tracked(t)]
        if not new:
            return
        namer = LeafNamer(frame)
        for tensor in namer.order(new):
            # the namer already knows every local tensor of the frame by its variable name
            named = namer.name(tensor) or (tensor_label(tensor, next(self._serial)), None)
            self._track(tensor, named[0], named[1])

    # -- backward calls ----------------------------------------------------------------------

    # NOTE [torch.compile]: a backward called inside a compiled function runs (with its hooks,
    # which inherit this frame's setting) outside Dynamo, instead of Dynamo tracing gradprobe's
    # bookkeeping and breaking the graph at each frame walk and lock. `__enter__` wraps this method
    # in `torch.compiler.disable` when Dynamo is loaded; importing Dynamo only for that would add
    # ~1.5 s to `import gradprobe` for everyone who never compiles.
    def _run_backward(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._muted or self._state != "active":
            return func(*args, **kwargs)
        if functorch_active():  # NOTE [torch.func] in _transforms.py
            self.notice_once(functorch_notice(user_site(2)))
            return func(*args, **kwargs)
        frame = user_frame(2)
        site = site_of(frame)
        call = describe_call(
            func, args, kwargs, index=len(self._ledger.records), site=site, frame=frame, names=self.given_name
        )
        if self.every_leaf:
            self._discover(call.roots + (call.inputs or ()), frame)
        watching = self._mode.watch_writes or self._mode.watch_grad_reads
        if watching and COMPILED_CODE not in self._notices and has_compiled_node(call.roots):
            self.notice_once(compiled_notice(site))
        record = self._ledger.add_record(
            name=call.name,
            site=site,
            retain_graph=call.retain_graph,
            kind=call.kind,
            create_graph=call.create_graph,
            inputs=None if call.inputs is None else tuple(self._label(t, frame) for t in call.inputs),
            thread=thread_name(),
        )
        if call.is_grads_batched:
            self._quiet_records.add(record.index)  # hooks see vmapped gradients: not parts of .grad
        call = replace(call, index=record.index)
        stack = self._active.setdefault(threading.get_ident(), [])
        stack.append(record)
        handles = [
            root.grad_fn.register_prehook(lambda grad_outputs, r=record: self._bind(r))
            for root in call.roots
            if root.grad_fn is not None
        ]
        error: BaseException | None = None
        try:
            self._plugins.call("gradprobe_before_backward", trace=self, call=call)
            return func(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            for handle in handles:
                handle.remove()
            stack.pop()
            for tid in [tid for tid, r in self._by_task.items() if r is record]:
                del self._by_task[tid]
            with _no_torch_function():
                self._ledger.flush()  # also when the backward raised (its callbacks never ran)
            self._plugins.call("gradprobe_after_backward", trace=self, record=record, error=error)

    def _label(self, tensor: torch.Tensor, frame: Any) -> str:
        state = self._by_id.get(id(tensor))
        if state is not None and state.leaf.tensor is tensor:
            return state.leaf.name
        return self.given_name(tensor) or name_in_frame(frame, tensor) or tensor_label(tensor, next(self._serial))

    def _bind(self, record: BackwardRecord) -> None:
        self._by_task[torch._C._current_graph_task_id()] = record

    def _record_for_task(self) -> BackwardRecord:
        task = torch._C._current_graph_task_id()
        record = self._by_task.get(task)
        if record is not None:
            return record
        with self._ledger.lock:
            record = self._by_task.get(task)
            if record is None:
                record = self._nested_record() or self._unseen_record()
                self._by_task[task] = record
        return record

    def _nested_record(self) -> BackwardRecord | None:
        own = self._active.get(threading.get_ident())
        if own:
            return own[-1]
        running = [stack[-1] for stack in self._active.values() if stack]
        if running and user_frame(2) is None:  # an engine device thread working for a traced call
            return running[-1]
        return None

    def _unseen_record(self) -> BackwardRecord:
        site = user_site(2)
        source = site.source if site else ""
        kind: Literal["backward", "grad"] = "grad" if "grad(" in source and ".backward(" not in source else "backward"
        name = expression_at(site, "method" if ".backward(" in source else "function")
        name = name or f"{kind}#{len(self._ledger.records)}"
        return self._ledger.add_record(
            name=name, site=site, retain_graph=False, kind=kind, thread=thread_name(), seen=False
        )

    def __repr__(self) -> str:
        return (
            f"<gradprobe.Trace {self._state}: {len(self._ledger.records)} backward calls, "
            f"{len(self._ledger.leaves)} leaves, {len(self._findings)} findings>"
        )


class _LeafHooks:
    """The two hooks of one tracked leaf.

    # NOTE [hot path]
    # These run once per leaf per backward: keep them to a few dict lookups. One small object per
    # leaf (rather than two closures and their cells) also keeps the objects the garbage collector
    # tracks per leaf down, and full collections were a large part of the cost on wide models.
    # The interceptor is still on the mode stack inside hooks: every tensor attribute or method used
    # here would go through it, so hooks turn torch-function dispatch off.
    """

    __slots__ = ("trace", "state")

    def __init__(self, trace: Trace, state: LeafState) -> None:
        self.trace = trace
        self.state = state

    def on_grad(self, grad: torch.Tensor | None) -> None:
        trace = self.trace
        if trace._muted or grad is None:  # None: an undefined gradient (torch.autograd.gradcheck sends one)
            return
        with _no_torch_function():
            task = _current_task()
            record = trace._by_task.get(task)
            if record is None:
                record = trace._record_for_task()
            if record.index in trace._quiet_records:
                return
            state = self.state
            trace._ledger.on_part(state, record, grad)
            if state.deferred is not None and task not in trace._flushing:
                trace._flushing.add(task)
                _queue_callback(lambda: trace._flush_task(task))

    def on_accumulated(self, param: torch.Tensor) -> None:
        if not self.trace._muted:
            with _no_torch_function():
                self.trace._ledger.on_accumulated(self.state, param.grad)


class _ModeHandle:
    """Lets the interceptor mode be removed like any other hook handle."""

    def __init__(self, mode: Interceptor) -> None:
        self._mode: Interceptor | None = mode

    def remove(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
