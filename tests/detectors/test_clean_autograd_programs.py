"""Clean programs with custom Functions, double backward and torch.autograd.functional: no finding, same .grad."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradprobe

MINE = {"nonfinite", "nonfinite_modules", "stale_grad"}


class Square(torch.autograd.Function):
    """A plain custom Function (saved tensors, hand-written backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Vjp(torch.autograd.Function):
    """``f(x)`` whose backward is a nested autograd.grad through f's parameters (an adjoint-solver step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f: nn.Module, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.f = f
        ctx.save_for_backward(x)
        with torch.no_grad():
            return f(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[object, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        params = tuple(ctx.f.parameters())
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            gx, *gp = torch.autograd.grad(ctx.f(x), (x, *params), g)
        return (gx, None, *gp)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))


def custom_function(m: nn.Module, x: torch.Tensor) -> None:
    loss = Square.apply(m(x)).mean()
    loss.backward()


def nested_vjp(m: nn.Module, x: torch.Tensor) -> None:
    for _ in range(2):
        m.zero_grad()
        loss = Vjp.apply(x, m, *m.parameters()).pow(2).mean()
        loss.backward()


def gradient_penalty(m: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        xi = x.clone().requires_grad_()
        out = m(xi)
        (gx,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
        loss = out.mean() + 10 * (gx.norm(dim=1) - 1).pow(2).mean()
        loss.backward()
        opt.step()


def param_penalty(m: nn.Module, x: torch.Tensor) -> None:
    out = m(x).pow(2).mean()
    grads = torch.autograd.grad(out, list(m.parameters()), create_graph=True)
    loss = out + sum(g.pow(2).sum() for g in grads)
    loss.backward()


def jacobian_then_backward(m: nn.Module, x: torch.Tensor) -> None:
    torch.autograd.functional.jacobian(lambda v: m(v), x)
    torch.autograd.functional.jacobian(lambda v: m(v), x, vectorize=True)
    loss = m(x).mean()
    loss.backward()


def hessian_then_backward(m: nn.Module, x: torch.Tensor) -> None:
    torch.autograd.functional.hessian(lambda v: m(v).sum(), x[0])
    torch.autograd.functional.hvp(lambda v: m(v).sum(), x[0], torch.ones(4))
    loss = m(x).mean()
    loss.backward()


def gradcheck_then_backward(m: nn.Module, x: torch.Tensor) -> None:
    d = _model().double()
    assert torch.autograd.gradcheck(lambda v: d(v), (x.double().requires_grad_(),))
    assert torch.autograd.gradgradcheck(lambda v: Square.apply(v), (x.double()[0].requires_grad_(),))
    loss = m(x).mean()
    loss.backward()


def reentrant_checkpoint(m: nn.Module, x: torch.Tensor) -> None:
    loss = checkpoint(m, x.requires_grad_(), use_reentrant=True).mean()
    loss.backward()


PROGRAMS: dict[str, Callable[[nn.Module, torch.Tensor], None]] = {
    f.__name__: f
    for f in (
        custom_function, nested_vjp, gradient_penalty, param_penalty, jacobian_then_backward,
        hessian_then_backward, gradcheck_then_backward, reentrant_checkpoint,
    )
}


@pytest.mark.parametrize("detect", ["default", "all"])
@pytest.mark.parametrize("targeted", [True, False], ids=["targets", "every_leaf"])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_clean_program_has_no_finding_and_same_grad(name: str, targeted: bool, detect: str) -> None:
    """No warning/error finding from nonfinite, nonfinite_modules or stale_grad; .grad bitwise as untraced."""
    program = PROGRAMS[name]
    torch.manual_seed(1)
    x = torch.randn(3, 4)
    plain = _model()
    program(plain, x.clone())
    model = _model()
    with gradprobe.trace(*([model] if targeted else []), detect=detect, on_finding="record") as t:  # type: ignore[arg-type]
        program(model, x.clone())
    mine = [f for f in t.findings if f.plugin in MINE and f.severity != "info"]
    assert mine == [], [f.message for f in mine]
    assert not any(f.code == "GP000" for f in t.findings), [f.message for f in t.findings]
    for (pname, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), pname
    for row in t.breakdown():
        if row.leaf.tensor is not None and any(row.leaf.tensor is p for p in model.parameters()):
            assert row.check is not False, row.leaf.name
