"""The recorder: installs the hooks of one trace and turns what they see into ledger entries.

Place in the flow: this is the capture layer's engine. It owns every hook handle (leaf tensor hooks,
post-accumulate hooks, the interceptor mode, root prehooks, and what plugins hand it with ``own``), tracks which leaves are recorded, binds
each hook call to the backward call it belongs to, writes parts into the :class:`Ledger`, and tells
the plugin host about backward calls. It knows nothing of breakdowns, detectors or reports: the
public :class:`~gradprobe.Trace` sits on top of it and is passed to plugins as their subject.

# NOTE [which backward a hook belongs to]
# `torch._C._current_graph_task_id()` is one id per backward call, shared by all its hooks, but it
# is only assigned once the engine starts. So before running a call, the recorder registers a prehook
# on each root's grad_fn; the root runs first, and its prehook binds the task id to the call's
# record. A hook with a task id nobody bound belongs to an `autograd.grad` nested in another
# backward (inside a custom Function's backward), whose hook calls are ignored (NOTE [nested
# autograd.grad] in hooks.py); or to a backward nested in a traced one (a reentrant checkpoint) when
# a traced call is running on that thread or the hook runs on an engine device thread; and otherwise
# to a backward started on a thread the interceptor cannot see (modes are thread-local); that one
# gets a record of its own, named from what its hooks can learn.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import sys
import threading
import weakref
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from gradprobe.capture.calls import BACKWARD_FUNCTIONS, describe_call
from gradprobe.capture.hooks import LeafHookEntries, LeafHooks, engine_call
from gradprobe.capture.intercept import Backward, Interceptor
from gradprobe.capture.lifecycle import Removable, TensorHookSweep, enter_context, gc_paused, remove_all
from gradprobe.capture.steps import ScalerUpdate, Steps
from gradprobe.capture.sites import expression_at, name_in_frame, site_of, thread_name, user_frame, user_site
from gradprobe.capture.targets import LeafNamer, leaves_of_graph, tensor_label
from gradprobe.capture.transforms import (
    COMPILED_CODE,
    compiled_notice,
    functorch_active,
    functorch_notice,
    has_compiled_node,
)
from gradprobe.ledger.ledger import Ledger

if TYPE_CHECKING:
    from collections.abc import Iterator


    from gradprobe.capture.host import PluginHost
    from gradprobe.ledger.ledger import BackwardRecord, LeafState

__all__ = ["Recorder"]

_no_torch_function = torch._C.DisableTorchFunction

State = Literal["new", "active", "done"]
_MAX_IGNORED = 4096  # ignored nested grad tasks kept before orphans are dropped


class Recorder:
    """Hooks → ledger for one trace.

    Args:
        keep: the ledger's mode (``"stats"`` or ``"tensors"``).
        subject: the object plugins receive as ``trace=`` (the public :class:`~gradprobe.Trace`);
            it must offer ``notice_once(finding)``.
    """

    def __init__(self, keep: Literal["stats", "tensors"], subject: Any) -> None:
        self._subject = weakref.ref(subject)  # NOTE [no cycles]
        self.host: PluginHost | None = None  # set by the owner once its plugins are registered
        self.ledger = Ledger(keep)
        self.serial = itertools.count()
        self.names: dict[int, tuple[Any, str]] = {}  # id(tensor) -> (weakref, name given with t.name)
        self.by_id: dict[int, LeafState] = {}
        self.state: State = "new"
        self.mode = Interceptor(self)
        self.every_leaf = False
        self.muted = 0
        self.notices: set[str] = set()
        self._handles: list[Any] = []  # every owned removable: core hooks, the mode, plugins' (own())
        self.removal_errors: list[Exception] = []
        self._by_task: dict[int, BackwardRecord | None] = {}  # graph task -> record; None: ignored
        self._ignored: dict[int, BackwardRecord | None] = {}  # ignored task -> the call it is nested in
        self._active: dict[int, list[BackwardRecord]] = {}  # thread ident -> running traced calls
        self._quiet_records: set[int] = set()
        self._flushing: set[int] = set()  # graph tasks with a flush callback queued
        self._unhooked: list[tuple[torch.Tensor, LeafState]] = []  # tracked before install()
        self._entries: LeafHookEntries | None = None  # NOTE [hook entries] in hooks.py
        self.steps = Steps(self)  # NOTE [steps] in steps.py
        self._removal = [_Removal(weakref.ref(self))]  # for remove_retrying
        self.every = 1  # measure the parts of every N-th step only (NOTE [sampling] in analysis/run.py)

    # -- names -------------------------------------------------------------------------------

    def set_name(self, tensor: torch.Tensor, name: str) -> None:
        self.names[id(tensor)] = (weakref.ref(tensor), name)
        state = self.by_id.get(id(tensor))
        if state is not None and state.leaf.tensor is tensor:
            state.leaf = replace(state.leaf, name=name)

    # NOTE [no cycles]
    # A trace is made per step or per test, often thousands of times in a process. When its objects
    # form reference cycles (trace -> recorder -> trace, trace -> plugin host -> trace, recorder ->
    # interceptor -> recorder), none of them -- the ledger, every part, every plugin -- is freed when
    # the trace is dropped: they wait for the cyclic collector, whose full collections then scan them
    # all (milliseconds per step on a small model, and memory held until then). So ownership is a
    # tree from the Trace down, and every back-reference (the recorder's subject, the host's trace,
    # the interceptor's recorder) is weak: dropping the trace frees everything by reference counting.
    # tests/test_lifecycle.py checks that a finished trace leaves no cyclic garbage.
    @property
    def subject(self) -> Any:
        """The object plugins receive as ``trace=`` (the public Trace), held weakly."""
        return self._subject()

    def given_name(self, tensor: torch.Tensor) -> str | None:
        entry = self.names.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return str(entry[1])
        return None

    # -- install / remove --------------------------------------------------------------------

    def install(self) -> None:
        """Put every hook on (the trace's ``__enter__``); on failure, whatever went on comes off."""
        assert self.host is not None
        self.state = "active"
        if "torch._dynamo" in sys.modules:  # NOTE [torch.compile] at run_backward
            self.mode.table.update(dict.fromkeys(BACKWARD_FUNCTIONS, _uncompiled_backward(weakref.ref(self))))
        try:
            unhooked, self._unhooked = self._unhooked, []
            with gc_paused():  # NOTE [no collections while hooking] in lifecycle.py
                for tensor, state in unhooked:
                    self._hook(tensor, state)
            self.steps.install()
            self.mode.table[torch._amp_update_scale_] = ScalerUpdate(weakref.ref(self.steps))
            self.mode.watch_grad_reads = self.host.implemented("gradprobe_grad_read")
            self.mode.watch_writes = self.host.implemented("gradprobe_inplace_write")
            enter_context(self._handles, self.mode)
        except BaseException as exc:
            self.remove(interrupted=not isinstance(exc, Exception))
            raise

    def own(self, handle: Removable) -> Removable:
        """Remove ``handle`` in :meth:`remove` (last owned, first removed); return it."""
        self._handles.append(handle)
        return handle

    def own_context(self, context: Any) -> Removable:
        """Enter ``context`` now and exit it in :meth:`remove`; return a handle whose ``remove()`` exits it once."""
        return enter_context(self._handles, context)[0]

    def remove(self, interrupted: bool = False) -> None:
        """Take every hook off (idempotent; runs in the trace's ``finally`` path).

        Args:
            interrupted: an interruption (KeyboardInterrupt) cut the trace short; the recorder's own
                leaf hooks are then also looked for by identity (NOTE [interrupts during cleanup]).

        Raises:
            KeyboardInterrupt: one that arrived while removing, re-raised once everything is off.
        """
        self.state = "done"
        self._unhooked = []
        try:
            self.removal_errors += remove_all(self._handles)
        except BaseException:
            interrupted = True
            raise
        finally:
            if interrupted:
                remove_all([TensorHookSweep([s.leaf.tensor for s in self.ledger.leaves], self._owns_hook)])
            self._by_task.clear()
            self._ignored.clear()
            self._active.clear()

    def remove_retrying(self, interrupted: bool = False) -> None:
        """:meth:`remove`, run again when an interruption lands in it, even at its very first bytecode.

        The trace's ``__enter__`` / ``__exit__`` call this from their ``finally`` path: a signal
        handler may raise at the entry of ``remove`` itself, before any of its own guards run, and
        :func:`remove_all` retries it (NOTE [interrupts during cleanup]). Re-raises the interruption
        once everything is off.
        """
        removal = self._removal  # made in advance: no object to build between the interrupt guards
        removal[0].interrupted = interrupted
        self.removal_errors += remove_all(removal)

    def _owns_hook(self, fn: Any) -> bool:
        owner = getattr(fn, "__self__", None)
        return isinstance(owner, LeafHooks) and owner.recorder is self

    def flush(self, everything: bool = False) -> None:
        with _no_torch_function():
            self.ledger.flush(everything=everything)

    @contextlib.contextmanager
    def muting(self) -> Iterator[None]:
        self.muted += 1
        try:
            yield
        finally:
            self.muted -= 1

    # -- leaves and hooks --------------------------------------------------------------------

    def track(self, tensor: torch.Tensor, name: str, module: str | None) -> LeafState:
        state = self.ledger.add_leaf(tensor, self.given_name(tensor) or name, module)
        self.by_id[id(tensor)] = state
        if self.state == "active":
            self._hook(tensor, state)
        else:  # hooks go on at install(): a trace never entered (or failing in __init__) leaves none
            self._unhooked.append((tensor, state))
        return state

    def _hook(self, tensor: torch.Tensor, state: LeafState) -> None:
        hooks = LeafHooks(self, state)
        entries = self._entries
        if entries is None:
            entries = self._entries = LeafHookEntries()
            self._handles.append(entries)  # owned before anything is placed
        if not entries.place(tensor, hooks):
            self._handles.append(tensor.register_hook(hooks.on_grad))
            self._handles.append(tensor.register_post_accumulate_grad_hook(hooks.on_accumulated))

    def flush_task(self, task: int) -> None:
        """End of a backward (engine callback): take the deferred statistics (NOTE [deferred stats])."""
        self._flushing.discard(task)
        with _no_torch_function():
            self.ledger.flush()

    def tracked(self, tensor: torch.Tensor) -> bool:
        state = self.by_id.get(id(tensor))
        return state is not None and state.leaf.tensor is tensor

    def _discover(self, roots: tuple[torch.Tensor, ...], frame: Any) -> None:
        new = [t for t in leaves_of_graph(roots) if not self.tracked(t)]
        if not new:
            return
        namer = LeafNamer(frame)
        with gc_paused():  # NOTE [no collections while hooking] in lifecycle.py
            for tensor in namer.order(new):
                # the namer already knows every local tensor of the frame by its variable name
                named = namer.name(tensor) or (tensor_label(tensor, next(self.serial)), None)
                self.track(tensor, named[0], named[1])

    # -- backward calls ----------------------------------------------------------------------

    # NOTE [torch.compile]: a backward called inside a compiled function runs (with its hooks,
    # which inherit this frame's setting) outside Dynamo, instead of Dynamo tracing gradprobe's
    # bookkeeping and breaking the graph at each frame walk and lock. `install` wraps the
    # interceptor's backward handler in `torch.compiler.disable` when Dynamo is loaded; importing
    # Dynamo only for that would add ~1.5 s to `import gradprobe` for everyone who never compiles.
    def run_backward(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        host = self.host
        if self.muted or self.state != "active" or host is None:
            return func(*args, **kwargs)
        if functorch_active():  # NOTE [torch.func] in transforms.py
            self.subject.notice_once(functorch_notice(user_site(2)))
            return func(*args, **kwargs)
        self.mode.resume_writes()  # an optimizer step that raised never reached its post-hook
        frame = user_frame(2)
        site = site_of(frame)
        call = describe_call(
            func, args, kwargs, index=len(self.ledger.records), site=site, frame=frame, names=self.given_name
        )
        if self.every_leaf:
            self._discover(call.roots + (call.inputs or ()), frame)
        self.steps.before_backward()  # NOTE [steps]: a loop without an optimizer ends its steps by resetting .grad
        watching = self.mode.watch_writes or self.mode.watch_grad_reads
        if watching and COMPILED_CODE not in self.notices and has_compiled_node(call.roots):
            self.subject.notice_once(compiled_notice(site))
        record = self.ledger.add_record(
            name=call.name,
            site=call.site,
            retain_graph=call.retain_graph,
            kind=call.kind,
            create_graph=call.create_graph,
            inputs=None if call.inputs is None else tuple(self._label(t, frame) for t in call.inputs),
            thread=thread_name(),
        )
        if call.is_grads_batched or (self.every > 1 and record.step % self.every):
            # vmapped gradients are not parts of .grad; an unmeasured step's parts are not measured
            self._quiet_records.add(record.index)
        call = replace(call, index=record.index)
        stack = self._active.setdefault(threading.get_ident(), [])
        stack.append(record)
        handles = [
            root.grad_fn.register_prehook(lambda grad_outputs, r=record: self._bind(r))
            for root in call.roots
            if root.grad_fn is not None
        ]
        error: BaseException | None = None
        collecting = gc.isenabled()
        try:
            gc.disable()  # the leaf hooks allocate: NOTE [no collections while hooking] in lifecycle.py
            host.call("gradprobe_before_backward", trace=self.subject, call=call)
            return func(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                for handle in handles:
                    handle.remove()
                stack.pop()
                self._forget_nested(record)
                with _no_torch_function():
                    self.ledger.flush()  # also when the backward raised (its callbacks never ran)
                host.call("gradprobe_after_backward", trace=self.subject, record=record, error=error)
            finally:
                if collecting:
                    gc.enable()

    def forget_before(self, index: int) -> None:
        """Records before ``index`` were folded away: drop what the recorder still knows of them."""
        self._quiet_records = {i for i in self._quiet_records if i >= index}

    def _label(self, tensor: torch.Tensor, frame: Any) -> str:
        state = self.by_id.get(id(tensor))
        if state is not None and state.leaf.tensor is tensor:
            return state.leaf.name
        return self.given_name(tensor) or name_in_frame(frame, tensor) or tensor_label(tensor, next(self.serial))

    def _bind(self, record: BackwardRecord) -> None:
        self._by_task[torch._C._current_graph_task_id()] = record

    def record_for_task(self) -> BackwardRecord | None:
        """The record of the backward call the running hook belongs to (made on first sight if unseen).

        None for an ``autograd.grad`` nested in another backward (NOTE [nested autograd.grad]): its
        hook calls are no part of any record.
        """
        task = torch._C._current_graph_task_id()
        if task in self._by_task:
            return self._by_task[task]
        with self.ledger.lock:
            if task in self._by_task:
                return self._by_task[task]
            kind, nested = engine_call()
            outer = self._nested_record()
            record: BackwardRecord | None
            if nested and kind == "grad":  # NOTE [nested autograd.grad] in hooks.py
                record = None
                if len(self._ignored) > _MAX_IGNORED:  # orphans (outer unseen): resolving again is cheap
                    for tid in [tid for tid, r in self._ignored.items() if r is None]:
                        self._by_task.pop(tid, None)
                        del self._ignored[tid]
                self._ignored[task] = outer
            else:
                record = outer or self._unseen_record(kind)
            self._by_task[task] = record
        return record

    def _forget_nested(self, record: BackwardRecord) -> None:
        """Drop the task ids bound to ``record`` and to the grad calls nested in it (it has ended)."""
        for tid in [tid for tid, r in self._by_task.items() if r is record]:
            del self._by_task[tid]
        for tid in [tid for tid, r in self._ignored.items() if r is record]:
            self._by_task.pop(tid, None)
            del self._ignored[tid]

    def _nested_record(self) -> BackwardRecord | None:
        own = self._active.get(threading.get_ident())
        if own:
            return own[-1]
        running = [stack[-1] for stack in self._active.values() if stack]
        if running and user_frame(2) is None:  # an engine device thread working for a traced call
            return running[-1]
        return None

    def _unseen_record(self, kind: Literal["backward", "grad"] | None = None) -> BackwardRecord:
        site = user_site(2)
        source = site.source if site else ""
        if kind is None:  # no autograd call on this thread's stack (a C++ caller): guess from the line
            kind = "grad" if "grad(" in source and ".backward(" not in source else "backward"
        name = expression_at(site, "method" if ".backward(" in source else "function")
        name = name or f"{kind}#{len(self.ledger.records)}"
        return self.ledger.add_record(
            name=name, site=site, retain_graph=False, kind=kind, thread=thread_name(), seen=False
        )


def _uncompiled_backward(recorder: weakref.ReferenceType[Recorder]) -> Any:
    """The interceptor's backward handler, run outside Dynamo (NOTE [torch.compile] at run_backward).

    A handler object, not ``self.run_backward`` rebound on the recorder: that would be a reference
    cycle (NOTE [no cycles]).
    """
    return torch.compiler.disable(Backward(recorder))


class _Removal:
    """One :meth:`Recorder.remove` as a removable for :func:`remove_all`; a retry after an interruption sweeps."""

    __slots__ = ("recorder", "interrupted")

    def __init__(self, recorder: weakref.ReferenceType[Recorder]) -> None:
        self.recorder = recorder  # weak: the recorder owns this (NOTE [no cycles])
        self.interrupted = False

    def remove(self) -> None:
        interrupted, self.interrupted = self.interrupted, True  # any retry comes after an interruption
        recorder = self.recorder()
        if recorder is not None:
            recorder.remove(interrupted=interrupted)
