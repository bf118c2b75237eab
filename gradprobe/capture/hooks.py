"""The per-leaf hooks a recorder installs, and how a hook tells which backward call it runs in.

Place in the flow: capture. These are the hot path: they run once per leaf per backward and only
hand what they see to the recorder's ledger (NOTE [hot path]).
"""

from __future__ import annotations

import sys
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal

import torch

from gradprobe.capture.sites import TORCH_DIR

if TYPE_CHECKING:
    from gradprobe.capture.recorder import Recorder
    from gradprobe.ledger.ledger import LeafState

__all__ = ["LeafHookEntries", "LeafHooks", "engine_call"]

_current_task = torch._C._current_graph_task_id
_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
_no_torch_function = torch._C.DisableTorchFunction


class LeafHooks:
    """The two hooks of one tracked leaf.

    # NOTE [hot path]
    # These run once per leaf per backward: keep them to a few dict lookups. One small object per
    # leaf (rather than two closures and their cells) also keeps the objects the garbage collector
    # tracks per leaf down, and full collections were a large part of the cost on wide models.
    # The interceptor is still on the mode stack inside hooks: every tensor attribute or method used
    # here would go through it, so hooks turn torch-function dispatch off.
    """

    __slots__ = ("recorder", "state")

    def __init__(self, recorder: Recorder, state: LeafState) -> None:
        self.recorder = recorder
        self.state = state

    def on_grad(self, grad: torch.Tensor | None) -> None:
        recorder = self.recorder
        if recorder.muted or grad is None:  # None: an undefined gradient (torch.autograd.gradcheck sends one)
            return
        task = _current_task()
        record = recorder._by_task.get(task)
        if record is None:
            with _no_torch_function():
                record = recorder.record_for_task()
            if record is None:  # NOTE [nested autograd.grad]
                return
        if record.index in recorder._quiet_records:
            if record.kind == "backward":  # an unmeasured step's backward (NOTE [sampling] in analysis/run.py)
                with _no_torch_function():
                    recorder.ledger.on_skipped(self.state)
            return
        state = self.state
        with _no_torch_function():
            if recorder.ledger.on_part(state, record, grad) and task not in recorder._flushing:
                recorder._flushing.add(task)
                _queue_callback(lambda: recorder.flush_task(task))

    def on_accumulated(self, param: torch.Tensor) -> None:
        if not self.recorder.muted:
            with _no_torch_function():
                self.recorder.ledger.on_accumulated(self.state, param.grad)


# NOTE [hook entries]
# `Tensor.register_hook` / `register_post_accumulate_grad_hook` put the hook into a dict on the
# tensor (`_backward_hooks`, `_post_accumulate_grad_hooks`; assigning the dict the first time is
# what hands it to the autograd engine) under a fresh integer id, and return a RemovableHandle (an
# object, a weak reference and an id each). With two hooks per parameter per trace, those calls and
# objects were a large part of opening and closing a trace on a big model, and of the garbage the
# collector then scans. For plain tensors and Parameters that are leaves, the recorder writes the
# two entries itself, keyed by the leaf's LeafHooks object (unique, never equal to torch's integer
# ids), and removes them with one owned removable, LeafHookEntries: what the engine sees is exactly
# what the public calls would have made. Tensor subclasses (which may route those calls through
# `__torch_function__`) and anything else go through the public API.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class LeafHookEntries:
    """The leaf hooks one recorder placed straight into tensors' hook dicts, and their removal."""

    __slots__ = ("placed",)

    def __init__(self) -> None:
        self.placed: list[tuple[weakref.ReferenceType[torch.Tensor], LeafHooks]] = []

    def place(self, tensor: torch.Tensor, hooks: LeafHooks) -> bool:
        """Put both hooks on ``tensor``; False when it needs the public API (a subclass, a non-leaf)."""
        if type(tensor) not in _PLAIN_TYPES or tensor.grad_fn is not None or not tensor.requires_grad:
            return False
        self.placed.append((weakref.ref(tensor), hooks))  # before the entries: a removal finds them
        pre = tensor._backward_hooks
        if pre is None:
            tensor._backward_hooks = pre = OrderedDict()
        pre[hooks] = hooks.on_grad
        post = tensor._post_accumulate_grad_hooks
        if post is None:
            tensor._post_accumulate_grad_hooks = post = OrderedDict()
        post[hooks] = hooks.on_accumulated
        return True

    def remove(self) -> None:
        """Take every placed entry off (idempotent: an interrupted removal just runs again)."""
        placed = self.placed
        while placed:
            ref, hooks = placed[-1]
            tensor = ref()
            if tensor is not None:
                for entries in (tensor._backward_hooks, tensor._post_accumulate_grad_hooks):
                    if entries:
                        entries.pop(hooks, None)
            placed.pop()


# NOTE [nested autograd.grad]
# A custom autograd.Function may call `torch.autograd.grad` inside its backward (an adjoint ODE
# solver, a gradient penalty inside a Function). The interceptor never sees that call: a
# TorchFunctionMode is popped off the stack while its `__torch_function__` runs the outer backward,
# and the engine runs the Function's backward with that (empty) mode stack. The nested call is a new
# graph task (`_current_graph_task_id()` differs from the outer one, and nobody bound it), and a
# traced leaf's tensor hook fires for it, but AccumulateGrad does not run: what it computes reaches
# `.grad` only through the outer backward's own hook call. So those hook calls are ignored: they
# are neither parts of the outer record (which broke the exact `.grad` breakdown and, with deferred
# statistics, left NaN parts) nor records of their own (an adjoint solver makes thousands per step).
# A nested `torch.autograd.backward` (a reentrant checkpoint) does accumulate into `.grad`: it stays
# a part of the traced call it runs in (NOTE [which backward a hook belongs to]).
# Which call a hook belongs to is read from the thread's stack, by code object: the innermost frame
# of `torch.autograd.grad` / `torch.autograd.backward`. It is nested when another such frame is
# further out, or when the thread's outermost frame is torch's own (an engine device thread, which
# only runs Python inside a backward). Done once per graph task; the answer is cached in `_by_task`.
_GRAD_CODE = torch.autograd.grad.__code__
_BACKWARD_CODE = torch.autograd.backward.__code__


def engine_call() -> tuple[Literal["backward", "grad"] | None, bool]:
    """The kind of the innermost autograd call on this thread's stack, and whether it is nested.

    Returns ``(None, False)`` when no ``torch.autograd.grad`` / ``backward`` frame is on the stack.
    """
    frame: Any = sys._getframe(1)
    kind: Literal["backward", "grad"] | None = None
    outermost = frame
    while frame is not None:
        code = frame.f_code
        if code is _GRAD_CODE or code is _BACKWARD_CODE:
            if kind is not None:
                return kind, True
            kind = "grad" if code is _GRAD_CODE else "backward"
        outermost = frame
        frame = frame.f_back
    return kind, kind is not None and outermost.f_code.co_filename.startswith(TORCH_DIR)
