"""The gradprobe plugin hooks.

A plugin is any object (a module, or an instance of a class) with functions named after these
specifications and marked with :data:`gradprobe.hookimpl`. Built-in detectors and report sections are
plugins registered through the same manager; third-party plugins come from the ``gradprobe``
entry-point group or from ``trace(..., plugins=[...])``. A class given as a plugin is instantiated
once per trace, so it can keep per-trace state on ``self``.

Example::

    import gradprobe

    class GradNormBudget:
        def __init__(self, limit=10.0):
            self.limit = limit

        @gradprobe.hookimpl
        def gradprobe_collect_findings(self, trace):
            return [
                gradprobe.Finding(code="X001", kind="budget", severity="warning",
                                  message=f"{row.leaf.name} got a gradient of norm {row.grad_norm:.3g}")
                for row in trace.breakdown() if (row.grad_norm or 0) > self.limit
            ]

    with gradprobe.trace(model, plugins=[GradNormBudget(5.0)]) as t:
        ...

Hooks run in the thread that triggered them; none of them may change gradients. A hook that raises
anything but :class:`~gradprobe.GradProbeError` is caught, reported as a ``GP000`` finding naming the
plugin, and that plugin is switched off for the rest of the trace. (When one of gradprobe's own
built-in plugins raises, that is gradprobe's bug: a ``GP001`` notice asks for a report instead.)

# NOTE [owned handles]
# Whatever a plugin installs (tensor or module hooks, a global module hook, saved-tensor hooks, a
# TorchFunctionMode) it hands to the trace, and the trace takes it off in its ``finally`` path, also
# when a plugin's ``gradprobe_trace_end`` raised or never ran and under KeyboardInterrupt:
#
#   ``trace.own(handle)`` -> handle: anything with an idempotent ``remove()`` (every
#       ``torch.utils.hooks.RemovableHandle``); removed last-owned first.
#   ``trace.own_context(cm)`` -> handle: enters a context manager now (``saved_tensors_hooks``, a
#       ``TorchFunctionMode``, any other) and exits it at the end; ``handle.remove()`` exits it
#       earlier, once. Never call ``cm.__exit__()`` yourself: modes and saved-tensor hooks are
#       pushed and popped by identity, so an interrupt cannot leave them on torch's stacks.
#
# Hand the handle over in the same expression that makes it, and register with torch-function
# dispatch off (the interceptor is active during the trace)::
#
#     @hookimpl
#     def gradprobe_trace_start(self, trace):
#         with torch._C.DisableTorchFunction():
#             trace.own(torch.nn.modules.module.register_module_forward_hook(self.on_forward))
#             self.saved = trace.own_context(torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack))
#
# A plugin's own ``gradprobe_trace_end`` may still call ``handle.remove()`` (removal is idempotent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch

    from gradprobe.capture.calls import BackwardCall
    from gradprobe.ledger.ledger import BackwardRecord
    from gradprobe.capture.sites import Site
    from gradprobe.api.trace import Trace
    from gradprobe.findings import Finding

hookspec = pluggy.HookspecMarker("gradprobe")
hookimpl = pluggy.HookimplMarker("gradprobe")


@hookspec
def gradprobe_trace_start(trace: Trace) -> None:
    """The trace was entered; every hook of gradprobe's own is installed.

    Install a plugin's own hooks here and hand them to the trace (``trace.own(handle)``,
    ``trace.own_context(cm)``; NOTE [owned handles] above) so they come off whatever happens.

    Example: remember the optimizer state a detector compares against at the end::

        @hookimpl
        def gradprobe_trace_start(self, trace):
            self.started = {leaf.name: leaf.tensor.grad is not None for leaf in trace.leaves}
    """


@hookspec
def gradprobe_trace_end(trace: Trace) -> None:
    """The trace is exiting; gradprobe's hooks are still installed and are removed right after.

    Runs also when the traced block raised, but not when an interrupt cut the exit short: hooks a
    plugin installed belong in ``trace.own(...)`` / ``trace.own_context(...)`` (NOTE [owned
    handles] above), which come off whatever happens. Example::

        @hookimpl
        def gradprobe_trace_end(self, trace):
            self.summary = len(trace.records)
    """


@hookspec
def gradprobe_before_backward(trace: Trace, call: BackwardCall) -> None:
    """A backward (``Tensor.backward``, ``autograd.backward``) or ``autograd.grad`` call is about to run.

    ``call`` holds the live roots, ``inputs``, ``retain_graph``, the user's ``site`` and the record's
    ``name``. A detector that predicts the call will fail emits a finding here (``trace.emit``),
    which raises :class:`~gradprobe.GradProbeError` before PyTorch does when ``on_finding="raise"``.
    Example::

        @hookimpl
        def gradprobe_before_backward(self, trace, call):
            if call.create_graph:
                trace.emit(Finding(code="X002", kind="double_backward", severity="info",
                                   message="create_graph=True builds a graph of the gradient", site=call.site))
    """


@hookspec
def gradprobe_after_backward(trace: Trace, record: BackwardRecord, error: BaseException | None) -> None:
    """A backward call returned (``error`` is None) or raised ``error``; ``record`` is its ledger entry.

    Example::

        @hookimpl
        def gradprobe_after_backward(self, trace, record, error):
            if error is None and not record.retain_graph:
                self.freed_by[record.index] = record.site
    """


@hookspec
def gradprobe_grad_read(trace: Trace, tensor: torch.Tensor, site: Site | None) -> None:
    """``tensor.grad`` was read on a tensor that is not a leaf.

    Reads of a leaf's ``.grad`` are frequent and always fine, so they are not reported. Example::

        @hookimpl
        def gradprobe_grad_read(self, trace, tensor, site):
            if not tensor.retains_grad:
                print("non-leaf .grad read at", site)
    """


@hookspec
def gradprobe_inplace_write(
    trace: Trace, tensors: Iterable[torch.Tensor], func: Callable[..., Any], site: Site | None
) -> None:
    """``func`` is about to write in place to ``tensors`` (``x.add_()``, ``x[i] = v``, ``out=``, ...).

    Only called while some plugin implements it. A ``torch.optim`` optimizer step is one call, before it
    runs: ``tensors`` are the parameters it will update (those with a ``.grad``), ``func`` is the
    optimizer class's ``step`` and ``site`` the line that called it; the writes inside the step are not
    reported one by one (NOTE [writes inside an optimizer step] in capture/steps.py). Example::

        @hookimpl
        def gradprobe_inplace_write(self, trace, tensors, func, site):
            for t in tensors:
                if t is self.watched:
                    print(func.__name__, "wrote to the watched tensor at", site)
    """


@hookspec
def gradprobe_collect_findings(trace: Trace) -> Iterable[Finding] | None:
    """Return findings known only once the trace is over (e.g. parameters no loss reached).

    Called once, when the trace exits, after :func:`gradprobe_trace_end`. Example::

        @hookimpl
        def gradprobe_collect_findings(self, trace):
            return [Finding(code="X003", kind="custom", severity="info", message="done")]
    """


@hookspec
def gradprobe_report_sections(trace: Trace) -> Iterable[Any] | None:
    """Return rich renderables to show in ``trace.report()``, in order.

    The built-in sections (backward calls, gradient breakdown, findings) are plugins too, so they can
    be replaced: ``trace(..., disable=["report.breakdown"])``. Example::

        @hookimpl
        def gradprobe_report_sections(self, trace):
            return [rich.panel.Panel(f"{len(trace.records)} backward calls")]
    """
