"""pytest plugin for gradprobe (loaded through the ``pytest11`` entry point).

- fixture ``gradprobe``: ``with gradprobe.trace(model) as t:`` in a test; error findings fail the test
  and the report is attached to the failure.
- marker ``@pytest.mark.gradprobe(**trace_options)``: the test body runs inside a trace of every leaf.
- ``--gradprobe`` (ini ``gradprobe = true``): every test runs inside a trace; the terminal summary
  lists the findings per test. ``--gradprobe-strict`` (ini ``gradprobe_strict = true``) also fails the
  tests with error findings, except those marked ``@pytest.mark.gradprobe_allow("GP101", ...)`` (all
  codes when none are given) and errors the test itself caught (``pytest.raises``: the backward
  gradprobe warned about raised, and the test passed).
- A traced test that fails, for whatever reason, carries the report in a "Captured gradprobe call"
  section.

# NOTE [what the plugin keeps]
# A suite runs thousands of tests; keeping each test's Trace until the session ends made the
# process's memory grow with the suite (issue 16). After a test's teardown the plugin drops its
# traces and keeps only what the summary prints: one small dict per finding. Failing tests render
# their report while the trace is still there. The dicts travel on the teardown report
# (``report.gradprobe``), which pytest-xdist serialises, so ``-n 2 --gradprobe`` sums the
# workers' findings in the controller's summary.

# NOTE [import-light]
# pytest loads this module on every run of every project that has gradprobe installed, so it
# imports neither torch nor the rest of gradprobe at import time: they are imported when a test
# asks for the fixture or the marker, or when --gradprobe traces a test and torch is already loaded
# (a test suite that never imported torch cannot run a backward, so it is not traced at all).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gradprobe.api.trace import Trace
    from gradprobe.findings import Finding

__all__ = ["GradProbeFixture"]


@dataclass
class _Entry:
    trace: Trace
    origin: str  # "fixture", "marker" or "suite" (--gradprobe)
    checked: bool = False


@dataclass
class _State:
    every_test: bool
    strict: bool
    traced: int = 0
    findings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # nodeid -> summary lines


@dataclass
class _Found:
    """What one test leaves for the summary (NOTE [what the plugin keeps])."""

    traced: bool = False
    findings: list[Finding] = field(default_factory=list)


_STATE = pytest.StashKey[_State]()
_ENTRIES = pytest.StashKey[list[_Entry]]()
_FOUND = pytest.StashKey[_Found]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradprobe", "gradprobe: gradient tracing")
    group.addoption(
        "--gradprobe",
        action="store_true",
        default=False,
        help="trace every test with gradprobe and list the findings per test (ini: gradprobe = true)",
    )
    group.addoption(
        "--gradprobe-strict",
        action="store_true",
        default=False,
        help="like --gradprobe, and fail the tests with error findings (ini: gradprobe_strict = true)",
    )
    parser.addini("gradprobe", type="bool", default=False, help="trace every test with gradprobe")
    parser.addini("gradprobe_strict", type="bool", default=False, help="fail tests with gradprobe error findings")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gradprobe(**trace_options): run the test body inside gradprobe.trace(**trace_options) of every leaf; "
        "error findings fail the test",
    )
    config.addinivalue_line(
        "markers",
        "gradprobe_allow(*codes): under --gradprobe-strict, error findings with these codes (all codes when "
        "none are given) do not fail this test; they are still listed in the summary",
    )
    strict = bool(config.getoption("gradprobe_strict") or config.getini("gradprobe_strict"))
    every_test = bool(config.getoption("gradprobe") or config.getini("gradprobe")) or strict
    config.stash[_STATE] = state = _State(every_test=every_test, strict=strict)
    config.pluginmanager.register(_Collector(state), "gradprobe-collector")


class GradProbeFixture:
    """What the ``gradprobe`` fixture gives: a factory of traces whose error findings fail the test.

    Example::

        def test_heads_get_grad(gradprobe):
            model = MultiTask()
            with gradprobe.trace(model) as t:
                sum(o.sum() for o in model(x).values()).backward()
            t.assert_all_reached()
    """

    def __init__(self, item: pytest.Item) -> None:
        self._item = item

    def trace(self, *targets: Any, **options: Any) -> Trace:
        """``gradprobe.trace(*targets, **options)``, with ``on_finding="record"`` unless given."""
        import gradprobe

        options.setdefault("on_finding", "record")
        t = gradprobe.trace(*targets, **options)
        _entries(self._item).append(_Entry(t, "fixture"))
        return t

    @property
    def traces(self) -> list[Trace]:
        """The traces made by this fixture in this test, in order."""
        return [e.trace for e in _entries(self._item) if e.origin == "fixture"]


@pytest.fixture
def gradprobe(request: pytest.FixtureRequest) -> Generator[GradProbeFixture, None, None]:
    """A factory of gradprobe traces (``with gradprobe.trace(model) as t:``); error findings fail the test."""
    yield GradProbeFixture(request.node)
    entries = _entries(request.node)
    for entry in entries:
        if entry.origin == "fixture" and entry.trace.active:  # entered by hand and never exited
            entry.trace.__exit__(None, None, None)
    _check(request.node, [e for e in entries if not e.checked], fail=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    state = item.config.stash[_STATE]
    marker = item.get_closest_marker("gradprobe")
    suite_trace: Trace | None = None
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.gradprobe takes trace options as keywords only "
                f"(e.g. keep='tensors'), got positional {marker.args!r}"
            )
        suite_trace = _trace_every_leaf(item, dict(marker.kwargs), "marker")
    elif state.every_test and "torch" in sys.modules:
        suite_trace = _trace_every_leaf(item, {}, "suite")
    if suite_trace is not None:
        item.stash.setdefault(_FOUND, _Found()).traced = True
    passed = False
    try:
        with suite_trace if suite_trace is not None else contextlib.nullcontext():
            result = yield
        passed = True
    finally:
        # the test's own failure wins: findings then go to the summary only, the report to the failure
        done = [e for e in _entries(item) if not e.trace.active]
        _check(item, [e for e in done if not e.checked], fail=passed)
        if not passed and done:
            _attach(item, [e.trace for e in done])
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.when == "teardown":
        found = item.stash.get(_FOUND, None)
        if found is not None:
            report.gradprobe = {"traced": found.traced, "findings": [_summary_line(f) for f in found.findings]}
        # NOTE [what the plugin keeps]: the traces go now, the summary lines travel on the report
        item.stash[_ENTRIES] = []
        item.stash[_FOUND] = _Found()
    return report


class _Collector:
    """Sums the teardown reports' findings into the session's state (also the xdist workers' reports)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = getattr(report, "gradprobe", None)
        if report.when != "teardown" or not isinstance(data, dict):
            return
        self.state.traced += bool(data.get("traced"))
        if data.get("findings"):
            self.state.findings.setdefault(report.nodeid, []).extend(data["findings"])


def _summary_line(f: Finding) -> dict[str, Any]:
    return {
        "filename": f.site.filename if f.site else None,
        "lineno": f.site.lineno if f.site else None,
        "code": f.code,
        "severity": f.severity,
        "message": f.message,
        "fix": f.fix,
    }


def _trace_every_leaf(item: pytest.Item, options: dict[str, Any], origin: str) -> Trace:
    import gradprobe

    options.setdefault("on_finding", "record")
    t = gradprobe.trace(**options)
    _entries(item).append(_Entry(t, origin))
    return t


def _entries(item: pytest.Item) -> list[_Entry]:
    return item.stash.setdefault(_ENTRIES, [])


def _check(item: pytest.Item, entries: list[_Entry], fail: bool) -> None:
    """Record the findings of ``entries`` for the summary; fail the test on error findings."""
    __tracebackhide__ = True
    if not entries:
        return
    state = item.config.stash[_STATE]
    found = item.stash.setdefault(_FOUND, _Found())
    allow = item.get_closest_marker("gradprobe_allow")
    allowed = set(allow.args) if allow is not None else set()
    failing: list[_Entry] = []
    for entry in entries:
        entry.checked = True
        found.findings += [f for f in entry.trace.findings if f not in found.findings]
        if entry.origin == "suite":
            if not state.strict or (allow is not None and not allowed):
                continue
            caught = _raised_sites(entry.trace)
            errors = [f for f in entry.trace.findings if f.severity == "error" and f.code not in allowed and f.site not in caught]
        else:
            errors = [f for f in entry.trace.findings if f.severity == "error"]
        if errors:
            failing.append(entry)
    if not (fail and failing):
        return
    _attach(item, [e.trace for e in failing])
    errors = [f for e in failing for f in e.trace.findings if f.severity == "error"]
    lines = [f"gradprobe found {len(errors)} error finding{'s' * (len(errors) != 1)}:"]
    lines += [f"  {f.format()}" for f in errors]
    lines.append("(the gradprobe report is in the 'Captured gradprobe call' section)")
    pytest.fail("\n".join(lines), pytrace=False)


def _raised_sites(trace: Trace) -> set[Any]:
    """Lines of backward calls that raised inside the trace: a test that passed caught their error."""
    calls = trace._plugins.get_plugin("report.calls")
    raised = getattr(calls, "raised", {})
    records = trace._ledger.records
    return {r.site for i in raised if (r := records.get(i)) is not None}


def _attach(item: pytest.Item, traces: list[Trace]) -> None:
    """Add the traces' reports to the test's failure report, once."""
    if getattr(item, "_gradprobe_attached", False):
        return
    item._gradprobe_attached = True  # type: ignore[attr-defined]
    width = item.config.get_terminal_writer().fullwidth
    item.add_report_section("call", "gradprobe", "\n".join(_render(t, width) for t in traces))


def _render(trace: Trace, width: int) -> str:
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=max(width, 80), color_system=None, force_terminal=False).print(trace)
    return buffer.getvalue()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not (state.every_test or state.findings):
        return
    tr = terminalreporter
    tr.write_sep("=", "gradprobe findings")
    for nodeid, findings in state.findings.items():
        tr.write_line(nodeid)
        for f in findings:
            where = f"{_relative(f['filename'], config)}:{f['lineno']}: " if f["filename"] else ""
            tr.write_line(f"  {where}{f['code']} [{f['severity']}] {f['message']}", red=f["severity"] == "error")
            if f["fix"]:
                tr.write_line(f"      fix: {f['fix']}")
    count = sum(len(f) for f in state.findings.values())
    traced = f"{state.traced} test{'s' * (state.traced != 1)} traced, " if state.every_test else ""
    tr.write_line(
        f"gradprobe: {traced}{count} finding{'s' * (count != 1)} in "
        f"{len(state.findings)} test{'s' * (len(state.findings) != 1)}"
    )


def _relative(filename: str, config: pytest.Config) -> str:
    try:
        return os.path.relpath(filename, config.rootpath)
    except ValueError:  # another drive on Windows
        return filename
