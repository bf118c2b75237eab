"""One trace for a whole training run, shared by the framework callbacks.

# NOTE [one trace per run]
# The callbacks enter one `Trace(model, on_finding="record")` when training starts (Lightning
# `on_train_start`, Hugging Face `on_train_begin`) and exit it when training ends, so the trace sees
# every step of the run: the per-trace set-up (hooks on every parameter, the plugin table) is paid
# once, memory stays bounded by the trace's `window`, and the report speaks about the run, not about
# one step. Steps end by themselves: the trace core ends a step at every `optimizer.step()` (NOTE
# [steps] in capture/steps.py), so the callbacks do nothing to open or close one. At the
# framework's end-of-step event (Lightning `on_train_batch_end`, HF `on_optimizer_step`: both after
# the optimizer step, before the next `zero_grad`) they only look at what is new: findings are
# logged at once with the step they were found in ("gradprobe step 7: ..."), and the full report
# (`t.report()` while the trace is active) is printed when the framework's step count is a multiple
# of `every_n_steps`, and once more at the end unless nothing changed since the last one. Step
# numbers are the trace's (from 0, as in the report and `to_dict()`), not the framework's (which
# counts steps done, and goes on from a checkpoint). When the framework's count went up but the
# trace saw no optimizer step (an optimizer that is not a `torch.optim.Optimizer`), the callback
# ends the trace's step itself (`t.step()`). Findings are recorded, never raised, unless asked: a
# callback must not stop a training run that PyTorch itself would let finish.
#
# Per step the callbacks cost a few attribute reads and one length check of the trace's finding
# list: nothing per parameter (the trace's own hooks are the per-parameter work).
#
# Every way out of a run exits the trace, so no hook stays installed: train end; the framework's
# exception event (Lightning `on_exception`, also for KeyboardInterrupt); a new run started by the
# same callback; `callback.close()`; and the callback being garbage collected or the interpreter
# exiting (`weakref.finalize`). Hugging Face's Trainer has no exception event: when `trainer.train()`
# raises, the trace stays open until one of the last three; wrap the call in
# `try: ... finally: callback.close()` to end it at once. The finalizer holds the `RunTracer`, never
# the callback, and nothing gradprobe owns refers back to the callback, so the callback can be freed.
# A finalizer runs on whichever thread frees the callback: the trace's torch-function mode is
# per-thread, so a callback freed on another thread than the one that trained takes off the hooks
# but cannot pop that mode from the training thread's stack (`close()` on the training thread can).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

from gradprobe.integrations.live import LiveStatus

if TYPE_CHECKING:
    from rich.console import Console

    from gradprobe.api.trace import Keep, Policy, Trace
    from gradprobe.findings import Finding

__all__ = ["NewFindings", "RunTracer", "StepCallback"]


class NewFindings:
    """The findings a trace added since the last call, each exactly once, at O(new findings) a call.

    A long run's trace forgets old repeats of a finding (it keeps the first of each code and line and
    the recent ones) by replacing its list; then, and only then, the list is walked once to see which
    of the kept findings were already handed out (by identity).
    """

    def __init__(self) -> None:
        self._list: list[Finding] | None = None
        self._seen = 0
        self._given: dict[int, Finding] = {}  # id -> finding, for the findings handed out and still in the list

    def __call__(self, trace: Trace) -> list[Finding]:
        found = trace._findings  # the trace's own list: no copy per step
        if found is self._list:
            new = found[self._seen :]
        else:  # a new trace, or the trace forgot old findings: keep what is still there, hand out the rest
            given = self._given
            self._given = {id(f): f for f in found if given.get(id(f)) is f}
            new = [f for f in found if id(f) not in self._given]
            self._list = found
        self._seen = len(found)
        for finding in new:
            self._given[id(finding)] = finding
        return new


class RunTracer:
    """The run's trace: entered at train start, exited at train end; logs findings and reports at step ends.

    Step numbers are the trace's (counted from 0, as in the report and ``to_dict()``); the framework's
    own step count only decides when to report (every ``every_n_steps``) and, when the framework
    stepped but no optimizer step reached the trace, ends the trace's step by hand (NOTE [one trace
    per run]).
    """

    def __init__(
        self,
        every_n_steps: int,
        keep: Keep = "stats",
        on_finding: Policy = "record",
        console: Console | None = None,
        log: Callable[[str], None] | None = None,
        plugins: tuple[Any, ...] = (),
        disable: tuple[str, ...] = (),
        window: int | None = None,
        live: bool = False,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"GradProbeCallback(every_n_steps=...) must be an integer of at least 1, got {every_n_steps!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"GradProbeCallback(window=...) must be None or an integer of at least 1, got {window!r}")
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.on_finding = on_finding
        self.console = console
        self.log = log
        self.plugins = plugins
        self.disable = disable
        self.window = window
        self.live = live
        self.status: LiveStatus | None = None  # the live line of the current run (NOTE [live status])
        self.trace: Trace | None = None  # the run's trace: active during the run, done after it
        self.reports = 0
        self._new = NewFindings()
        self._framework_step = 0  # the framework's step count at the last step end (or at the start)
        self._trace_steps = 0  # the trace's step count at the last step end
        self._reported_at: int | None = None  # the trace's step count at the last report

    @property
    def running(self) -> bool:
        """Whether the run's trace is open."""
        return self.trace is not None and self.trace.active

    @property
    def findings(self) -> list[tuple[int | None, Finding]]:
        """The run's findings as ``(step, finding)`` (a long run's trace keeps the first and recent repeats)."""
        trace = self.trace
        return [] if trace is None else [(finding.step, finding) for finding in trace.findings]

    def start(self, model: Any, framework_step: int = 0) -> None:
        """Enter a new trace of ``model`` for the run (ending a previous run's trace first).

        ``framework_step``: the framework's count of steps done when the run starts (a resumed run's).
        """
        from gradprobe.api.trace import Trace

        self.finish()
        options: dict[str, Any] = {} if self.window is None else {"window": self.window}  # None: the trace's default
        trace = Trace(
            (model,), keep=self.keep, on_finding=self.on_finding, plugins=self.plugins, disable=self.disable,
            console=self.console, **options,
        )
        self.trace, self._new, self._reported_at = trace, NewFindings(), None
        self._framework_step, self._trace_steps = framework_step, 0
        self.status = LiveStatus(self.console) if self.live else None
        trace.__enter__()

    def step_end(self, framework_step: int) -> None:
        """The framework finished a training step (``framework_step``: its count of steps done).

        Logs the new findings now, and the report when ``framework_step`` is a multiple of ``every_n_steps``.
        """
        trace = self.trace
        if trace is None or not trace.active:
            return
        stepped = framework_step > self._framework_step
        if stepped and trace.current_step == self._trace_steps:
            trace.step()  # the framework stepped without a torch optimizer step the trace could see
        self._framework_step, self._trace_steps = framework_step, trace.current_step
        self._log_new(trace)
        done = trace.current_step
        # with gradient accumulation the framework's count stays the same for several batches: one report
        if stepped and done and framework_step % self.every_n_steps == 0 and done != self._reported_at:
            self._report(trace, f"step {done - 1:,}")
        if self.status is not None and done:
            self.status.update(done - 1)

    def finish(self, exc: BaseException | None = None) -> None:
        """Exit the run's trace (if open), log what is new and print the report of the run.

        ``exc``: the exception that stopped the run, if one did (the trace exits with it: what the
        trace finds at its end is then recorded, never raised).
        """
        trace = self.trace
        if trace is None or not trace.active:
            return
        if self.status is not None:
            self.status.stop()
        try:
            trace.__exit__(type(exc) if exc is not None else None, exc, exc.__traceback__ if exc is not None else None)
        finally:
            done = trace.current_step
            last = f"after step {done - 1:,}" if done else "no step ended"
            new = self._log_new(trace, at_end=True)
            if new or done != self._reported_at or exc is not None:
                stopped = f", stopped by {type(exc).__name__}" if exc is not None else ""
                self._report(trace, f"end of run ({last}{stopped})")

    def abandon(self) -> None:
        """Exit the run's trace without logging or printing (the callback was freed or the process exits)."""
        trace = self.trace
        if self.status is not None:
            self.status.stop()
        if trace is None or not trace.active:
            return
        try:
            trace.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 — a finalizer has no caller to tell; the hooks are off either way
            pass

    def _log_new(self, trace: Trace, at_end: bool = False) -> int:
        new = self._new(trace)
        done = trace.current_step
        for finding in new:
            if finding.step is None or (at_end and finding.step >= done):  # found at the trace's end, or in a step cut short
                when = "end of run"
            else:
                when = f"step {finding.step:,}"
            self._say(f"gradprobe {when}: {finding.format()}")
        if new and self.status is not None:
            self.status.add_findings(new)
        return len(new)

    def _report(self, trace: Trace, when: str) -> None:
        self.reports += 1
        self._reported_at = trace.current_step
        if self.log is not None:
            self.log(f"gradprobe report, {when}")
        if self.status is not None:
            self.status.stop()  # the report goes where the line was; the next step end draws it again
        console = self._console()
        console.print(f"[bold]gradprobe · {when}[/bold]")
        trace.report(console)

    def _console(self) -> Console:
        import rich

        return self.console or rich.get_console()

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)
        else:
            self._console().print(text, markup=False, highlight=False)


