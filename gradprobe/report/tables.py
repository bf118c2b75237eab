"""The report's renderables. They read a finished (or running) trace and never touch tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from gradprobe._format import check_cell, nonfinite, number, share
from gradprobe.analysis.run import loss_key
from gradprobe.report.layout import Column, fitted_table, table_width
from gradprobe.report.tree import fold

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult

    from gradprobe.analysis.breakdown import LeafBreakdown, Part
    from gradprobe.report.tree import Depth
    from gradprobe.report.tree import Group as Folded
    from gradprobe.ledger.ledger import BackwardRecord
    from gradprobe.api.trace import Trace
    from gradprobe.findings import Finding

__all__ = ["breakdown_table", "calls_table", "findings_panel", "several_steps"]

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def calls_table(trace: Trace, raised: dict[int, str] | None = None) -> RenderableType:
    """One row per backward / autograd.grad call: name, site, retain_graph, kind, source line.

    ``raised``: record index -> the exception a call raised (marked in the table).
    """
    return _CallsTable(trace, raised or {})


class _CallsTable:
    """The calls table; columns go by priority (source, kind, retain_graph, site) when too narrow."""

    def __init__(self, trace: Trace, raised: dict[int, str]) -> None:
        self._trace = trace
        self._raised = raised

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        records = self._trace.records
        n = len(self._trace.leaves)
        total = len(self._trace._ledger.records)
        title = (
            f"gradprobe · {total:,} backward call{'s' * (total != 1)} · "
            f"{n} lea{'ves' if n != 1 else 'f'} · keep={self._trace.keep}"
        )
        if several_steps(self._trace):
            yield from _by_line(self._trace, title, self._raised, options.max_width)
            return
        if not records:
            yield Text(title, style="bold")
            yield Text("no backward call ran inside the trace", style="dim")
            return
        index, name, site, retain, kind, source, outcome = ([] for _ in range(7))
        for r in records:
            k = r.kind if r.kind == "backward" else "grad (no .grad)"
            if r.create_graph:
                k += ", create_graph"
            if not r.seen:
                k += f", thread {r.thread}"
            index.append(Text(str(r.index), style="dim"))
            name.append(Text(r.name, style="bold"))
            site.append(Text(str(r.site) if r.site else "?"))
            retain.append(Text("yes" if r.retain_graph else "no"))
            kind.append(Text(k))
            source.append(Text(r.site.source if r.site else "", style="dim"))
            error = self._raised.get(r.index)
            outcome.append(Text(f"✗ raised {error}", style="bold red") if error else Text("✓", style="green"))
        columns = [
            Column("#", index),
            Column("backward call", name, justify="left", shrink=16),
            Column("site", site, justify="left", drop=2, dropped="site (see the findings)"),
            Column("retain_graph", retain, justify="left", drop=3, dropped="retain_graph"),
            Column("kind", kind, justify="left", drop=4, dropped="kind"),
        ]
        if self._raised:
            columns.append(Column("result", outcome, justify="left"))
        width = options.max_width
        _add_source(columns, source, width)
        table, notes = fitted_table(columns, width)
        yield Text(title, style="bold")
        yield table
        if notes:
            yield Text("left out at this width: " + ", ".join(notes), style="dim")


def _by_line(trace: Trace, title: str, raised: dict[int, str], width: int) -> RenderResult:
    """A trace over several steps: one row per backward call line (a loss), with its count and steps."""
    steps = trace.current_step
    run = trace._run  # the folded steps' losses; the kept records are counted here (no read-back)
    rows: dict[str, list[Any]] = {}  # loss -> [name, site, calls, first step, last step, last record]
    for info in run.losses.values():
        rows[info.key] = [info.name, info.site, info.calls.n, info.calls.first, info.calls.last, None]
    for r in trace.records:
        key = loss_key(r)
        row = rows.get(key)
        if row is None:
            row = rows[key] = [r.name, r.site, 0, r.step, r.step, None]
        row[2] += 1
        row[4] = r.step
        row[5] = r
    failed: dict[str, int] = {}
    for index in raised:
        r = trace._ledger.records.get(index)
        if r is not None:
            failed[loss_key(r)] = failed.get(loss_key(r), 0) + 1
    name, site, calls, seen, retain, source, outcome = ([] for _ in range(7))
    for key, (n, s, count, first, final, record) in rows.items():
        name.append(Text(n, style="bold"))
        site.append(Text(str(s) if s else "?"))
        calls.append(Text(f"{count:,}"))
        seen.append(Text(f"{first:,}–{final:,}" if first != final else f"{first:,}"))
        retain.append(Text("" if record is None else ("yes" if record.retain_graph else "no")))
        source.append(Text(s.source if s else "", style="dim"))
        bad = failed.get(key)
        outcome.append(Text(f"✗ {bad} raised", style="bold red") if bad else Text("✓", style="green"))
    columns = [
        Column("backward call", name, justify="left", shrink=16),
        Column("site", site, justify="left", drop=2, dropped="site (see the findings)"),
        Column("calls", calls),
        Column("steps", seen),
        Column("retain_graph", retain, justify="left", drop=3, dropped="retain_graph"),
    ]
    if failed:
        columns.append(Column("result", outcome, justify="left"))
    _add_source(columns, source, width)
    table, notes = fitted_table(columns, width)
    folded = run.folded_steps
    last = trace.records[-1].step if trace.records else steps
    span = f"{last + 1:,} steps (0–{last:,})"
    kept = f"; steps {folded:,}–{last:,} kept in full (window={trace.window}), older ones folded" if folded else ""
    measured = f"; parts measured every {trace.every} steps" if trace.every > 1 else ""
    yield Text(f"{title} · {span}{kept}{measured}", style="bold")
    yield table
    if notes:
        yield Text("left out at this width: " + ", ".join(notes), style="dim")


def _add_source(columns: list[Column], source: list[Text], width: int) -> None:
    """The calls' source lines as a last column, taking what the other columns leave, cut at the end."""
    room = width - table_width([c.natural() for c in columns] + [0])
    if room >= 16:
        cells = [Text(c.plain if c.cell_len <= room else c.plain[: room - 1] + "…", style="dim") for c in source]
        columns.append(Column("source", cells, justify="left", drop=5, dropped="source line"))


