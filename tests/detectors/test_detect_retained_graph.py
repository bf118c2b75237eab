"""GP112 retained_graph: retain_graph=True that kept saved tensors alive for nothing; clean twins."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import codes
from torch import nn

import gradprobe


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno  # type: ignore[union-attr]


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def test_retain_graph_in_a_loop_for_nothing() -> None:
    """retain_graph=True on every step and no second backward: one GP112 at that line, with the bytes."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(5):
            opt.zero_grad()
            loss = model(torch.randn(64, 8)).pow(2).mean()
            loss.backward(retain_graph=True)
            line = _line() - 1
            opt.step()
    (finding,) = [f for f in t.findings if f.code == "GP112"]
    assert finding.site is not None and finding.site.lineno == line
    assert finding.data["bytes"] >= 64 * 32 * 4  # at least the tanh output it kept
    assert "drop retain_graph=True" in finding.fix
    assert codes(t) == ["GP112"]


def test_loop_without_retain_graph_is_clean() -> None:
    """The twin: the same loop without retain_graph."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(5):
            opt.zero_grad()
            loss = model(torch.randn(64, 8)).pow(2).mean()
            loss.backward()
            opt.step()
    assert codes(t) == []


def test_retained_for_a_second_loss_is_clean() -> None:
    """Two losses on one graph, the first retained for the second: retain_graph was needed."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(3):
            opt.zero_grad()
            out = model(torch.randn(64, 8))
            out.pow(2).mean().backward(retain_graph=True)
            out.abs().mean().backward()
            opt.step()
    assert codes(t) == []


def test_retained_graph_at_the_end_of_the_trace() -> None:
    """A single retained backward and nothing after it: GP112 at the end, as info (a later backward may use it)."""
    model, _ = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        loss = model(torch.randn(4, 8)).sum()
        loss.backward(retain_graph=True)
    (finding,) = [f for f in t.findings if f.code == "GP112"]
    assert "before the trace ended" in finding.message and finding.severity == "info"


def test_create_graph_is_not_reported() -> None:
    """create_graph=True implies retain_graph: a gradient penalty is not flagged."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        x = torch.randn(4, 8, requires_grad=True)
        out = model(x)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        (out.mean() + gx.pow(2).mean()).backward()
        opt.step()
    assert codes(t) == []


def test_retained_then_failing_second_backward_counts_as_used() -> None:
    """A later backward that reaches the retained graph (and raises for its own reason) used it."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        out = model(torch.randn(2, 8))
        out.pow(2).mean().backward(retain_graph=True)
        opt.step()
        with pytest.raises(RuntimeError, match="inplace"):
            out.abs().mean().backward()
    assert "GP112" not in codes(t)


def test_report_lists_what_each_retained_backward_kept() -> None:
    """The report section: per retained line, the bytes kept alive and what followed (used, or GP112)."""
    import io

    from rich.console import Console

    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(2):
            opt.zero_grad()
            out = model(torch.randn(64, 8))
            out.pow(2).mean().backward(retain_graph=True)
            out.abs().mean().backward()
            opt.step()
        loss = model(torch.randn(64, 8)).pow(2).mean()
        loss.backward(retain_graph=True)
    text = io.StringIO()
    t.report(console=Console(file=text, width=300))
    report = text.getvalue()
    assert "the saved tensors each retained backward kept alive" in report
    assert "used by" in report and "no later backward before the trace ended (GP112)" in report
    assert "KB" in report
