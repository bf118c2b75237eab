"""The pytest plugin over whole suites: memory (traces dropped), xdist, strict opt-outs, failing tests' reports."""

from __future__ import annotations

import importlib.util

import pytest

from gradprobe.capture import plugin_catalog as _catalog
from test_pytest_plugin import MODEL, PLAIN_SUITE, Planted

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def installed_planted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend a plugin that finds an error (T001) at every backward is installed."""
    monkeypatch.setattr(_catalog, "_entry_point_cache", [("planted", Planted, None)])


def test_traces_are_dropped_after_each_test(pytester: pytest.Pytester) -> None:
    """Under --gradprobe no test's Trace outlives its teardown; the summary still has every finding."""
    pytester.makepyfile(
        test_many="""
        import gc
        import weakref
        import pytest
        import torch
        import gradprobe

        BEFORE = weakref.WeakSet()  # traces alive before this suite (other tests of the same process)

        def live_traces():
            gc.collect()
            return [o for o in gc.get_objects() if isinstance(o, gradprobe.Trace)]

        def test_aa_baseline():
            BEFORE.update(live_traces())

        @pytest.mark.parametrize("i", range(20))
        def test_trains(i):
            w = torch.ones(2, requires_grad=True)
            (w * i).sum().backward()

        def test_zz_count_live_traces():
            new = [t for t in live_traces() if t not in BEFORE]
            assert len(new) <= 1, f"{len(new)} traces alive"  # this test's own
        """
    )
    result = pytester.runpytest("--gradprobe", "-p", "no:randomly")
    result.assert_outcomes(passed=22)
    result.stdout.fnmatch_lines(["gradprobe: 22 tests traced, 20 findings in 20 tests"])


def test_gradprobe_allow_marker_opts_a_test_out_of_strict(pytester: pytest.Pytester) -> None:
    """@pytest.mark.gradprobe_allow("T001") (or with no codes) keeps strict mode from failing that test."""
    pytester.makepyfile(
        model=MODEL,
        test_suite="""
        import pytest
        import torch
        from model import TwoHeads

        def step():
            model = TwoHeads()
            model(torch.randn(3, 4)).sum().backward()

        @pytest.mark.gradprobe_allow("T001")
        def test_allowed_code():
            step()

        @pytest.mark.gradprobe_allow()
        def test_allowed_all():
            step()

        @pytest.mark.gradprobe_allow("GP101")
        def test_other_code_still_fails():
            step()

        def test_unmarked_fails():
            step()
        """,
    )
    result = pytester.runpytest("--gradprobe-strict")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["gradprobe: 4 tests traced, 4 findings in 4 tests"])
    result.stdout.fnmatch_lines(["FAILED test_suite.py::test_other_code_still_fails*"])


def test_a_traced_test_failing_on_its_own_carries_the_report(pytester: pytest.Pytester) -> None:
    """Under --gradprobe a test that fails for its own reason still shows the gradprobe report."""
    pytester.makepyfile(
        """
        import torch

        def test_fails():
            w = torch.ones(2, requires_grad=True)
            (w * 2).sum().backward()
            assert w.grad.sum() == 0, "the test's own assertion"
        """
    )
    result = pytester.runpytest("--gradprobe")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the test's own assertion*", "*Captured gradprobe call*", "*Gradient breakdown*"])


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="needs pytest-xdist")
def test_xdist_workers_findings_reach_the_summary(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `-n 2 --gradprobe` the controller's summary counts the workers' traced tests and findings."""
    monkeypatch.setattr(_catalog, "_entry_point_cache", [])
    pytester.makepyfile(test_training=PLAIN_SUITE.read_text())
    result = pytester.runpytest_subprocess("-n", "2", "--gradprobe", "-p", "xdist")
    result.stdout.fnmatch_lines(
        ["*gradprobe findings*", "*GP101 [[]error[]]*will raise*", "gradprobe: 12 tests traced, 3 findings in 3 tests"]
    )
