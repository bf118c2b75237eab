"""pytest plugin for gradprobe (loaded through the ``pytest11`` entry point).

- fixture ``gradprobe``: ``with gradprobe.trace(model) as t:`` in a test; error findings fail the test
  and the report is attached to the failure.
- marker ``@pytest.mark.gradprobe(**trace_options)``: the test body runs inside a trace of every leaf.
- ``--gradprobe`` (ini ``gradprobe = true``): every test runs inside a trace; the terminal summary
  lists the findings per test. ``--gradprobe-strict`` (ini ``gradprobe_strict = true``) also fails the
  tests with error findings.

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
    findings: dict[str, list[Finding]] = field(default_factory=dict)  # nodeid -> findings


_STATE = pytest.StashKey[_State]()
_ENTRIES = pytest.StashKey[list[_Entry]]()


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
    strict = bool(config.getoption("gradprobe_strict") or config.getini("gradprobe_strict"))
    every_test = bool(config.getoption("gradprobe") or config.getini("gradprobe")) or strict
    config.stash[_STATE] = _State(every_test=every_test, strict=strict)


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
        state.traced += 1
    passed = False
    try:
        with suite_trace if suite_trace is not None else contextlib.nullcontext():
            result = yield
        passed = True
    finally:
        # the test's own failure wins: findings then go to the summary only
        _check(item, [e for e in _entries(item) if not e.checked and not e.trace.active], fail=passed)
    return result


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
    recorded = state.findings.setdefault(item.nodeid, [])
    failing: list[_Entry] = []
    for entry in entries:
        entry.checked = True
        recorded += [f for f in entry.trace.findings if f not in recorded]
        errors = any(f.severity == "error" for f in entry.trace.findings)
        if errors and (entry.origin != "suite" or state.strict):
            failing.append(entry)
    if not recorded:
        del state.findings[item.nodeid]
    if not (fail and failing):
        return
    width = item.config.get_terminal_writer().fullwidth
    item.add_report_section("call", "gradprobe", "\n".join(_render(e.trace, width) for e in failing))
    errors = [f for e in failing for f in e.trace.findings if f.severity == "error"]
    lines = [f"gradprobe found {len(errors)} error finding{'s' * (len(errors) != 1)}:"]
    lines += [f"  {f.format()}" for f in errors]
    lines.append("(the gradprobe report is in the 'Captured gradprobe call' section)")
    pytest.fail("\n".join(lines), pytrace=False)


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
            where = f"{_relative(f.site.filename, config)}:{f.site.lineno}: " if f.site else ""
            tr.write_line(f"  {where}{f.code} [{f.severity}] {f.message}", red=f.severity == "error")
            if f.fix:
                tr.write_line(f"      fix: {f.fix}")
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
