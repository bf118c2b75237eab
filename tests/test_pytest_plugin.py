"""The pytest plugin: fixture, marker, --gradprobe summary and strict mode, over real pytest runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import gradprobe
from gradprobe.capture import plugin_catalog as _catalog
from gradprobe.findings import Finding

pytest_plugins = ["pytester"]

PLAIN_SUITE = Path(__file__).parent / "plain_suite" / "suite_training.py"

MODEL = """
import torch
from torch import nn
import gradprobe as gp


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.head_a(h) + self.head_b(h)


class Planted:
    '''Emits one error finding per backward.'''

    @gp.hookimpl
    def gradprobe_after_backward(self, trace, record, error):
        trace.emit(gp.Finding(code="T001", kind="test", severity="error", message="planted error",
                              site=record.site, fix="remove the planted plugin", plugin="planted"))
"""


class Planted:
    """The same plugin, for the "installed" case (--gradprobe)."""

    @gradprobe.hookimpl
    def gradprobe_after_backward(self, trace: Any, record: Any, error: Any) -> None:
        trace.emit(
            Finding(
                code="T001", kind="test", severity="error", message="planted error",
                site=record.site, fix="remove the planted plugin", plugin="planted",
            )
        )


@pytest.fixture
def installed_planted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend a plugin that finds an error at every backward is installed."""
    monkeypatch.setattr(_catalog, "_entry_point_cache", [("planted", Planted, None)])


@pytest.fixture(autouse=True)
def no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_catalog, "_entry_point_cache", [])


def test_detached_head_fails_readably(pytester: pytest.Pytester) -> None:
    """`def test_heads_get_grad(gradprobe)` fails naming the detached head's parameters."""
    pytester.makepyfile(
        model=MODEL,
        test_heads="""
        import torch
        from model import TwoHeads

        def test_heads_get_grad(gradprobe):
            model = TwoHeads()
            x = torch.randn(3, 4)
            with gradprobe.trace(model) as t:
                h = torch.relu(model.trunk(x))
                loss = model.head_a(h).sum() + model.head_b(h).detach().sum()
                loss.backward()
            t.assert_all_reached()

        def test_heads_get_grad_clean_twin(gradprobe):
            model = TwoHeads()
            x = torch.randn(3, 4)
            with gradprobe.trace(model) as t:
                h = torch.relu(model.trunk(x))
                (model.head_a(h).sum() + model.head_b(h).sum()).backward()
            t.assert_all_reached()
            t.assert_no_findings()
        """,
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: 2 of 6 traced parameters got no gradient from the trace's 1 backward call:",
            "*  model.head_b: weight, bias",
            "*No loss reaches these parameters*",
        ]
    )
    result.stdout.no_fnmatch_line("*_assertions.py*")  # __tracebackhide__: the test's line, not ours


def test_fixture_error_finding_fails_the_test_with_the_report(pytester: pytest.Pytester) -> None:
    """An error finding in a fixture trace fails the test; the rich report is attached as a section."""
    pytester.makepyfile(
        model=MODEL,
        test_fx="""
        import torch
        from model import TwoHeads, Planted

        def test_planted(gradprobe):
            model = TwoHeads()
            with gradprobe.trace(model, plugins=[Planted]) as t:
                model(torch.randn(3, 4)).sum().backward()  # both heads: no unrelated finding

        def test_clean(gradprobe):
            model = TwoHeads()
            with gradprobe.trace(model) as t:
                model(torch.randn(3, 4)).sum().backward()  # both heads: no unrelated finding
            assert gradprobe.traces == [t]
        """,
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_planted*",
            "gradprobe found 1 error finding:",
            "*test_fx.py:7: T001 [[]error] planted error Fix: remove the planted plugin",
            "*Captured gradprobe call*",
            "*Gradient breakdown*",
            "*Findings*1 error*",
            "*= gradprobe findings =*",
            "test_fx.py::test_planted",
            "  test_fx.py:7: T001 [[]error] planted error",
            "      fix: remove the planted plugin",
            "gradprobe: 1 finding in 1 test",
        ]
    )