def _part_cell(part: Part | None) -> Text:
    if part is None:
        return Text("·", style="dim")
    if not part.finite:
        bad = part.absmax if part.absmax != part.absmax or part.absmax == float("inf") else part.norm
        return Text(nonfinite(bad), style="bold red")
    if part.zero:
        return Text("zero", style="magenta")
    text = Text(number(part.norm), style="" if part.in_grad else "dim strike")
    if part.share is not None:
        text.append(f" {share(part.share)}", style="bold")
    if part.cos_before is not None and part.cos_before < -0.3:
        text.append(f" ↺{part.cos_before:.2f}", style="red")
    return text


def _carried_cell(row: LeafBreakdown | Folded) -> Text:
    if row.carried_in is None:
        return Text("—", style="dim")
    text = Text(number(row.carried_in.norm), style="yellow")
    if row.carried_in.share is not None:
        text.append(f" {share(row.carried_in.share)}", style="bold")
    return text


def breakdown_table(
    trace: Trace, rows: list[LeafBreakdown] | None = None, max_columns: int = 8, depth: Depth = "auto"
) -> RenderableType:
    """Per leaf and per backward call: ‖part‖ and its share of the final .grad; carried in; check.

    Big models are folded into a module tree (``depth``; see :func:`gradprobe.report.tree.fold`).
    """
    return _BreakdownTable(trace, rows, max_columns, depth)


def single_record(rows: list[LeafBreakdown]) -> int | None:
    """The record every leaf's .grad came from whole (one part each, nothing carried in), if any."""
    records = set()
    for row in rows:
        if len(row.parts) != 1 or not row.parts[0].in_grad or row.carried_in is not None:
            return None
        records.add(row.parts[0].record)
    return records.pop() if len(records) == 1 else None


