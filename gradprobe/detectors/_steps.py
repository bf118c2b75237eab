"""Training-step boundaries for the detectors: one global optimizer-step hook pair per trace, shared.

# NOTE [steps before the core knows them]
# The trace core has no notion of a training step yet (issue 11 will add one). Detectors that need
# step boundaries (graphs kept alive across steps, optimizers that do not hold the traced
# parameters, frozen parameters an optimizer still moves, scaled gradients) ask `steps_of(trace)`
# for the trace's `Steps`: on the first ask it installs `torch.optim.optimizer`'s global
# `register_optimizer_step_pre_hook` / `register_optimizer_step_post_hook` (torch >= 2.0; every
# `Optimizer.step`, also the one `GradScaler.step` calls) and hands both handles to the trace
# (`trace.own`), so they come off with the trace. Each detector subscribes a callback under its
# plugin name. A step ends when an optimizer's `step()` returns; `Steps.count` is the number of
# steps ended so far. A callback that raises is gradprobe's bug: it is dropped and reported as
# GP001 (re-raised under GRADPROBE_STRICT_INTERNAL), never passed on into the user's step.
# Cost: two Python calls per optimizer step and one user-frame lookup per step that some callback
# asks for; nothing per parameter. When the core learns steps (issue 11), `Steps` moves there and
# the detectors keep their callbacks.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from gradprobe.capture.sites import site_of, user_frame
from gradprobe.exceptions import GradProbeError

if TYPE_CHECKING:
    from types import FrameType

    from gradprobe.api.trace import Trace
    from gradprobe.findings import Site

__all__ = ["StepEvent", "Steps", "steps_of"]


class StepEvent:
    """One optimizer step as the callbacks see it: the optimizer, the step's number, the user's frame."""

    __slots__ = ("optimizer", "index", "_frame", "_found")

    def __init__(self, optimizer: Any, index: int) -> None:
        self.optimizer = optimizer
        self.index = index  # steps ended before this one
        self._frame: FrameType | None = None
        self._found = False

    @property
    def frame(self) -> FrameType | None:
        """The user's frame that called ``optimizer.step()`` (looked up once, on first use)."""
        if not self._found:
            self._found = True
            self._frame = user_frame(2)
        return self._frame

    @property
    def site(self) -> Site | None:
        return site_of(self.frame)


Callback = Callable[["Trace", StepEvent], None]


class Steps:
    """The step boundaries of one trace, and who listens to them."""

    def __init__(self, trace: Trace) -> None:
        self._trace = weakref.ref(trace)
        self.count = 0
        self._before: dict[str, Callback] = {}
        self._after: dict[str, Callback] = {}
        self._event: StepEvent | None = None
        with torch._C.DisableTorchFunction():
            trace.own(register_optimizer_step_pre_hook(self._pre))
            trace.own(register_optimizer_step_post_hook(self._post))

    def before_step(self, name: str, callback: Callback) -> None:
        """Call ``callback(trace, event)`` before every optimizer step (``name``: the plugin's)."""
        self._before[name] = callback

    def after_step(self, name: str, callback: Callback) -> None:
        """Call ``callback(trace, event)`` after every optimizer step (``name``: the plugin's)."""
        self._after[name] = callback

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._event = StepEvent(optimizer, self.count)
        if self._before:
            self._run(self._before, self._event, "optimizer step pre-hook")

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        event = self._event if self._event is not None and self._event.optimizer is optimizer else None
        self._event = None
        self.count += 1
        if self._after:
            self._run(self._after, event or StepEvent(optimizer, self.count - 1), "optimizer step post-hook")

    def _run(self, callbacks: dict[str, Callback], event: StepEvent, where: str) -> None:
        trace = self._trace()
        if trace is None or not trace.active:
            return
        with torch._C.DisableTorchFunction():
            for name, callback in list(callbacks.items()):
                try:
                    callback(trace, event)
                except GradProbeError:
                    raise  # on_finding="raise": an error finding stops the user's code, as everywhere
                except Exception as exc:  # gradprobe's bug: never into the user's optimizer step
                    callbacks.pop(name, None)
                    trace._plugins.internal_error(name, where, exc)


_STEPS: weakref.WeakKeyDictionary[Any, Steps] = weakref.WeakKeyDictionary()


def steps_of(trace: Trace) -> Steps:
    """The trace's :class:`Steps`, its hooks installed (and owned by the trace) on the first call."""
    found = _STEPS.get(trace)
    if found is None:
        found = _STEPS[trace] = Steps(trace)
    return found
