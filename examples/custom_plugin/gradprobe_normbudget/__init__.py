"""A gradient-norm budget per module: an example of a third-party gradprobe plugin.

Installed, it is found through the ``gradprobe`` entry-point group (see ``pyproject.toml``) and
instantiated once per trace, so the rows it computes live on ``self``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from rich.table import Table

import gradprobe

__all__ = ["NormBudget"]


class NormBudget:
    """Warn about modules whose gradient norm (all their parameters together) exceeds a budget."""

    gradprobe_name = "normbudget"

    def __init__(self, budget: float | None = None) -> None:
        self.budget = budget if budget is not None else float(os.environ.get("GRADPROBE_NORM_BUDGET", "1.0"))
        self.rows: list[tuple[str, float]] = []  # (module, gradient norm), filled when the trace ends

    @gradprobe.hookimpl
    def gradprobe_collect_findings(self, trace: gradprobe.Trace) -> list[gradprobe.Finding]:
        squares: dict[str, float] = {}
        biggest: dict[str, tuple[float, int]] = {}  # module -> (norm, record) of its largest part
        for row in trace.breakdown():
            module = row.leaf.module or row.leaf.name
            squares[module] = squares.get(module, 0.0) + (row.grad_norm or 0.0) ** 2
            for part in row.parts:
                if part.norm > biggest.get(module, (-1.0, -1))[0]:
                    biggest[module] = (part.norm, part.record)
        self.rows = [(module, math.sqrt(sq)) for module, sq in squares.items()]
        findings = []
        for module, norm in self.rows:
            if norm > self.budget:
                record = trace.records[biggest[module][1]] if module in biggest else None
                findings.append(
                    gradprobe.Finding(
                        code="NB001",
                        kind="norm_budget",
                        severity="warning",
                        message=f"module {module} got a gradient of norm {norm:.3g}, over its budget of {self.budget:g}"
                        + (f" (mostly from {record.name!r})" if record else ""),
                        site=record.site if record else None,
                        fix="scale that loss down, clip gradients, or raise GRADPROBE_NORM_BUDGET",
                        plugin=self.gradprobe_name,
                        data={"module": module, "norm": norm, "budget": self.budget},
                    )
                )
        return findings

    @gradprobe.hookimpl
    def gradprobe_report_sections(self, trace: gradprobe.Trace) -> list[Any]:
        table = Table(title=f"Gradient-norm budget · {self.budget:g} per module", title_justify="left", min_width=50)
        table.add_column("module")
        table.add_column("‖grad‖", justify="right")
        table.add_column("", justify="center")
        for module, norm in self.rows:
            table.add_row(module, f"{norm:.3g}", "over" if norm > self.budget else "ok")
        return [table]
