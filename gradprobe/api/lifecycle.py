"""Entering and leaving a trace: hooks on, plugins told, and everything off again whatever happens.

Place in the flow: the api layer. :class:`TraceLifecycle` is a mixin of :class:`~gradprobe.Trace`
(as :class:`~gradprobe.api.views.TraceViews` is). The hooks themselves, and how they come off even
under KeyboardInterrupt, live in the capture layer (NOTE [interrupts during cleanup] in
``capture/lifecycle.py``); here is only the order of events of ``__enter__`` and ``__exit__``.
"""

from __future__ import annotations

import gc

import sys
from typing import TYPE_CHECKING, Any, Literal

import torch

from gradprobe.analysis.finals import snapshot_final
from gradprobe.capture.lifecycle import close_suspended_mode_pops
from gradprobe.exceptions import GradProbeError, TraceStateError

if TYPE_CHECKING:
    from gradprobe.analysis.finals import FinalGrad
    from gradprobe.api.trace import Trace
    from gradprobe.capture.host import PluginHost
    from gradprobe.capture.lifecycle import Removable
    from gradprobe.capture.recorder import Recorder
    from gradprobe.findings import Finding
    from gradprobe.ledger.ledger import Ledger

__all__ = ["TraceLifecycle"]

Policy = Literal["warn", "raise", "record"]


class TraceLifecycle:
    """``__enter__`` / ``__exit__`` and the handles plugins hand over (``own``, ``own_context``)."""

    _grad_enabled = True  # grad mode when the trace was entered
    _raised: str | None = None  # the class name of the exception the traced block raised

    if TYPE_CHECKING:  # provided by Trace
        _recorder: Recorder
        _plugins: PluginHost
        _finals: list[FinalGrad] | None
        _print_report: bool
        on_finding: Policy

        @property
        def _ledger(self) -> Ledger: ...

        def _add_finding(self, finding: Finding, policy: Policy) -> None: ...

        def report(self) -> None: ...

    def __enter__(self) -> Trace:  # type: ignore[misc]
        state = self._recorder.state
        if state != "new":
            raise TraceStateError(
                f"this gradprobe trace is {'already active' if state == 'active' else 'finished'}; "
                "a trace records one block: create a new one with gradprobe.trace(...) for each `with`"
            )
        self._grad_enabled = grad = torch.is_grad_enabled()
        entered = False
        try:  # NOTE [interrupts during cleanup] in capture/lifecycle.py
            self._recorder.install()
            self._plugins.call("gradprobe_trace_start", trace=self)
            entered = True
            return self  # type: ignore[return-value]
        finally:
            if not entered:
                try:
                    self._recorder.remove_retrying(interrupted=True)
                finally:
                    torch._C._set_grad_enabled(grad)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Nothing that can be interrupted before the `try` (NOTE [interrupts during cleanup]).
        grad: bool | None = None
        interrupted = done = False
        pending: GradProbeError | None = None
        recorder = self._recorder
        collecting = gc.isenabled()
        try:
            gc.disable()  # NOTE [no collections while hooking] in capture/lifecycle.py
            self._raised = None if exc_type is None else exc_type.__name__
            # An interruption (Ctrl-C) in the block may have cut a no_grad() region of gradprobe's
            # hooks short: grad mode goes back to what it was at __enter__, else to what it is now.
            interrupted = exc_type is not None and not issubclass(exc_type, Exception)
            grad = self._grad_enabled if interrupted else torch.is_grad_enabled()
            recorder.flush(everything=True)
            self._plugins.call("gradprobe_trace_end", trace=self)
            with torch._C.DisableTorchFunction():
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
            done = True
        finally:
            try:  # every owned hook comes off here, whether or not the plugins' trace_end ran
                try:
                    if interrupted or not done:
                        close_suspended_mode_pops(tb, sys.exc_info()[2])
                finally:
                    recorder.remove_retrying(interrupted=interrupted or not done)
            finally:
                if collecting:
                    gc.enable()
                if grad is not None and torch.is_grad_enabled() != grad:
                    torch._C._set_grad_enabled(grad)
        for error in recorder.removal_errors:
            self._plugins.internal_error("trace", "removing an owned hook", error)
        if self._print_report:
            self.report()
        if pending is not None:
            raise pending

    def own(self, handle: Removable) -> Removable:
        """Remove ``handle`` (anything with an idempotent ``remove()``) when this trace exits; return it.

        For plugins: see :mod:`gradprobe.hookspecs` (NOTE [owned handles]).
        """
        return self._recorder.own(handle)

    def own_context(self, context: Any) -> Removable:
        """Enter ``context`` now, exit it when this trace exits; return a handle whose ``remove()`` exits it."""
        return self._recorder.own_context(context)

