"""The run section of the report: per module and loss over all steps (share, trend, conflicts, ‖.grad‖).

Shown when a trace saw more than one training step. It reads ``Trace.run()`` (the folded steps'
aggregates plus the steps still kept in full, NOTE [window] in analysis/run.py), so its size depends
on the model and the number of losses, never on the number of steps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.text import Text

from gradprobe._format import number
from gradprobe.hookspecs import hookimpl
from gradprobe.report.layout import Column, fitted_table
from gradprobe.report.tables import several_steps

if TYPE_CHECKING:
    from gradprobe.analysis.run import Agg, ModuleRun, RunAggregates, Series
    from gradprobe.api.trace import Trace

__all__ = ["RunSection", "last_step", "run_table", "sparkline"]

_BARS = "▁▂▃▄▅▆▇█"
MAX_MODULES = 12  # module rows shown, largest mean ‖.grad‖ first
MAX_LOSSES = 4


def sparkline(series: Series, width: int = 10, low: float | None = None, high: float | None = None) -> str:
    """The series' bucket means as ``width`` bar characters or fewer (oldest left)."""
    means = [p[2] for p in series.points() if math.isfinite(p[2])]
    if not means:
        return ""
    if len(means) > width:  # average neighbouring buckets down to the width
        step = len(means) / width
        means = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := means[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)])
        ]
    lo = min(means) if low is None else low
    hi = max(means) if high is None else high
    if hi - lo <= 1e-12 * max(abs(hi), abs(lo), 1e-30):
        return _BARS[3] * len(means)
    return "".join(_BARS[min(len(_BARS) - 1, max(0, int((m - lo) / (hi - lo) * (len(_BARS) - 1) + 0.5)))] for m in means)


def last_step(trace: Trace) -> int:
    """The last step that had backward calls (the running one, when it has)."""
    records = trace.records
    return records[-1].step if records else max(trace.current_step - 1, 0)


def _share_cell(agg: Agg | None, trend: Series | None, norm: Agg | None) -> Text:
    if agg is None or agg.n == 0:
        if norm is not None and norm.n:  # reached, share unknown (3+ parts in keep="stats"): its size
            return Text(f"‖{number(norm.mean)}‖", style="")
        return Text("·", style="dim")
    mean = agg.mean or 0.0
    text = Text(f"{mean * 100:.0f}%", style="bold red" if mean < 0 else "bold")
    if trend is not None and len(trend.buckets) > 1:  # on 0…100% (wider when a share leaves it)
        text.append(" " + sparkline(trend, 8, min(0.0, agg.low), max(1.0, agg.high)), style="cyan")
    return text


def _conflict_cell(run: ModuleRun) -> Text:
    rate = run.conflict_rate
    if rate is None:
        return Text("—", style="dim")
    worst = min((a.low for a in run.cos.values() if a.n), default=None)
    text = Text(f"{rate * 100:.0f}%", style="bold red" if rate >= 0.5 else ("yellow" if rate > 0 else "green"))
    if worst is not None and worst < 0:
        text.append(f" {worst:+.2f}", style="red")
    return text


def _grad_cell(run: ModuleRun) -> Text:
    agg = run.grad_norm
    if agg.n == 0:
        return Text("—", style="dim")
    first = run.grad_trend.points()[0][2] if run.grad_trend.buckets else math.nan
    text = Text(f"{number(first)}→{number(agg.last_value)}")
    if len(run.grad_trend.buckets) > 1:
        text.append(" " + sparkline(run.grad_trend, 8), style="cyan")
    return text


def run_table(trace: Trace, run: RunAggregates, width: int) -> Group:
    """Per module (the whole model first): each loss's share of its ‖.grad‖, conflicts, ‖.grad‖ trend."""
    losses = sorted(run.losses.values(), key=lambda i: -i.calls.n)
    shown_losses = losses[:MAX_LOSSES]
    order = {s.leaf.module: s.leaf.index for s in reversed(trace._ledger.leaves)}
    modules = [(name, m) for name, m in run.modules.items() if name]
    modules.sort(key=lambda nm: -(nm[1].grad_norm.mean or 0.0))
    more = len(modules) - MAX_MODULES
    modules = sorted(modules[:MAX_MODULES], key=lambda nm: order.get(nm[0], 0))
    rows = ([("(all)", run.modules[""])] if "" in run.modules else []) + modules
    labels = [Text(name, style="bold" if name == "(all)" else "") for name, _ in rows]
    columns = [Column("module", labels, justify="left", shrink=10)]
    for i, info in enumerate(shown_losses):
        cells = [_share_cell(m.share.get(info.key), m.share_trend.get(info.key), m.norm.get(info.key)) for _, m in rows]
        header = Text(info.name, style="bold")
        header.append(f"\nshare · {info.calls.n:,} calls", style="dim")
        columns.append(Column(header, cells, drop=10 + i if i else 0, dropped=f"loss {info.name}"))
    columns.append(Column(Text("cos<0\nsteps·worst"), [_conflict_cell(m) for _, m in rows], drop=6, dropped="conflicts"))
    columns.append(Column(Text("‖.grad‖\nfirst→last"), [_grad_cell(m) for _, m in rows], drop=7, dropped="‖.grad‖ trend"))
    table, dropped = fitted_table(columns, width)
    last = last_step(trace)
    title = Text(f"The run · {last + 1:,} steps (0–{last:,})", style="bold")
    title.append(" · per module: each loss's share of .grad (mean over steps, trend), conflicts", style="bold")
    notes = []
    if more > 0:
        notes.append(f"… {more} more modules (smaller ‖.grad‖); t.run().modules has all")
    if len(losses) > MAX_LOSSES:
        notes.append(f"{len(losses) - MAX_LOSSES} more losses not shown; t.run().losses has all")
    if dropped:
        notes.append("left out at this width: " + ", ".join(dropped))
    if trace.every > 1:
        notes.append(f"parts measured every {trace.every} steps (steps 0, {trace.every}, {2 * trace.every}, …)")
    if any(info.key in m.norm and info.key not in m.share for info in shown_losses for _, m in rows):
        notes.append(
            "‖x‖: mean norm of the loss's part where its share is unknown (3+ contributions to one .grad "
            "need trace(keep='tensors'), or .grad was not reset between steps)"
        )
    legend = (
        "share: of the module's .grad at the end of each step · cos<0: the fraction of steps in which a loss's "
        "part pointed against what .grad held (cosine < 0), and the worst cosine"
    )
    return Group(title, table, *[Text(n, style="dim") for n in notes], Text(legend, style="dim"))


class RunSection:
    """The report's run section (several steps only)."""

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any] | None:
        if not several_steps(trace):
            return None
        return [_RunRenderable(trace)]


class _RunRenderable:
    def __init__(self, trace: Trace) -> None:
        self._trace = trace

    def __rich_console__(self, console: Any, options: Any) -> Any:
        run = self._trace.run()
        yield run_table(self._trace, run, options.max_width)
