"""The one-line live status of long runs (``gradprobe.integrations.live``): terminal only, rate-limited, never raising."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from rich.console import Console
from rich.live import Live
from torch import nn

from gradprobe.findings import Finding
from gradprobe.integrations.live import MAX_PER_SECOND, LiveStatus
from gradprobe.integrations.steps import RunTracer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100, color_system=None)


def test_nothing_is_drawn_when_the_console_is_not_a_terminal() -> None:
    """A log file, a pipe, CI output: no status line at all."""
    console = Console(file=io.StringIO(), width=100)
    status = LiveStatus(console)
    for step in range(1, 20):
        status.update(step)
    status.stop()
    assert not status.enabled and status.updates == 0 and console.file.getvalue() == ""  # type: ignore[attr-defined]


def test_updates_are_rate_limited_and_show_the_rate() -> None:
    """1,000 steps at 100 steps/s (10 s): at most MAX_PER_SECOND redraws a second, the line shows step and rate."""
    clock, console = Clock(), _terminal()
    status = LiveStatus(console, clock=clock)
    for step in range(1, 1001):
        clock.now += 0.01
        status.update(step)
    assert MAX_PER_SECOND * 10 - 2 <= status.updates <= MAX_PER_SECOND * 10 + 1
    assert status.line(1000).startswith("gradprobe · step 1,000 · 100.0 steps/s · no findings")
    status.stop()
    assert "gradprobe · step 1" in console.file.getvalue()  # type: ignore[attr-defined]


def test_the_line_names_the_top_findings_most_severe_first() -> None:
    """Errors before warnings before infos, then by count; at most three codes."""
    status = LiveStatus(_terminal(), clock=Clock())
    make = lambda code, severity: Finding(code, "demo", severity, "message")  # noqa: E731
    status.add_findings([make("GP700", "info")] * 5 + [make("GP503", "warning")] * 2 + [make("GP102", "error")])
    status.add_findings([make("GP504", "warning")] * 3)
    assert status.line(7) == "gradprobe · step 7 · 11 findings: GP102 ×1, GP504 ×3, GP503 ×2, 1 more codes"


class _Broken(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("the terminal went away")


def test_a_failing_terminal_switches_the_status_off() -> None:
    """Drawing fails (a closed terminal): the status turns itself off instead of raising into the training run."""
    console = Console(file=_Broken(), force_terminal=True, width=100)
    status = LiveStatus(console, clock=Clock())
    stdout, stderr = sys.stdout, sys.stderr
    status.update(1)
    assert not status.enabled and status.updates == 0 and status._live is None
    assert sys.stdout is stdout and sys.stderr is stderr  # rich's redirection is undone
    status.update(2)
    status.stop()


def test_inside_another_live_display() -> None:
    """A rich progress bar's live display is already on: the status is drawn with it and leaves it running."""
    console, clock = _terminal(), Clock()
    with Live("progress", console=console, auto_refresh=False) as outer:
        status = LiveStatus(console, clock=clock)
        status.update(1)
        clock.now += 1
        status.update(2)
        assert status.enabled and status.updates == 2
        status.stop()
        outer.update("still here", refresh=True)
    assert "still here" in console.file.getvalue()  # type: ignore[attr-defined]


def run_steps(tracer: RunTracer, steps: int) -> None:
    """A plain training loop driving the tracer as a callback would."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer.start(model)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        tracer.step_end(step)
    tracer.finish()


@pytest.mark.parametrize("terminal", [True, False])
def test_callback_live_option(terminal: bool) -> None:
    """``live=True`` on a callback: a status while the run goes on a terminal, none otherwise; off before reports."""
    console = _terminal() if terminal else Console(file=io.StringIO(), width=100)
    tracer = RunTracer(10, console=console, log=[].append, live=True)
    run_steps(tracer, 30)
    status = tracer.status
    assert status is not None and status._live is None  # taken off at the end
    assert (status.updates >= 1) is terminal
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert ("gradprobe · step 0 · no findings" in text) is terminal
    assert "gradprobe · step 9\n" in text and "gradprobe · step 29\n" in text  # the reports' headers
