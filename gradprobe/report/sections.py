"""The built-in report sections, registered as plugins like any third-party section."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text

from gradprobe.hookspecs import hookimpl
from gradprobe.report.tables import single_record, breakdown_table, calls_table, findings_panel

if TYPE_CHECKING:
    from gradprobe.api.trace import Trace
    from gradprobe.ledger.ledger import BackwardRecord

__all__ = ["BreakdownSection", "CallsSection", "FindingsSection", "report_depth"]


def report_depth(trace: Trace) -> Any:
    """The ``depth`` the report is being rendered with (``t.report(depth=...)``; "auto" by default)."""
    return getattr(trace, "_report_depth", "auto")


class CallsSection:
    """The table of backward calls; a call that raised is marked."""

    def __init__(self) -> None:
        self.raised: dict[int, str] = {}

    @hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: BackwardRecord, error: BaseException | None) -> None:
        if error is not None:
            self.raised[record.index] = type(error).__name__

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any]:
        return [calls_table(trace, self.raised)]


class BreakdownSection:
    """The per-leaf gradient breakdown.

    When one backward made every ``.grad`` whole and the decomposition section splits that same
    backward by loss, the breakdown would repeat the split's numbers: one line stands in for it.
    """

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any]:
        rows = trace.breakdown()
        single = single_record(rows)
        if single is not None and _decomposed(trace, single) and all(r.check is not False and not r.note for r in rows):
            n = len(rows)
            return [
                Text.assemble(
                    ("Gradient breakdown", "bold"),
                    f" · every .grad ({n} lea{'ves' if n != 1 else 'f'}) is what backward #{single} added, ",
                    ("Σ ✓", "green"),
                    "; its split by loss follows (t.breakdown() has the rows)",
                )
            ]
        return [breakdown_table(trace, rows, depth=report_depth(trace))]


def _decomposed(trace: Trace, record: int) -> bool:
    """Whether the report's decomposition section shows a split of backward ``record``."""
    host = trace._plugins
    if host.get_plugin("decompose") is None or host.get_plugin("report.decomposition") is None:
        return False
    return any(s.kind == "decomposed" and s.record == record for s in trace.splits())


class FindingsSection:
    """The findings panel."""

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any]:
        return [findings_panel(trace.findings, trace.finding_counts())]
