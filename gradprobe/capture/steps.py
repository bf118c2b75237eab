"""Training steps: where one ends, which step a backward call belongs to, and who listens.

# NOTE [steps]
# A trace around a training loop sees many steps. A step ends when:
# - an optimizer's `step()` returns (torch's global `register_optimizer_step_pre_hook` /
#   `register_optimizer_step_post_hook`, torch >= 2.0: every optimizer, also the one
#   `GradScaler.step` calls). The recorder installs both hooks at the trace's `__enter__` and owns
#   them, so they come off with the trace;
# - a `GradScaler` skipped the optimizer step (it found inf/NaN gradients): `scaler.update()` runs
#   `torch._amp_update_scale_`, which the interceptor routes here; it ends the step only when backward
#   calls ran since the last step ended (after a real optimizer step there are none);
# - the user calls `t.step()` (code without an optimizer, or steps of its own);
# - and, only while none of the above was ever seen in this trace, when `.grad` was reset since the
#   step's first part (`zero_grad()`, `p.grad = None`, `p.grad.zero_()`) and a new backward starts: a
#   hand-written SGD loop. One sentinel leaf (the first that received a part in the step) is
#   checked per backward call, O(1).
# Every backward record carries the number of its step (`BackwardRecord.step`, counted from 0).
# Listeners: the detectors subscribe to optimizer steps (`before_step` / `after_step`, with the
# optimizer and the user's frame); the trace subscribes to every step end (`on_end`) to fold old
# steps into the run's aggregates (NOTE [window] in analysis/run.py). A callback that raises is
# gradprobe's bug: it is dropped and reported as GP001 (re-raised under GRADPROBE_STRICT_INTERNAL),
# never passed on into the user's step. Cost: two Python calls per optimizer step; nothing per
# parameter.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from gradprobe.capture.sites import site_of, user_frame
from gradprobe.exceptions import GradProbeError

if TYPE_CHECKING:
    from types import FrameType

    from gradprobe.api.trace import Trace
    from gradprobe.capture.recorder import Recorder
    from gradprobe.findings import Site

__all__ = ["ScalerUpdate", "StepEvent", "Steps", "steps_of"]

How = Literal["optimizer", "scaler_skipped", "manual", "grad_reset"]


class StepEvent:
    """One step end as the callbacks see it: the optimizer (None unless one stepped), the step's number, the user's frame."""

    __slots__ = ("optimizer", "index", "how", "_frame", "_found")

    def __init__(self, optimizer: Any, index: int, how: How = "optimizer") -> None:
        self.optimizer = optimizer
        self.index = index  # steps ended before this one: the number of the step that ends
        self.how = how
        self._frame: FrameType | None = None
        self._found = False

    @property
    def frame(self) -> FrameType | None:
        """The user's frame that ended the step (``optimizer.step()``), looked up once, on first use."""
        if not self._found:
            self._found = True
            self._frame = user_frame(2)
        return self._frame

    @property
    def site(self) -> Site | None:
        return site_of(self.frame)


Callback = Callable[["Trace", StepEvent], None]