def test_a_failing_test_keeps_its_own_failure(pytester: pytest.Pytester) -> None:
    """When the test body fails, that failure is reported, not the findings (they go to the summary)."""
    pytester.makepyfile(
        model=MODEL,
        test_own="""
        import torch
        from model import TwoHeads, Planted

        def test_own_failure(gradprobe):
            model = TwoHeads()
            with gradprobe.trace(model, plugins=[Planted]):
                model.head_a(model.trunk(torch.randn(3, 4))).sum().backward()
            assert 1 == 2, "the test's own assertion"
        """,
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the test's own assertion*", "*T001 [[]error] planted error*"])
    result.stdout.no_fnmatch_line("gradprobe found 1 error finding:")


def test_marker_traces_the_whole_body(pytester: pytest.Pytester) -> None:
    """@pytest.mark.gradprobe(**options) traces every leaf of the body; error findings fail the test."""
    pytester.makepyfile(
        model=MODEL,
        test_marked="""
        import pytest
        import torch
        from model import TwoHeads, Planted

        @pytest.mark.gradprobe(plugins=[Planted])
        def test_marked_with_error():
            model = TwoHeads()
            model.head_a(model.trunk(torch.randn(3, 4))).sum().backward()

        @pytest.mark.gradprobe(keep="tensors")
        def test_marked_clean():
            model = TwoHeads()
            model.head_a(model.trunk(torch.randn(3, 4))).sum().backward()

        def test_unmarked_is_not_traced():
            model = TwoHeads()
            with __import__("gradprobe").trace(plugins=[Planted], on_finding="record") as t:
                pass
            model.head_a(model.trunk(torch.randn(3, 4))).sum().backward()
            assert t.records == ()
        """,
    )
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_marked_with_error*", "*test_marked.py:8: T001 [[]error] planted error*"])


def test_marker_refuses_positional_arguments(pytester: pytest.Pytester) -> None:
    """@pytest.mark.gradprobe takes keywords only, and says so."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gradprobe("tensors")
        def test_x():
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*takes trace options as keywords only*"])


def test_option_lists_findings_per_test_without_failing(pytester: pytest.Pytester, installed_planted: None) -> None:
    """--gradprobe traces every test; findings go to the summary with file:line and fix; outcomes stay."""
    pytester.makepyfile(
        model=MODEL,
        test_suite="""
        import torch
        from model import TwoHeads

        def test_trains():
            model = TwoHeads()
            model.head_a(model.trunk(torch.randn(3, 4))).sum().backward()

        def test_no_backward():
            assert torch.ones(1).item() == 1
        """,
    )
    plain = pytester.runpytest()
    plain.assert_outcomes(passed=2)
    plain.stdout.no_fnmatch_line("*gradprobe findings*")
    traced = pytester.runpytest("--gradprobe")
    traced.assert_outcomes(passed=2)
    traced.stdout.fnmatch_lines(
        [
            "*= gradprobe findings =*",
            "test_suite.py::test_trains",
            "  test_suite.py:6: T001 [[]error] planted error",
            "      fix: remove the planted plugin",
            "gradprobe: 2 tests traced, 1 finding in 1 test",
        ]
    )


@pytest.mark.parametrize("how", ["--gradprobe-strict", "ini"])
def test_strict_turns_error_findings_into_failures(
    pytester: pytest.Pytester, installed_planted: None, how: str
) -> None:
    """--gradprobe-strict (or ini gradprobe_strict = true) fails the tests with error findings only."""
    pytester.makepyfile(
        model=MODEL,
        test_suite="""
        import torch
        from model import TwoHeads

        def test_trains():
            model = TwoHeads()
            model.head_a(model.trunk(torch.randn(3, 4))).sum().backward()

        def test_no_backward():
            assert torch.ones(1).item() == 1
        """,
    )
    if how == "ini":
        pytester.makeini("[pytest]\ngradprobe_strict = true\n")
        result = pytester.runpytest()
    else:
        result = pytester.runpytest(how)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_suite.py::test_trains*"])


def test_ini_twin_enables_tracing(pytester: pytest.Pytester, installed_planted: None) -> None:
    """`gradprobe = true` in the ini file is --gradprobe."""
    pytester.makeini("[pytest]\ngradprobe = true\n")
    pytester.makepyfile(
        """
        import torch

        def test_trains():
            w = torch.ones(2, requires_grad=True)
            (w * 2).sum().backward()
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["gradprobe: 1 test traced, 1 finding in 1 test"])


def test_help_lists_the_options(pytester: pytest.Pytester) -> None:
    """The options appear in --help under their own group."""
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["gradprobe: gradient tracing:", "*--gradprobe *", "*--gradprobe-strict*"])


def test_plain_pytorch_suite_keeps_its_outcomes(pytester: pytest.Pytester) -> None:
    """Over a plain PyTorch test suite --gradprobe changes no outcome; --gradprobe-strict only by true errors.

    Three of the suite's tests provoke PyTorch's errors on purpose: a second backward through a freed
    graph (GP101, an error finding), a backward through a tensor written in place (GP302, an error)
    and a non-leaf .grad read (GP202, a warning). Strict mode fails neither of the two with errors:
    each expects the very error gradprobe predicted with pytest.raises. Runs in subprocesses: an
    in-process rerun would re-import torch modules.
    """
    pytester.makepyfile(test_training=PLAIN_SUITE.read_text())
    plain = pytester.runpytest_subprocess()
    assert plain.parseoutcomes() == {"passed": 10, "failed": 1, "skipped": 1, "xfailed": 1}
    traced = pytester.runpytest_subprocess("--gradprobe")
    assert traced.parseoutcomes() == plain.parseoutcomes()
    traced.stdout.fnmatch_lines(
        [
            "test_training.py::test_second_backward_raises",
            "*GP101 [[]error[]]*will raise*",
            "test_training.py::test_inplace_modification_raises",
            "*GP302 [[]error[]]*will raise*written in place by `y.mul_(2)`*",
            "test_training.py::test_nonleaf_grad_warns",
            "*GP202 [[]warning[]]*",
            "gradprobe: 12 tests traced, 3 findings in 3 tests",
        ]
    )
    strict = pytester.runpytest_subprocess("--gradprobe-strict")
    assert strict.parseoutcomes() == plain.parseoutcomes()
    strict.stdout.fnmatch_lines(["test_training.py::test_second_backward_raises", "*GP101 [[]error[]]*will raise*"])


def test_fixture_under_the_option_nests_traces(pytester: pytest.Pytester) -> None:
    """A fixture trace inside a --gradprobe trace: both record, the gradients are plain autograd's."""
    pytester.makepyfile(
        """
        import torch

        def test_nested(gradprobe):
            w = torch.tensor([1.0, 2.0], requires_grad=True)
            with gradprobe.trace(w) as t:
                (w * w).sum().backward()
            assert torch.equal(w.grad, torch.tensor([2.0, 4.0]))
            assert len(t.records) == 1
            t.assert_share(w, 0, at_least=1.0, at_most=1.0)
        """
    )
    pytester.runpytest("--gradprobe").assert_outcomes(passed=1)
