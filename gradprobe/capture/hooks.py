"""The per-leaf hooks a recorder installs, and the handle that takes its interceptor mode off.

Place in the flow: capture. These are the hot path: they run once per leaf per backward and only
hand what they see to the recorder's ledger (NOTE [hot path]).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from gradprobe.capture.intercept import Interceptor
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
        with _no_torch_function():
            task = _current_task()
            record = recorder._by_task.get(task)
            if record is None:
                record = recorder.record_for_task()
                if record is None:  # NOTE [nested autograd.grad]
                    return
            if record.index in recorder._quiet_records:
                return
            state = self.state
            recorder.ledger.on_part(state, record, grad)
            if state.deferred is not None and task not in recorder._flushing:
                recorder._flushing.add(task)
                _queue_callback(lambda: recorder.flush_task(task))

    def on_accumulated(self, param: torch.Tensor) -> None:
        if not self.recorder.muted:
            with _no_torch_function():
                self.recorder.ledger.on_accumulated(self.state, param.grad)
