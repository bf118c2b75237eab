"""The public Trace: what ``gradprobe.trace(...)`` returns, a thin object over a recorder.

Place in the flow: this is the top of the library (only the integrations sit above it). A
:class:`Trace` validates its options, builds a :class:`~gradprobe.capture.recorder.Recorder` (the
capture layer: hooks → ledger) and a :class:`~gradprobe.capture.host.PluginHost` (detectors, the
decomposer and report sections), and routes the user's questions to them: records and leaves from
the ledger, ``breakdown()`` from the analysis layer, ``report()`` from the report sections. Features
that are plugins (decomposition, DDP gather, plots, Jupyter display) are reached through the plugin
host or through small functions of the report layer that take the trace.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from gradprobe.analysis.breakdown import LeafBreakdown, compute_breakdown
from gradprobe.analysis.finals import FinalGrad, snapshot_final
from gradprobe.analysis.decompose_plugin import parse_decompose
from gradprobe.analysis.run import RunAggregates, fold_window
from gradprobe.api.assertions import TraceAssertions
from gradprobe.api.lifecycle import TraceLifecycle
from gradprobe.api.views import TraceViews
from gradprobe.capture.host import PluginHost
from gradprobe.capture.lifecycle import gc_paused
from gradprobe.capture.recorder import Recorder
from gradprobe.capture.sites import user_frame
from gradprobe.capture.targets import resolve_targets
from gradprobe.exceptions import GradProbeError, GradProbeWarning

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rich.console import Console

    from gradprobe.findings import Finding
    from gradprobe.ledger.ledger import BackwardRecord, Leaf, Ledger, LeafState

__all__ = ["Trace", "trace"]

Keep = Literal["stats", "tensors"]
Policy = Literal["warn", "raise", "record"]


def trace(
    *targets: Any,
    keep: Keep = "stats",
    report: bool = False,
    on_finding: Policy = "warn",
    plugins: Iterable[Any] = (),
    disable: Iterable[str] = (),
    console: Console | None = None,
    detect: str | Iterable[str] = "default",
    decompose: bool | str = False,
    window: int | None = 16,
    every: int = 1,
) -> Trace:
    """Record every backward call's exact contribution to the gradients of ``targets``.

    Args:
        *targets: ``nn.Module`` objects (their parameters that require grad), leaf tensors, or
            iterables of them. With none, every leaf any traced backward reaches is recorded.
        keep: ``"stats"`` keeps per-part statistics on the device (cheap); ``"tensors"`` also keeps
            each part, so the parts can be summed and compared with ``.grad`` bit for bit.
        report: print :meth:`Trace.report` when the block exits.
        on_finding: ``"warn"`` issues a :class:`~gradprobe.GradProbeWarning` per finding,
            ``"raise"`` raises :class:`~gradprobe.GradProbeError` at an error finding, ``"record"``
            only collects them in :attr:`Trace.findings`.
        plugins: extra plugins (objects, or classes instantiated for this trace).
        disable: names of plugins to leave out (built-in or installed).
        console: the rich console ``report=True`` prints to.
        detect: which built-in mistake detectors run: ``"default"`` (the cheap ones), ``"all"``, or
            an iterable of detector names (see :mod:`gradprobe.detectors`).
        decompose: split each backward of a combined loss (``(l_cls + 0.5 * l_box).backward()``) into
            the part each component loss adds: ``True``, ``False`` or ``"every:N"`` (every N-th backward).
            Components are losses named with :meth:`Trace.name` / :meth:`Trace.losses` and the outputs of
            ``torch.nn.functional`` losses called inside the trace. See :meth:`Trace.splits`.
        window: how many recent training steps are kept in full (every part of every backward call).
            Older steps are folded into the run's aggregates (per leaf, module and loss: counts,
            mean/max of norm and share, conflicts, first and last step), so memory does not grow with
            the number of steps. A step ends at ``optimizer.step()`` (or ``GradScaler.step``, or
            :meth:`Trace.step`). ``None`` keeps everything.
        every: measure the parts of every N-th step only (steps 0, N, 2N, ...); backward calls of the
            other steps are still seen by the detectors. The run report says which steps were measured.

    Leaves are named by one rule, however they were passed: a parameter by its path under the
    outermost module in scope that holds it, behind the variable naming that module
    (``model.backbone.0.weight`` for ``trace(model)``, ``trace(model.backbone)`` and
    ``trace(model.parameters())`` alike; in scope: the caller's locals, its globals, and modules held
    by attributes of ``self``); a module no variable holds by its class (``Sequential.0.weight``); a
    loose tensor by its variable, else ``tensor#N[shape]``. ``Leaf.module`` is the name up to its
    last dot. See NOTE [leaf names] in ``gradprobe/capture/targets.py`` and the README.

    Example::

        with gradprobe.trace(model) as t:
            loss_cls.backward(retain_graph=True)
            loss_box.backward()
        t.report()
    """
    return Trace(
        targets,
        keep=keep,
        report=report,
        on_finding=on_finding,
        plugins=plugins,
        disable=disable,
        console=console,
        detect=detect,
        decompose=decompose,
        window=window,
        every=every,
    )


class Trace(TraceLifecycle, TraceViews, TraceAssertions):
    """A gradient trace; use it as a context manager (see :func:`gradprobe.trace`)."""

    def __init__(
        self,
        targets: tuple[Any, ...] = (),
        *,
        keep: Keep = "stats",
        report: bool = False,
        on_finding: Policy = "warn",
        plugins: Iterable[Any] = (),
        disable: Iterable[str] = (),
        console: Console | None = None,
        detect: str | Iterable[str] = "default",
        decompose: bool | str = False,
        window: int | None = 16,
        every: int = 1,
        _frame_depth: int = 2,
    ) -> None:
        if keep not in ("stats", "tensors"):
            raise ValueError(f"trace(keep=...) must be 'stats' or 'tensors', got {keep!r}")
        if on_finding not in ("warn", "raise", "record"):
            raise ValueError(f"trace(on_finding=...) must be 'warn', 'raise' or 'record', got {on_finding!r}")
        parse_decompose(decompose)  # validates
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(
                f"trace(window=...) is the number of recent steps kept in full: a positive int, or None to "
                f"keep every step; got {window!r}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"trace(every=...) measures every N-th step: a positive int (1: every step), got {every!r}")
        self.window = window
        self.every = every
        self._run = RunAggregates()  # NOTE [window] in analysis/run.py
        self._finding_counts: dict[tuple[str, Any], list[int]] = {}  # (code, site) -> [count, first, last step]
        self.keep: Keep = keep
        self.decompose = decompose
        self.on_finding: Policy = on_finding
        self._print_report = report
        self._console = console
        self._findings: list[Finding] = []
        self._finals: list[FinalGrad] | None = None
        self._cache: list[LeafBreakdown] | None = None  # the breakdown, once the trace is done
        self._recorder = recorder = Recorder(keep, self)
        recorder.every_leaf = not targets
        recorder.every = every
        recorder.steps.on_end("window", _end_of_step)
        frame = user_frame(_frame_depth)
        with gc_paused():  # NOTE [no collections while hooking] in capture/lifecycle.py
            for tensor, name, module in resolve_targets(targets, frame, recorder.serial):
                recorder.track(tensor, name, module)
            self._plugins = PluginHost(self, plugins, disable, detect)
        recorder.host = self._plugins

    # -- what plugins read: the recorder's state, under the names plugins have always used -----

    @property
    def _ledger(self) -> Ledger:
        return self._recorder.ledger

    @property
    def _by_id(self) -> dict[int, LeafState]:
        return self._recorder.by_id

    @property
    def _names(self) -> dict[int, tuple[Any, str]]:
        return self._recorder.names

    @property
    def _muted(self) -> int:
        return self._recorder.muted

    @property
    def _mode(self) -> Any:
        return self._recorder.mode

    def _tracked(self, tensor: torch.Tensor) -> bool:
        return self._recorder.tracked(tensor)

    def _record_for_task(self) -> BackwardRecord:
        return self._recorder.record_for_task()

    @property
    def every_leaf(self) -> bool:
        """Whether every leaf the traced backward calls reach is recorded (no targets were given)."""
        return self._recorder.every_leaf

    # -- public data API ---------------------------------------------------------------------

    @property
    def records(self) -> tuple[BackwardRecord, ...]:
        """One :class:`BackwardRecord` per backward / autograd.grad call, in call order.

        Only the calls of the steps still kept in full (the last ``window`` or more): older ones are
        folded into :meth:`run`. ``record.index`` counts every call since the trace began, so it is the
        position here only while nothing was folded.
        """
        return tuple(self._ledger.records)

    @property
    def leaves(self) -> tuple[Leaf, ...]:
        """Every recorded leaf, in the order it was first tracked."""
        return tuple(state.leaf for state in self._ledger.leaves)

    @property
    def findings(self) -> list[Finding]:
        """Findings so far (detectors and plugins add to it; see :meth:`emit`)."""
        return list(self._findings)

    @property
    def active(self) -> bool:
        return self._recorder.state == "active"

    @property
    def plugin_names(self) -> list[str]:
        return self._plugins.names

    @property
    def current_step(self) -> int:
        """The training step running now, counted from 0 (the number of steps that have ended)."""
        return self._recorder.steps.count

    def step(self) -> None:
        """End the current training step by hand (code without ``optimizer.step()``; NOTE [steps]).

        Steps end by themselves at every ``optimizer.step()``; call this only where no optimizer
        steps, so that the report, ``window`` and ``every`` count your steps.
        """
        if self._recorder.state != "active":
            raise GradProbeError(
                f"Trace.step() ends a training step of an active trace; this one is {self._recorder.state} "
                "(call it inside the `with gradprobe.trace(...)` block)"
            )
        self._recorder.steps.end("manual")

    def run(self) -> RunAggregates:
        """The run so far: the folded steps' aggregates plus the steps still kept in full.

        Per loss (a backward call's line), per (leaf, loss) and per (module, loss): how often, mean and
        max norm and share, conflicts, first and last step; per module a bounded trend of share and
        ‖.grad‖. See NOTE [window] in :mod:`gradprobe.analysis.run`.
        """
        with torch._C.DisableTorchFunction():
            return self._run.snapshot(self._ledger)

    def finding_counts(self) -> dict[tuple[str, Any], tuple[int, int, int]]:
        """Per (code, site): how many times it was found, and its first and last step."""
        return {k: (v[0], v[1], v[2]) for k, v in self._finding_counts.items()}

    def name(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Name a loss (or a leaf) for the report; returns ``tensor`` so it can wrap an expression."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Trace.name() names tensors; got {type(tensor).__name__} for {name!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Trace.name() needs a non-empty string name, got {name!r}")
        self._recorder.set_name(tensor, name)
        return tensor

    def losses(self, losses: Any) -> Any:
        """Name the component losses of a combined loss (a dict ``{name: loss}``); returns ``losses``.

        Example: ``total = sum(t.losses({"cls": l_cls, "box": l_box}).values())``.
        """
        if not isinstance(losses, Mapping):
            raise TypeError(f"Trace.losses() takes a dict {{name: loss tensor}}, got {type(losses).__name__}")
        for name, loss in losses.items():
            self.name(loss, str(name))
        return losses

    def given_name(self, tensor: torch.Tensor) -> str | None:
        """The name given with :meth:`name`, if any."""
        return self._recorder.given_name(tensor)

    def breakdown(self) -> list[LeafBreakdown]:
        """Per leaf: the part each backward call added, what was carried in, the total and the check.

        Statistics are read back from the device here, once (cached after the trace ended).
        """
        done = self._recorder.state == "done"
        if done and self._cache is not None:
            return self._cache
        finals = self._finals if self._finals is not None else snapshot_final(self._ledger)
        rows = compute_breakdown(self._ledger, finals)
        if done:
            self._cache = rows
        return rows

    def emit(self, finding: Finding) -> None:
        """Add a finding and apply ``on_finding`` (this raises :class:`GradProbeError` under "raise")."""
        self._add_finding(finding, self.on_finding)

    def revise(self, finding: Finding, revised: Finding) -> bool:
        """Replace an emitted ``finding`` (the same object) by ``revised``; False when it is not there.

        For plugins whose earlier finding turned out differently (a prediction that did not come
        true is revised to an info finding). Nothing is warned or raised again.
        """
        for i, existing in enumerate(self._findings):
            if existing is finding:
                self._findings[i] = revised
                return True
        return False

    def notice_once(self, finding: Finding) -> None:
        """Emit ``finding`` unless one with the same code was already emitted by this trace."""
        notices = self._recorder.notices
        if finding.code not in notices:
            notices.add(finding.code)
            self.emit(finding)

    def _add_finding(self, finding: Finding, policy: Policy) -> None:
        if finding.step is None:
            records = self._ledger.records
            step = self._recorder.steps.count
            if records and self._recorder.steps.first_record == len(records):
                step = records[-1].step  # between steps (at the trace's end): the last step that ran
            object.__setattr__(finding, "step", step)  # frozen for users; plugins keep the same object (revise)
        key = (finding.code, finding.site)
        seen = self._finding_counts.get(key)
        if seen is None:
            self._finding_counts[key] = [1, finding.step, finding.step]
        else:
            seen[0] += 1
            seen[2] = finding.step  # type: ignore[assignment]
        self._findings.append(finding)
        if policy == "raise" and finding.severity == "error":
            raise GradProbeError(finding.format(), finding)
        if policy in ("warn", "raise") and finding.severity != "info":
            site = finding.site
            if site is not None:
                warnings.warn_explicit(finding.format(), GradProbeWarning, site.filename, site.lineno)
            else:
                warnings.warn(finding.format(), GradProbeWarning, stacklevel=2)

    def muted(self) -> contextlib.AbstractContextManager[None]:
        """Run gradprobe's own autograd calls (e.g. decomposition) without recording them."""
        return self._recorder.muting()

    def _forget_findings(self, before_step: int) -> None:
        """Keep the first finding of each (code, site) and those of steps from ``before_step`` on (NOTE [window])."""
        first: set[tuple[str, Any]] = set()
        kept = []
        for f in self._findings:
            key = (f.code, f.site)
            if key not in first:
                first.add(key)
                kept.append(f)
            elif f.step is None or f.step >= before_step:
                kept.append(f)
        self._findings = kept

    def __repr__(self) -> str:
        return (
            f"<gradprobe.Trace {self._recorder.state}: {len(self._ledger.records)} backward calls, "
            f"{len(self._ledger.leaves)} leaves, {len(self._findings)} findings>"
        )


def _end_of_step(trace: Trace, event: Any) -> None:
    """At every step end: fold the oldest steps when 2 × window are kept (NOTE [window] in analysis/run.py)."""
    if trace.window is None:
        return
    ledger = trace._ledger
    upto = fold_window(ledger, trace._run, trace._recorder.steps.count, trace.window)
    if upto is not None:
        trace._recorder.forget_before(upto)
        trace._forget_findings(trace._run.folded_steps)
