"""What a trace shows: the report, per-loss splits and plots, the JSON export, DDP gathering.

Place in the flow: the api layer's door to the report layer. :class:`TraceViews` is a mixin of
:class:`~gradprobe.Trace` (as :class:`~gradprobe.api.assertions.TraceAssertions` is); each view is a
small function of the report or analysis layer that takes the trace, or a plugin reached through
the trace's plugin host, so the capture core never imports them.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from gradprobe.capture.lifecycle import gc_paused

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

    from gradprobe.analysis.breakdown import LeafBreakdown
    from gradprobe.analysis.run import RunAggregates
    from gradprobe.analysis.split import Split
    from gradprobe.capture.host import PluginHost
    from gradprobe.findings import Finding
    from gradprobe.ledger.ledger import Ledger
    from gradprobe.ledger.records import Leaf
    from gradprobe.report.distributed import MergedTrace

__all__ = ["SCHEMA", "TraceViews"]

# NOTE [to_dict schema]
# ``Trace.to_dict()["schema"]`` is bumped whenever a key changes meaning or goes away; new keys
# may appear without a bump. Version 1: schema, gradprobe (version), keep, outcome {state: "new" |
# "active" | "done", raised: did the traced block raise, exception: its class name or None},
# records, leaves, breakdown, splits (``Trace.splits()``, empty when the decompose plugin is
# disabled), findings. Added without a bump: "steps" {current (the running step), last (the last
# with backward calls), window, every, folded (steps folded into the run's aggregates), kept_from},
# "run" (``Trace.run()``: losses, per (leaf, loss) and per (module, loss) aggregates and trends),
# "finding_counts" [{code, site, count, first_step, last_step}], each record's "step" and each
# finding's "step".
SCHEMA = 1


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("nan", "inf"), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class TraceViews:
    """Report, splits, plots, export and DDP gathering of a :class:`~gradprobe.Trace`."""

    if TYPE_CHECKING:  # provided by Trace
        _plugins: PluginHost
        _console: Console | None
        _findings: list[Finding]
        _ledger: Ledger
        keep: str
        _report_depth: int | str | None
        _raised: str | None
        _recorder: Any
        _run: Any
        window: int | None
        every: int
        current_step: int

        def finding_counts(self) -> dict[tuple[str, Any], tuple[int, int, int]]: ...

        @property
        def leaves(self) -> tuple[Leaf, ...]: ...

        def breakdown(self) -> list[LeafBreakdown]: ...

        def run(self) -> RunAggregates: ...

    def splits(self) -> list[Split]:
        """Per-loss splits: one per decomposed backward, then the final .grad split by backward call."""
        return self._decomposer().splits(self)

    def plot(
        self,
        what: str | os.PathLike[str] | None = None,
        path: str | os.PathLike[str] | None = None,
        split: int = -1,
        *,
        modules: list[str] | None = None,
        max_modules: int | None = None,
    ) -> Any:
        """Draw per-loss gradient flow (needs ``pip install gradprobe[plot]``); returns the matplotlib figure.

        ``what`` picks the plot: ``"split"`` (the default) draws one per-loss split per module (the
        ``split``-th of :meth:`splits`, the last by default); ``"shares"`` draws each loss's share of
        every module's ``.grad`` against the step, over the run (:meth:`run`); ``"conflicts"`` the
        cosine of each loss's part with what ``.grad`` held before it, and how often it was below 0.
        Run plots draw at most ``max_modules`` (12) modules, largest mean ``‖.grad‖`` first, or those
        named in ``modules``. ``path`` saves a PNG; ``t.plot("flow.png")`` (a path in place of
        ``what``) still draws the split.
        """
        from gradprobe.report.plot import MAX_MODULES, RUN_KINDS, plot_run, plot_split

        if what is None or what == "split" or what in RUN_KINDS:
            kind = "split" if what is None else str(what)
        elif isinstance(what, str) and not os.path.splitext(what)[1]:
            raise ValueError(f"Trace.plot(): unknown plot {what!r}; choose 'split', 'shares' or 'conflicts' "
                             "(or give a file name such as 'flow.png' to draw the split)")
        elif isinstance(what, (str, os.PathLike)):  # t.plot("flow.png") and t.plot("flow.png", 0): the split
            if path is not None and (isinstance(path, bool) or not isinstance(path, int)):
                raise ValueError(f"Trace.plot(): {what!r} is not a plot ('split', 'shares', 'conflicts'), and a "
                                 "path is given as well; call t.plot('shares', path=...)")
            kind, split, path = "split", split if path is None else path, what
        else:
            raise TypeError(f"Trace.plot(): the first argument is 'split', 'shares', 'conflicts' or a path; got {what!r}")
        if kind == "split":
            if modules is not None or max_modules is not None:
                raise ValueError("Trace.plot(modules=..., max_modules=...) choose modules of the run plots "
                                 "('shares', 'conflicts'); the split plot draws every module")
            splits = self.splits()
            if not splits:
                raise ValueError("Trace.plot(): nothing to plot; use trace(..., decompose=True) or 2+ backward calls")
            return plot_split(splits[split], path)
        if split != -1:
            raise ValueError(f"Trace.plot({kind!r}, split=...): split= picks one split for plot 'split'; "
                             "a run plot covers every step")
        return plot_run(self.run(), kind, path, modules, MAX_MODULES if max_modules is None else max_modules)

    def _decomposer(self) -> Any:
        plugin = self._plugins.get_plugin("decompose")
        if plugin is None:
            raise RuntimeError("the 'decompose' plugin is disabled in this trace (trace(disable=['decompose']))")
        return plugin

    def to_dict(self) -> dict[str, Any]:
        """Everything recorded, JSON-safe (non-finite numbers as strings); see NOTE [to_dict schema]."""
        from gradprobe import __version__

        splits: list[dict[str, Any]] = []
        records = self._ledger.records.kept
        if self._plugins.get_plugin("decompose") is not None:
            splits = [split.to_dict() for split in self.splits()]
        return _json_safe(
            {
                "schema": SCHEMA,
                "gradprobe": __version__,
                "keep": self.keep,
                "outcome": {"state": self._recorder.state, "raised": self._raised is not None, "exception": self._raised},
                "records": [r.to_dict() for r in self._ledger.records],
                "leaves": [leaf.to_dict() for leaf in self.leaves],
                "breakdown": [row.to_dict() for row in self.breakdown()],
                "splits": splits,
                "findings": [f.to_dict() for f in self._findings],
                "steps": {
                    "current": self.current_step,
                    "last": records[-1].step if records else None,
                    "window": self.window,
                    "every": self.every,
                    "folded": self._run.folded_steps,
                    "kept_from": records[0].step if records else None,
                },
                "run": self.run().to_dict({s.leaf.index: s.leaf.name for s in self._ledger.leaves}),
                "finding_counts": [
                    {"code": code, "site": list(site) if site else None, "count": n, "first_step": a, "last_step": b}
                    for (code, site), (n, a, b) in self.finding_counts().items()
                ],
            }
        )

    def gather(self, dst: int = 0, group: Any = None) -> MergedTrace | None:
        """Merge all ranks' traces of a torch.distributed job on rank ``dst`` (a collective call).

        Every rank must call it. Returns a :class:`~gradprobe.report.distributed.MergedTrace` on ``dst``
        (``.report()`` prints per-rank part norms, their spread, and whether the all-reduced ``.grad``
        agrees), None on the other ranks. Only small statistics travel (``gather_object``).
        """
        from gradprobe.report.distributed import gather_trace

        return gather_trace(self, dst, group)

    def report(self, console: Console | None = None, depth: int | str | None = "auto") -> None:
        """Print the report (calls, gradient breakdown, splits, findings) to ``console`` (default: rich's).

        Args:
            console: where to print; default: the trace's ``console=``, else rich's global console.
            depth: how the tables of a big model are folded into a module tree. ``"auto"`` shows up
                to 40 leaves one row each, and folds bigger models at the deepest level that fits
                in about 40 rows, largest modules first, the rest in "… N more" rows; ``None``
                shows every leaf; an integer folds at that level of the module tree.
        """
        import rich

        if depth is not None and depth != "auto" and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
            raise ValueError(f"Trace.report(depth=...) must be 'auto', None or a level >= 1, got {depth!r}")
        previous = self.__dict__.get("_report_depth", "auto")
        self._report_depth = depth
        try:
            (console or self._console or rich.get_console()).print(self)
        finally:
            self._report_depth = previous

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.console import NewLine

        with gc_paused():  # a big model's report makes many small objects: no full collections meanwhile
            first = True
            for sections in self._plugins.call("gradprobe_report_sections", trace=self):
                for section in sections:
                    if not first:
                        yield NewLine()  # a blank line between sections
                    first = False
                    yield section

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Jupyter displays a trace as its rich report."""
        from gradprobe.report.export import mimebundle

        return mimebundle(self, include, exclude)
