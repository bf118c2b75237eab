"""The built-in report sections, registered as plugins like any third-party section."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradprobe.hookspecs import hookimpl
from gradprobe.report.tables import breakdown_table, calls_table, findings_panel

if TYPE_CHECKING:
    from gradprobe.api.trace import Trace

__all__ = ["BreakdownSection", "CallsSection", "FindingsSection"]


class CallsSection:
    """The table of backward calls."""

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any]:
        return [calls_table(trace)]


class BreakdownSection:
    """The per-leaf gradient breakdown."""

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any]:
        return [breakdown_table(trace)]


class FindingsSection:
    """The findings panel."""

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any]:
        return [findings_panel(trace.findings)]
