"""Tables that fit the console: every row on one line, columns dropped by priority, names cut from the left.

# NOTE [one line per row]
# rich shrinks a table that is wider than the console by wrapping cells, so at 80 columns a share
# such as ``0.0408 25%`` would land on two lines and a long parameter name would end in ``…``.
# Reports build their tables through :func:`fitted_table` instead: every column's width is the
# widest of its cells, and when the sum is wider than the console, columns go by priority (the
# least useful first: shapes, the source line, extra backward calls); then the name column is
# shortened from the left (``…attention.self.query.weight``), so the end of a name, the part that
# tells two rows apart, stays visible. Number cells are never cut. What was left out is said in a
# note under the table, so nothing is dropped silently. Headers may wrap onto a second line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich import box
from rich.table import Table
from rich.text import Text

__all__ = ["Column", "fitted_table", "shorten_left", "table_width"]

_HEADER_CAP = 14  # a header wider than this wraps instead of widening its column


def shorten_left(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells from the left: ``…self.query.weight``."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    return "…" + text[len(text) - width + 1 :]


@dataclass
class Column:
    """One column of a fitted table.

    Attributes:
        header: the header (may wrap onto a second line).
        cells: one cell per row.
        justify: ``"left"``, ``"right"`` or ``"center"``.
        drop: 0 keeps the column always; otherwise higher numbers are dropped first when too wide.
        dropped: what the note under the table says when the column is dropped.
        shrink: for the name column: the narrowest it may be cut to from the left (None: never cut).
        indents: per row, how many leading cells of the name are indentation (kept when cutting).
        style: the column's style.
    """

    header: str | Text
    cells: list[Text]
    justify: str = "right"
    drop: int = 0
    dropped: str = ""
    shrink: int | None = None
    indents: list[int] = field(default_factory=list)
    style: str = ""

    def natural(self) -> int:
        header = self.header.plain if isinstance(self.header, Text) else self.header
        head = max((len(line) for line in header.split("\n")), default=0)
        cells = max((c.cell_len for c in self.cells), default=0)
        return max(cells, min(head, max(_HEADER_CAP, cells)), 1)


def table_width(widths: list[int]) -> int:
    """The width of a :data:`box.SIMPLE_HEAD` table without edges (one cell of padding each side)."""
    return sum(widths) + 3 * len(widths) - 1


def fitted_table(columns: list[Column], width: int, *, ends: set[int] | None = None) -> tuple[Table, list[str]]:
    """A table of ``columns`` no wider than ``width``; also the notes on what was dropped or cut.

    ``ends``: row indices after which a section line is drawn. The title goes above the table, as a
    line of its own, so it is not wrapped at the table's width.
    """
    cols = list(columns)
    notes: list[str] = []

    def total() -> int:
        return table_width([c.natural() for c in cols])

    cut = False
    # 1. shorten the name to a comfortable width, 2. drop columns by priority, 3. shorten to the minimum
    order = sorted((c for c in cols if c.drop), key=lambda c: -c.drop)
    for stage in ("comfortable", "drop", "minimum"):
        if total() <= width:
            break
        if stage == "drop":
            for col in order:
                if total() <= width:
                    break
                cols.remove(col)
                if col.dropped:
                    notes.append(col.dropped)
            continue
        for col in cols:
            if col.shrink is None:
                continue
            floor = max(col.shrink, 24) if stage == "comfortable" else col.shrink
            target = max(floor, col.natural() - (total() - width))
            if target < col.natural():
                _cut(col, target)
                cut = True
    if cut:
        notes.append("long names shortened from the left")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for col in cols:
        w = col.natural()
        table.add_column(col.header, justify=col.justify, width=w, no_wrap=False, overflow="fold", style=col.style)  # type: ignore[arg-type]
    rows = len(cols[0].cells) if cols else 0
    ends = ends or set()
    for r in range(rows):
        table.add_row(*[col.cells[r] for col in cols], end_section=r in ends)
    return table, notes


def _cut(col: Column, target: int) -> None:
    """Shorten every cell of ``col`` from the left to ``target`` cells, keeping its indentation."""
    for r, cell in enumerate(col.cells):
        if cell.cell_len <= target:
            continue
        indent = col.indents[r] if r < len(col.indents) else 0
        body = cell.plain[indent:]
        new = Text(" " * indent + shorten_left(body, max(target - indent, 1)), style=cell.style)
        col.cells[r] = new
