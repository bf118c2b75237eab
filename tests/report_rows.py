"""Checks on rendered reports shared by the layout and example tests: one line per row, no cut numbers."""

from __future__ import annotations

import io
import re

from rich.console import Console

WIDTHS = (80, 100, 160)
_TABLES = ("Gradient breakdown", "Per-loss split", "gradprobe · merged over")
_CUT_CELL = re.compile(r"\S…")  # a cell cut at its end (names are shortened from the left: " …name")


def render(renderable: object, width: int, **report: object) -> str:
    """``renderable`` (a Trace: its report, with ``report`` options) as plain text at ``width`` columns."""
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    if hasattr(renderable, "report"):
        renderable.report(console=console, **report)  # type: ignore[attr-defined]
    else:
        console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def table_bodies(text: str) -> list[list[str]]:
    """The body lines of each breakdown / split table in a rendered report."""
    lines = text.splitlines()
    bodies = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith(_TABLES):
            i += 1
            continue
        while i < len(lines) and not set(lines[i].strip()) == {"─"}:
            i += 1
        body = []
        i += 1
        while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
            if lines[i].strip():
                body.append(lines[i])
            elif i + 1 < len(lines) and not lines[i + 1].startswith(" "):
                break
            i += 1
        bodies.append(body)
    return bodies


def assert_rows_fit(text: str, width: int) -> int:
    """Every leaf/module row of the report's tables is one line, and no number cell ends in ``…``.

    A row that wrapped leaves a continuation line whose name column is blank (12+ cells wide);
    returns the number of rows checked.
    """
    bodies = table_bodies(text)
    assert bodies, f"no breakdown or split table in the report:\n{text}"
    count = 0
    for body in bodies:
        for line in body:
            assert len(line) <= width, f"wider than {width}: {line!r}"
            lead = len(line) - len(line.lstrip(" "))
            assert lead < 14, f"a row wrapped onto a second line at width {width}:\n{line!r}\n\n{text}"
            assert not _CUT_CELL.search(line), f"a cell cut with … at width {width}:\n{line!r}\n\n{text}"
            count += 1
    return count