class StepCallback:
    """What both framework callbacks share: the options, the run's tracer and what it collected.

    Args:
        every_n_steps: print the report when the trainer's global step is a multiple of this (and
            once more when training ends).
        keep: ``trace(keep=...)`` for the run's trace.
        on_finding: ``"record"`` (default: log, never interrupt training), ``"warn"`` or ``"raise"``.
        console: the rich console for reports (default: rich's).
        log: a function taking one line of text for findings (default: print to ``console``).
        plugins, disable: passed to the run's trace.
        window: ``trace(window=...)``: how many recent steps the trace keeps in full detail, older
            ones folded into the run's aggregates (default: the trace's own; a run-long trace never
            keeps every step).
        live: show a one-line status (step, steps/s, top findings) while training runs, updated at
            step ends, at most a few times a second, and only when ``console`` is a terminal. Meant for
            runs without a tqdm progress bar (Lightning ``enable_progress_bar=False``, HF
            ``disable_tqdm=True``): while the line is shown, other output is printed above it line by
            line, so a tqdm bar only moves when it ends a line (rich progress bars share the display).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        *,
        keep: Keep = "stats",
        on_finding: Policy = "record",
        console: Console | None = None,
        log: Callable[[str], None] | None = None,
        plugins: tuple[Any, ...] = (),
        disable: tuple[str, ...] = (),
        window: int | None = None,
        live: bool = False,
    ) -> None:
        super().__init__()
        self._steps = RunTracer(
            every_n_steps, keep, on_finding, console, log, tuple(plugins), tuple(disable), window, live
        )
        # NOTE [one trace per run]: a freed callback (or the interpreter's exit) ends an open run's trace
        weakref.finalize(self, self._steps.abandon)

    @property
    def trace(self) -> Trace | None:
        """The run's trace: active while training runs, finished after it (None before the first run)."""
        return self._steps.trace

    @property
    def last(self) -> Trace | None:
        """The run's trace (the same as :attr:`trace`; kept from when each step had its own)."""
        return self._steps.trace

    @property
    def findings(self) -> list[tuple[int | None, Finding]]:
        """The run's findings as ``(step, finding)``, steps counted from 0 as in the report."""
        return self._steps.findings

    @property
    def reports(self) -> int:
        """How many reports were printed."""
        return self._steps.reports

    def close(self, exc: BaseException | None = None) -> None:
        """End the run's trace now (log, report), e.g. in a ``finally`` after ``trainer.train()`` raised.

        ``exc``: the exception that stopped the run, if any (the trace then only records its end findings).
        Nothing happens when no run is open.
        """
        self._steps.finish(exc)
