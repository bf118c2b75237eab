"""stale_grad: torch.autograd.grad calls (which never write .grad) are neither blamed nor mistaken for the last backward."""

from __future__ import annotations

import torch
from helpers import codes
from models import MLP

import gradprobe


def test_gp402_blames_the_backward_not_an_earlier_autograd_grad() -> None:
    """.grad carried into the trace, an autograd.grad first, then a backward: GP402 points at the backward line."""
    model = MLP()
    model(torch.rand(2, 8)).sum().backward()
    with gradprobe.trace(model, on_finding="record") as t:
        out = model(torch.rand(2, 8)).sum()
        torch.autograd.grad(out, list(model.parameters()), retain_graph=True)
        out.backward()
        backward_line = t.records[-1].site
    assert codes(t) == ["GP402"]
    (finding,) = [f for f in t.findings if f.code == "GP402"]
    assert [r.kind for r in t.records] == ["grad", "backward"]
    assert finding.site == backward_line


def test_gp402_absent_when_only_autograd_grad_ran() -> None:
    """.grad carried in but only torch.autograd.grad calls in the trace: nothing added to it, no GP402."""
    model = MLP()
    model(torch.rand(2, 8)).sum().backward()
    with gradprobe.trace(model, on_finding="record") as t:
        torch.autograd.grad(model(torch.rand(2, 8)).sum(), list(model.parameters()))
    assert codes(t) == []


def test_gp401_seen_through_a_gradient_penalty_between_steps() -> None:
    """A loop missing zero_grad() whose steps also call autograd.grad: still GP401 at the backward line."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(3):
            out = model(torch.rand(4, 8)).pow(2).mean()
            (g, *_) = torch.autograd.grad(out, list(model.parameters()), create_graph=True)
            loss = out + g.pow(2).sum()
            loss.backward()
            opt.step()
    assert codes(t) == ["GP401"]
    assert t.findings[0].site == [r for r in t.records if r.kind == "backward"][0].site
