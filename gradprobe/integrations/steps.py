"""One trace per training step, shared by the framework callbacks.

# NOTE [a trace per step]
# A framework runs forward, backward and the optimizer step between two callback events. The
# callbacks enter a fresh `gradprobe.trace(model, on_finding="record")` at the start of each step
# and exit it at the end, so every step gets its own ledger (no growth over a long run, the same
# exactness per step). New findings are logged as soon as the step ends; the full report every
# `every_n_steps` steps. Findings are recorded, never raised, unless asked: a callback must not
# stop a training run that PyTorch itself would let finish.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from rich.console import Console

    from gradprobe.api.trace import Keep, Policy, Trace
    from gradprobe.findings import Finding

__all__ = ["StepCallback", "StepTracer"]


class StepTracer:
    """Opens a trace at a step's start and closes it at its end; logs findings and periodic reports."""

    def __init__(
        self,
        every_n_steps: int,
        keep: Keep,
        on_finding: Policy,
        console: Console | None,
        log: Callable[[str], None] | None,
        plugins: tuple[Any, ...],
        disable: tuple[str, ...],
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"GradProbeCallback(every_n_steps=...) must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.on_finding = on_finding
        self.console = console
        self.log = log
        self.plugins = plugins
        self.disable = disable
        self.current: Trace | None = None
        self._closed: Trace | None = None  # closed, not yet logged
        self.last: Trace | None = None  # the trace of the last finished step
        self.findings: list[tuple[int, Finding]] = []  # (step, finding) over the whole run
        self.reports = 0

    def begin(self, model: Any) -> None:
        from gradprobe.api.trace import Trace

        self.close()
        self._closed = None
        trace = Trace(
            (model,), keep=self.keep, on_finding=self.on_finding, plugins=self.plugins, disable=self.disable,
            console=self.console,
        )
        trace.__enter__()
        self.current = trace

    def end(self, step: int) -> None:
        """Close the step's trace; log its findings now, and the report every ``every_n_steps``."""
        self.close()
        trace, self._closed = self._closed, None
        if trace is None:
            return
        for finding in trace.findings:
            self.findings.append((step, finding))
            self._say(f"gradprobe step {step}: {finding.format()}")
        if step % self.every_n_steps == 0:
            self.reports += 1
            if self.log is not None:
                self.log(f"gradprobe report, step {step}")
            self._console().print(f"[bold]gradprobe · step {step}[/bold]")
            trace.report(self._console())

    def close(self, exc: BaseException | None = None) -> None:
        """Exit the step's trace (if open); :meth:`end` then logs it."""
        trace, self.current = self.current, None
        if trace is not None:
            trace.__exit__(type(exc) if exc else None, exc, None)
            self.last = self._closed = trace

    def _console(self) -> Console:
        import rich

        return self.console or rich.get_console()

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)
        else:
            self._console().print(text, markup=False, highlight=False)


class StepCallback:
    """What both framework callbacks share: the options, the step tracer and what it collected.

    Args:
        every_n_steps: print the report when the trainer's global step is a multiple of this.
        keep: ``trace(keep=...)`` for each step.
        on_finding: ``"record"`` (default: log, never interrupt training), ``"warn"`` or ``"raise"``.
        console: the rich console for reports (default: rich's).
        log: a function taking one line of text for findings (default: print to ``console``).
        plugins, disable: passed to each step's trace.
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
    ) -> None:
        super().__init__()
        self._steps = StepTracer(every_n_steps, keep, on_finding, console, log, tuple(plugins), tuple(disable))

    @property
    def last(self) -> Trace | None:
        """The trace of the last finished step."""
        return self._steps.last

    @property
    def findings(self) -> list[Finding]:
        """Every finding logged so far."""
        return list(self._steps.findings)

    @property
    def reports(self) -> int:
        """How many reports were printed."""
        return self._steps.reports
