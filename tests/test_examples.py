"""Every script in examples/ runs to completion (in-process, via runpy)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from gradprobe.api.views import TraceViews
from report_rows import WIDTHS, assert_rows_fit, render

EXAMPLES = sorted(p for p in (Path(__file__).parent.parent / "examples").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The example script runs without error and prints a report, whose rows fit at 80, 100 and 160 columns."""
    traces: list[TraceViews] = []
    report = TraceViews.report

    def keep(self: TraceViews, *args: object, **kwargs: object) -> None:
        traces.append(self)
        report(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TraceViews, "report", keep)
    monkeypatch.setattr(sys, "argv", [str(path)])
    monkeypatch.chdir(path.parent)
    monkeypatch.syspath_prepend(str(path.parent))  # as `python examples/x.py` does
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "gradprobe" in out or "Gradient" in out, f"{path.name} printed no report"
    monkeypatch.undo()
    for trace in traces:
        for width in WIDTHS:
            if trace.breakdown():
                assert_rows_fit(render(trace, width), width)


def test_there_are_examples() -> None:
    """The examples folder is not empty (the parametrized test would silently run nothing)."""
    assert len(EXAMPLES) >= 2
