"""The report's renderables. They read a finished (or running) trace and never touch tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradprobe._format import check_cell, nonfinite, number, share

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult

    from gradprobe.analysis.breakdown import LeafBreakdown, Part
    from gradprobe.ledger.ledger import BackwardRecord
    from gradprobe.api.trace import Trace
    from gradprobe.findings import Finding

__all__ = ["breakdown_table", "calls_table", "findings_panel"]

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def calls_table(trace: Trace) -> RenderableType:
    """One row per backward / autograd.grad call: name, site, retain_graph, kind, source line."""
    return _CallsTable(trace)


class _CallsTable:
    """The calls table; the source line is cut to whatever width the other columns leave."""

    def __init__(self, trace: Trace) -> None:
        self._trace = trace

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        records = self._trace.records
        rows = []
        for r in records:
            kind = r.kind if r.kind == "backward" else "grad (no .grad)"
            if r.create_graph:
                kind += ", create_graph"
            if not r.seen:
                kind += f", thread {r.thread}"
            retain = "yes" if r.retain_graph else "no"
            rows.append((str(r.index), r.name, str(r.site) if r.site else "?", retain, kind))
        headers = ("#", "backward call", "site", "retain_graph", "kind")
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
        room = options.max_width - sum(widths) - 3 * len(widths) - 6
        table = Table(
            title=f"gradprobe · {len(records)} backward call{'s' * (len(records) != 1)} · "
            f"{len(self._trace.leaves)} leaves · keep={self._trace.keep}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for i, (header, style) in enumerate(zip(headers, ("dim", "bold", "", "", ""))):
            table.add_column(header, style=style, no_wrap=True, justify="right" if i == 0 else "left")
        show_source = room >= 16  # too narrow to be worth a column
        if show_source:
            table.add_column("source", style="dim", no_wrap=True)
        for r, row in zip(records, rows):
            source = r.site.source if r.site else ""
            if len(source) > room:
                source = source[: room - 1] + "…"
            table.add_row(*row, *([source] if show_source else []))
        if not records:
            table.caption = "no backward call ran inside the trace"
        yield table


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


def _carried_cell(row: LeafBreakdown) -> Text:
    if row.carried_in is None:
        return Text("—", style="dim")
    text = Text(number(row.carried_in.norm), style="yellow")
    if row.carried_in.share is not None:
        text.append(f" {share(row.carried_in.share)}", style="bold")
    return text


def breakdown_table(trace: Trace, rows: list[LeafBreakdown] | None = None, max_columns: int = 8) -> RenderableType:
    """Per leaf and per backward call: ‖part‖ and its share of the final .grad; carried in; check."""
    rows = trace.breakdown() if rows is None else rows
    records: tuple[BackwardRecord, ...] = trace.records
    shown = records[:max_columns]
    table = Table(
        title="Gradient breakdown · ‖part‖ and share of the final .grad",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("leaf", style="bold", no_wrap=True, overflow="ellipsis", min_width=12)
    table.add_column("shape", style="dim")
    for r in shown:
        header = Text(r.name, style="bold")
        sub = str(r.site) if r.site else "?"
        if r.kind == "grad":
            sub += " grad"
        elif r.retain_graph:
            sub += " retain"
        header.append("\n" + sub, style="dim")
        table.add_column(header, justify="right")
    table.add_column("carried in", justify="right")
    table.add_column("‖.grad‖", justify="right")
    table.add_column("Σ", justify="center")
    notes: dict[str, int] = {}
    for row in rows:
        cells: list[RenderableType] = [row.leaf.name, "×".join(map(str, row.leaf.shape)) or "scalar"]
        cells += [_part_cell(row.part(r.index)) for r in shown]
        grad = Text(number(row.grad_norm), style="bold red" if row.grad_finite is False else "")
        cells += [_carried_cell(row), grad, check_cell(row.check)]
        table.add_row(*cells)
        if row.note:
            notes[row.note] = notes.get(row.note, 0) + 1
    captions = []
    if len(records) > len(shown):
        captions.append(f"showing {len(shown)} of {len(records)} backward calls; t.breakdown() has all")
    captions += [f"{count} leaf{'s' * (count != 1)}: {note}" for note, count in notes.items()]
    captions.append("· not reached   zero = reached, exactly 0   ↺ cosine < -0.3 with what .grad held   Σ parts add up to .grad")
    table.caption = "\n".join(captions)
    table.caption_justify = "left"
    return table


def findings_panel(findings: list[Finding]) -> RenderableType:
    """The findings, each with severity, code, the user's line and the fix."""
    if not findings:
        return Text("No findings.", style="green")
    items: list[RenderableType] = []
    for f in findings:
        head = Text()
        head.append(f"{f.severity.upper():8}", style=_SEVERITY_STYLE[f.severity])
        head.append(f"{f.code} ", style="bold")
        if f.site:
            head.append(f"{f.site}  ", style="cyan")
        head.append(f.message)
        items.append(head)
        if f.site and f.site.source:
            items.append(Text(f"    {f.site.lineno:>5} │ {f.site.source}", style="dim"))
        for rel in f.related:
            items.append(Text(f"    {rel.site}: {rel.role}", style="dim"))
        if f.fix:
            items.append(Text(f"    fix: {f.fix}", style="green"))
    counts = {s: sum(1 for f in findings if f.severity == s) for s in ("error", "warning", "info")}
    title = ", ".join(f"{n} {s}{'s' * (n != 1)}" for s, n in counts.items() if n)
    return Panel(Group(*items), title=f"Findings · {title}", title_align="left", border_style="red" if counts["error"] else "yellow")
