"""GP713 amp: `.grad` read while still scaled by a GradScaler, with the scale; clean twins."""

from __future__ import annotations

import inspect

import torch
from helpers import codes
from torch import nn

import gradprobe


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno  # type: ignore[union-attr]


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu")


def _loss(model: nn.Module) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(8, 4))
    return out.float().pow(2).mean()


def _function_modes() -> int:
    return torch._C._len_torch_function_stack()


def test_grad_norm_logged_before_unscale() -> None:
    """Logging ‖grad‖ between the scaled backward and unscale_: GP713 at that line, with the scale factor."""
    model, opt, scaler = _setup()
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(_loss(model)).backward()
            norms = [p.grad.norm() for p in model.parameters()]
            line = _line() - 1
            scaler.step(opt)
            scaler.update()
    (finding,) = [f for f in t.findings if f.code == "GP713"]
    assert finding.site is not None and finding.site.lineno == line
    assert "6.55e+04" in finding.message and "unscale_" in finding.fix
    assert codes(t) == ["GP713"]
    assert len(norms) == 4 and _function_modes() == 0


def test_grad_norm_logged_after_unscale_is_clean() -> None:
    """The twin: the same logging after `scaler.unscale_(opt)`; the watch is off again after the step."""
    model, opt, scaler = _setup()
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(_loss(model)).backward()
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            total = sum(p.grad.pow(2).sum() for p in model.parameters())
            scaler.step(opt)
            scaler.update()
            assert _function_modes() == 1  # only the trace's own interceptor between steps
    assert codes(t) == [] and norm is not None and total is not None


def test_foreach_norm_before_unscale() -> None:
    """`torch._foreach_norm(grads)` of the still-scaled gradients is a read too."""
    model, opt, scaler = _setup()
    with gradprobe.trace(model, on_finding="record") as t:
        scaler.scale(_loss(model)).backward()
        torch._foreach_norm([p.grad for p in model.parameters()])
        scaler.step(opt)
        scaler.update()
    assert codes(t) == ["GP713"]


def test_reads_do_not_change_gradients() -> None:
    """With the watch on, `.grad` after the step equals the untraced run bit for bit."""

    def run(traced: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model, opt, scaler = _setup()
        ctx = gradprobe.trace(model, on_finding="record") if traced else torch.enable_grad()
        with ctx:
            scaler.scale(_loss(model)).backward()
            _ = [p.grad.norm() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