class Steps:
    """The step boundaries of one trace, and who listens to them (NOTE [steps])."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = weakref.ref(recorder)  # NOTE [no cycles] in recorder.py
        self.count = 0  # steps ended so far == the number of the step now running
        self.explicit = False  # a step end other than the grad-reset guess was seen
        self.first_record = 0  # global index of the current step's first record
        self._before: dict[str, Callback] = {}
        self._after: dict[str, Callback] = {}
        self._end: dict[str, Callback] = {}
        self._event: StepEvent | None = None

    def install(self) -> None:
        recorder = self._recorder()
        assert recorder is not None
        with torch._C.DisableTorchFunction():
            recorder.own(register_optimizer_step_pre_hook(self._pre))
            recorder.own(register_optimizer_step_post_hook(self._post))

    def before_step(self, name: str, callback: Callback) -> None:
        """Call ``callback(trace, event)`` before every optimizer step (``name``: the plugin's)."""
        self._before[name] = callback

    def after_step(self, name: str, callback: Callback) -> None:
        """Call ``callback(trace, event)`` after every optimizer step (``name``: the plugin's)."""
        self._after[name] = callback

    def on_end(self, name: str, callback: Callback) -> None:
        """Call ``callback(trace, event)`` at every step end, however it ended (after ``after_step``'s)."""
        self._end[name] = callback

    # -- the step ends -----------------------------------------------------------------------

    def end(self, how: How, optimizer: Any = None, event: StepEvent | None = None) -> None:
        """End the running step (``how``: what ended it); the next backward belongs to the next one."""
        recorder = self._recorder()
        if recorder is None:
            return
        if how != "grad_reset":
            self.explicit = True
        event = event or StepEvent(optimizer, self.count, how)
        self.count += 1
        self.first_record = len(recorder.ledger.records)
        recorder.ledger.step = self.count
        recorder.ledger.sentinel = recorder.ledger.sentinel_grad = None
        if self._after and how == "optimizer":
            self._run(self._after, event, "optimizer step post-hook")
        if self._end:
            self._run(self._end, event, "step end")

    def before_backward(self) -> None:
        """A backward call starts: in a loop with no step end seen yet, end the step if `.grad` was reset."""
        recorder = self._recorder()
        if recorder is None or self.explicit or len(recorder.ledger.records) <= self.first_record:
            return
        ledger = recorder.ledger
        state = ledger.sentinel  # the first leaf given a part in this step, and the .grad it left
        tensor = state.ref() if state is not None else None  # type: ignore[misc]
        if state is None or tensor is None or ledger.sentinel_grad is None:
            return
        grad = tensor.grad
        if state.reduced is not None and state.reduced.holds(grad):
            return
        if grad is None or grad is not ledger.sentinel_grad() or grad._version != ledger.sentinel_version:
            self.end("grad_reset")

    def scaler_updated(self) -> None:
        """``GradScaler.update()`` ran: end the step if it had backward calls but no optimizer step (skipped)."""
        recorder = self._recorder()
        if recorder is not None and len(recorder.ledger.records) > self.first_record:
            self.end("scaler_skipped")

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.explicit = True  # an optimizer steps: no guessing from .grad resets (LBFGS's closure resets inside)
        self._event = StepEvent(optimizer, self.count)
        if self._before:
            self._run(self._before, self._event, "optimizer step pre-hook")
        try:
            self._pause_writes(optimizer, self._event)
        except GradProbeError:
            raise  # on_finding="raise" from a watcher: stops the user's code, as everywhere
        except Exception as exc:  # gradprobe's bug (or an odd optimizer): never into the user's step
            recorder = self._recorder()
            if recorder is not None:
                recorder.mode.resume_writes()
                if recorder.host is not None:
                    recorder.host.internal_error("steps", "optimizer step pre-hook", exc)

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        event = self._event if self._event is not None and self._event.optimizer is optimizer else None
        self._event = None
        recorder = self._recorder()
        if recorder is not None:
            recorder.mode.resume_writes()
        self.end("optimizer", optimizer, event)

    # NOTE [writes inside an optimizer step]
    # An optimizer step writes every parameter in place with several ops each (Adam: ~6 per parameter
    # on the CPU), and each would pass through the interceptor to the in-place watchers: on a
    # 160-tensor model ~1,000 calls, ~10 ms a step. What the watchers need is which tensors the step
    # wrote and where the user called it. So the step is announced once, before it runs, as one
    # in-place write of the parameters it will update (those of its param groups that have a .grad;
    # their versions are still the ones before the step, as for any write), at the user's
    # `optimizer.step()` line, with `func` the optimizer's `step`; the interceptor does not watch
    # writes until the step returns (or, if it raised, until the next backward or step).
    def _pause_writes(self, optimizer: Any, event: StepEvent) -> None:
        recorder = self._recorder()
        if recorder is None or recorder.state != "active" or not recorder.mode.watch_writes:
            return
        groups = getattr(optimizer, "param_groups", None) or []
        written = [p for g in groups for p in g.get("params", ()) if isinstance(p, torch.Tensor) and p.grad is not None]
        recorder.mode.pause_writes()
        if written and recorder.host is not None and not recorder.muted:
            with torch._C.DisableTorchFunction():
                recorder.host.call(
                    "gradprobe_inplace_write", trace=recorder.subject, tensors=written, func=type(optimizer).step,
                    site=event.site,
                )

    def _run(self, callbacks: dict[str, Callback], event: StepEvent, where: str) -> None:
        recorder = self._recorder()
        trace = recorder.subject if recorder is not None else None
        if trace is None or recorder is None or recorder.state != "active":
            return
        with torch._C.DisableTorchFunction():
            for name, callback in list(callbacks.items()):
                try:
                    callback(trace, event)
                except GradProbeError:
                    raise  # on_finding="raise": an error finding stops the user's code, as everywhere
                except Exception as exc:  # gradprobe's bug: never into the user's optimizer step
                    callbacks.pop(name, None)
                    if recorder.host is not None:
                        recorder.host.internal_error(name, where, exc)


class ScalerUpdate:
    """The interceptor's handler of ``torch._amp_update_scale_`` (``GradScaler.update()``), NOTE [steps]."""

    __slots__ = ("steps",)

    def __init__(self, steps: weakref.ReferenceType[Steps]) -> None:
        self.steps = steps  # the recorder owns both the steps and the interceptor (NOTE [no cycles])

    def __call__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = func(*args, **kwargs)
        steps = self.steps()
        if steps is not None:
            steps.scaler_updated()
        return result


def steps_of(trace: Trace) -> Steps:
    """The trace's :class:`Steps` (its hooks are installed and owned by the trace's recorder)."""
    return trace._recorder.steps
