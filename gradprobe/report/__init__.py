"""Rich renderables for traces: the backward-calls table, the gradient breakdown, the findings panel.

Each is also a built-in plugin section (see :mod:`gradprobe.report.sections`), so a report can be
rearranged with ``trace(..., disable=[...])`` and extended with ``gradprobe_report_sections``.
"""

from __future__ import annotations

from gradprobe.report.tables import breakdown_table, calls_table, findings_panel

__all__ = ["breakdown_table", "calls_table", "findings_panel"]