class _BreakdownTable:
    """The breakdown, laid out for the console's width (NOTE [one line per row] in ``layout``)."""

    def __init__(self, trace: Trace, rows: list[LeafBreakdown] | None, max_columns: int, depth: Depth) -> None:
        self._trace = trace
        self._rows = trace.breakdown() if rows is None else rows
        self._max_columns = max_columns
        self._depth = depth

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = self._rows
        records: tuple[BackwardRecord, ...] = self._trace.records
        title = Text("Gradient breakdown · ‖part‖ and share of the final .grad", style="bold")
        latest = _latest_step(records)
        if latest is not None:  # several steps: the latest in full (the run section has the others)
            records = tuple(r for r in records if r.step == latest)
            title.append(f" · step {latest:,}, the latest", style="bold")
        shown_rows, fold_note = fold(rows, self._depth)
        single = single_record(rows)
        legend: list[str] = []
        labels: list[Text] = []
        indents: list[int] = []
        shapes: list[Text] = []
        for s in shown_rows:
            leaf = getattr(s.row, "leaf", None)  # a leaf's row, or a module's sum (tree.Group)
            style = "dim" if s.more else ("" if leaf is not None and s.indent else "bold")
            labels.append(Text(" " * s.indent + s.label, style=style))
            indents.append(s.indent)
            if leaf is not None:
                shapes.append(Text("×".join(map(str, leaf.shape)) or "scalar", style="dim"))
            else:
                shapes.append(Text(f"{s.row.count} tensors", style="dim"))  # type: ignore[union-attr]
        columns = [
            Column("leaf" if not fold_note else "module / leaf", labels, justify="left", shrink=12, indents=indents),
            Column("shape", shapes, justify="left", drop=99, dropped="shape"),
        ]
        notes: list[str] = []
        struck = False
        if single is not None:
            r = self._trace._ledger.records.get(single)
            notes.append(f"every .grad is exactly what backward #{single}{f' ({r.name})' if r else ''} added")
        else:
            shown = records[: self._max_columns]
            if len(records) > len(shown):
                notes.append(f"showing {len(shown)} of {len(records)} backward calls; t.breakdown() has all")
            for i, r in enumerate(shown):
                header = Text(r.name, style="bold")
                sub = f"#{r.index}" + (" grad" if r.kind == "grad" else (" retain" if r.retain_graph else ""))
                header.append("\n" + sub, style="dim")
                cells = [_part_cell(s.row.part(r.index)) for s in shown_rows]
                struck = struck or any("strike" in str(c.style) for c in cells)
                columns.append(Column(header, cells, drop=20 + len(shown) - i if i else 0, dropped=f"#{r.index}"))
        if any(s.row.carried_in is not None for s in shown_rows):
            columns.append(Column("carried in", [_carried_cell(s.row) for s in shown_rows]))
            legend.append("carried in: what .grad held before the first part")
        grads = [Text(number(s.row.grad_norm), style="bold red" if s.row.grad_finite is False else "") for s in shown_rows]
        columns.append(Column("‖.grad‖", grads))
        columns.append(Column("Σ", [check_cell(s.row.check) for s in shown_rows], justify="center"))
        table, dropped = fitted_table(columns, options.max_width)
        calls = [d for d in dropped if d.startswith("#")]
        if calls:
            notes.append(f"backward calls {', '.join(calls)} left out at this width; t.breakdown() has them")
        notes += [d for d in dropped if not d.startswith("#")]
        if fold_note:
            notes.append(fold_note)
        counts: dict[str, int] = {}
        for row in rows:
            if row.note:
                counts[row.note] = counts.get(row.note, 0) + 1
        notes += [f"{count} lea{'ves' if count != 1 else 'f'}: {note}" for note, count in counts.items()]
        shown_cells = {c.plain for col in columns[2:] for c in col.cells}
        if "·" in shown_cells:
            legend.append("· not reached")
        if any(c.startswith("zero") for c in shown_cells):
            legend.append("zero = reached, exactly 0")
        if any("↺" in c for c in shown_cells):
            legend.append("↺ cosine < -0.3 with what .grad held")
        if struck:
            legend.append("struck through: a part no longer in .grad (reset later, or an autograd.grad call)")
        legend.append("Σ ✓: the parts add up to .grad")
        yield title
        yield table
        for note in notes:
            yield Text(note, style="dim")
        yield Text("   ".join(legend), style="dim")


def several_steps(trace: Trace) -> bool:
    """Whether the trace's backward calls span several training steps (some may be folded already)."""
    return trace._run.folded_steps > 0 or _latest_step(trace.records) is not None


def _latest_step(records: tuple[BackwardRecord, ...]) -> int | None:
    """The step of the last record, when the records span several steps (else None)."""
    if not records or records[0].step == records[-1].step:
        return None
    return records[-1].step


def findings_panel(
    findings: list[Finding], counts: dict[tuple[str, Any], tuple[int, int, int]] | None = None
) -> RenderableType:
    """The findings, each with severity, code, the user's line and the fix.

    ``counts``: per (code, site), how many times and in which steps it was found (``Trace.finding_counts``):
    a finding repeated over a run is shown once, with its count and first and last step.
    """
    if not findings:
        return Text("No findings.", style="green")
    items: list[RenderableType] = []
    shown: set[tuple[str, Any]] = set()
    unique = []
    for f in findings:
        key = (f.code, f.site)
        if counts is not None and key in shown:
            continue
        shown.add(key)
        unique.append(f)
    for f in unique:
        head = Text()
        head.append(f"{f.severity.upper():8}", style=_SEVERITY_STYLE[f.severity])
        head.append(f"{f.code} ", style="bold")
        if f.site:
            head.append(f"{f.site}  ", style="cyan")
        seen = counts.get((f.code, f.site)) if counts is not None else None
        if seen is not None and seen[0] > 1 and seen[1] != seen[2]:
            head.append(f"×{seen[0]:,} in steps {seen[1]:,}–{seen[2]:,}  ", style="magenta")
        elif f.step:
            head.append(f"step {f.step:,}  ", style="magenta")
        head.append(f.message)
        items.append(head)
        if f.site and f.site.source:
            items.append(Text(f"    {f.site.lineno:>5} │ {f.site.source}", style="dim"))
        for rel in f.related:
            items.append(Text(f"    {rel.site}: {rel.role}", style="dim"))
        if f.fix:
            items.append(Text(f"    fix: {f.fix}", style="green"))
    tally = {s: sum(1 for f in unique if f.severity == s) for s in ("error", "warning", "info")}
    title = ", ".join(f"{n} {s}{'s' * (n != 1)}" for s, n in tally.items() if n)
    return Panel(Group(*items), title=f"Findings · {title}", title_align="left", border_style="red" if tally["error"] else "yellow")
