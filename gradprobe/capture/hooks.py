"""The per-leaf hooks a recorder installs, and how a hook tells which backward call it runs in.

Place in the flow: capture. These are the hot path: they run once per leaf per backward and only
hand what they see to the recorder's ledger (NOTE [hot path]).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

import torch

from gradprobe.capture.sites import TORCH_DIR

if TYPE_CHECKING:
    from gradprobe.capture.recorder import Recorder
    from gradprobe.ledger.ledger import LeafState

__all__ = ["LeafHooks", "engine_call"]

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
