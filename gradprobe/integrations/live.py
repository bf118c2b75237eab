"""A one-line live status for long runs: step, steps per second and the top findings.

# NOTE [live status]
# `LiveStatus` shows one line, e.g. `gradprobe · step 1,234 · 18.5 steps/s · 2 findings: GP503 ×1,
# GP102 ×1`, with a rich `Live` display on the given console. It is shown only when that console is
# a terminal (`Console.is_terminal`: never in a log file, a pipe, CI output or a captured test), and
# only updated from a step's end (the callbacks' end-of-step event, the CLI's optimizer-step hook),
# never from inside an autograd hook. Updates are rate-limited: at most `MAX_PER_SECOND` redraws a
# second, the steps in between only counted. The display is transient: it is taken off before the
# report is printed. While it is shown, rich routes the program's prints above the line
# (`redirect_stdout` / `redirect_stderr`); inside another live display on the same console (a rich
# progress bar) rich draws it with that one. When anything about drawing fails (a closed terminal),
# the status switches itself off: it is never worth an exception in a training run.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rich.console import Console

    from gradprobe.findings import Finding

__all__ = ["MAX_PER_SECOND", "LiveStatus"]

MAX_PER_SECOND = 4  # redraws per second at most
_RANK = {"error": 0, "warning": 1, "info": 2}


class LiveStatus:
    """One status line on ``console`` while a run goes (nothing at all when it is not a terminal)."""

    def __init__(self, console: Console | None = None, clock: Any = time.monotonic) -> None:
        import rich

        self.console = console or rich.get_console()
        self.enabled = self.console.is_terminal
        self.clock = clock
        self.codes: Counter[str] = Counter()
        self._severity: dict[str, str] = {}
        self.findings = 0
        self.updates = 0  # redraws so far
        self._live: Any = None
        self._drawn_at: float | None = None
        self._drawn_step = 0
        self._rate: float | None = None

    def add_findings(self, findings: Iterable[Finding]) -> None:
        """Count new findings (by code) for the line."""
        for finding in findings:
            self.findings += 1
            self.codes[finding.code] += 1
            self._severity.setdefault(finding.code, finding.severity)

    def update(self, step: int) -> None:
        """A step ended: redraw the line unless the last redraw is less than 1/MAX_PER_SECOND s old."""
        if not self.enabled:
            return
        now = self.clock()
        if self._drawn_at is not None and now - self._drawn_at < 1 / MAX_PER_SECOND:
            return
        if self._drawn_at is not None and now > self._drawn_at and step > self._drawn_step:
            self._rate = (step - self._drawn_step) / (now - self._drawn_at)
        self._drawn_at, self._drawn_step = now, step
        try:
            from rich.live import Live
            from rich.text import Text

            if self._live is None:
                self._live = Live(console=self.console, auto_refresh=False, transient=True)
                self._live.start()
            self._live.update(Text(self.line(step), no_wrap=True, overflow="ellipsis"), refresh=True)
            self.updates += 1
        except Exception:  # noqa: BLE001 — NOTE [live status]: another live display, a closed terminal, ...
            self.enabled = False
            self.stop()

    def line(self, step: int) -> str:
        """The status line for ``step``."""
        parts = [f"gradprobe · step {step:,}"]
        if self._rate is not None:
            parts.append(f"{self._rate:,.1f} steps/s")
        if self.findings:
            top = sorted(self.codes, key=lambda code: (_RANK.get(self._severity[code], 3), -self.codes[code], code))
            shown = ", ".join(f"{code} ×{self.codes[code]}" for code in top[:3])
            more = f", {len(top) - 3} more codes" if len(top) > 3 else ""
            parts.append(f"{self.findings} finding{'s' if self.findings != 1 else ''}: {shown}{more}")
        else:
            parts.append("no findings")
        return " · ".join(parts)

    def stop(self) -> None:
        """Take the line off (before the report is printed); idempotent."""
        live, self._live = self._live, None
        if live is not None:
            try:
                live.stop()
            except Exception:  # noqa: BLE001 — NOTE [live status]
                pass
