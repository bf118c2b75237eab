"""inplace_saved: in-place writes to tensors autograd saved for backward."""

from __future__ import annotations

import pytest
import torch
from helpers import codes, problems
from torch import nn

import gradprobe


def traced(*targets, **kw):
    return gradprobe.trace(*targets, detect=["inplace_saved"], on_finding="record", **kw)


def test_relu_inplace_after_sigmoid_is_flagged_at_the_write() -> None:
    """ReLU(inplace=True) after Sigmoid overwrites sigmoid's saved output: GP301 at the write, then the backward raises."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.ReLU(inplace=True))
    with traced(m) as t:
        y = m(torch.rand(2, 3))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    assert codes(t)[0] == "GP301"
    assert "SigmoidBackward0" in t.findings[0].message and t.findings[0].site.filename == __file__


def test_relu_inplace_after_linear_is_clean() -> None:
    """ReLU(inplace=True) after Linear is fine (nothing saved its input): no finding, same gradients."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))
    x = torch.rand(2, 3)
    m(x).sum().backward()
    expected = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with traced(m) as t:
        m(x).sum().backward()
    assert codes(t) == []
    assert all(torch.equal(p.grad, e) for p, e in zip(m.parameters(), expected))


@pytest.mark.parametrize("write", ["iadd", "mask", "method"])
def test_writes_to_saved_tensors(write: str) -> None:
    """`x += 1`, `x[mask] = 0` and `x.mul_(2)` on a saved tensor are caught at the write."""
    w = torch.rand(3, requires_grad=True)
    with traced(w) as t:
        z = w.exp()  # saves its result
        if write == "iadd":
            z += 1
        elif write == "mask":
            z[z > 1.5] = 0
        else:
            z.mul_(2)
        line = z.sum
    (first, *_) = problems(t)
    assert first.code == "GP301" and first.severity == "error"
    del line


def test_unpack_keeps_pytorchs_version_check() -> None:
    """Saved-tensor hooks switch PyTorch's check off; the unpack hook restores it (no silently wrong gradient)."""
    w = torch.rand(3, requires_grad=True)
    with traced(w, disable=[]) as t:
        x = torch.rand(3)
        y = (w * x).sum()
        with torch.no_grad():
            x.add_(1)  # x is saved by the mul (for w's gradient)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
    assert "GP302" in codes(t)
    assert w.grad is None


def test_optimizer_step_between_backwards() -> None:
    """optimizer.step() between two backwards through one graph: GP301 at the step, the backward raises."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with traced(m) as t:
        out = m(torch.rand(2, 3))
        out.pow(2).mean().backward(retain_graph=True)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.abs().mean().backward()
    found = problems(t)
    assert found[0].code == "GP301" and "optimizer" in found[0].message
    assert "GP302" in codes(t)


def test_data_write_is_a_warning() -> None:
    """`w.data.add_()` on a saved tensor: PyTorch never notices; gradprobe warns (GP303)."""
    w = torch.rand(3, requires_grad=True)
    with traced(w) as t:
        y = (w * w).sum()
        w.data.add_(1)
        y.backward()
    assert codes(t) == ["GP303"]


def test_gradients_bitwise_identical_with_hooks() -> None:
    """With the saved-tensor hooks on, gradients equal an untraced run bit for bit."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    x = torch.rand(5, 4)
    m(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with traced(m):
        m(x).pow(2).sum().backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(m.parameters(), expected))


def test_raise_policy_raises_at_the_write() -> None:
    """With on_finding="raise", the in-place write itself raises GradProbeError."""
    w = torch.rand(3, requires_grad=True)
    with pytest.raises(gradprobe.GradProbeError, match="GP301"):
        with gradprobe.trace(w, detect="all", on_finding="raise"):
            z = w.sigmoid()
            z.add_(1)


class WriteLog:
    """Records which functions the interceptor reports as in-place writes."""

    def __init__(self) -> None:
        self.funcs: list[str] = []

    @gradprobe.hookimpl
    def gradprobe_inplace_write(self, trace, tensors, func, site) -> None:
        self.funcs.append(getattr(func, "__name__", str(func)))


def test_interceptor_sees_these_writes() -> None:
    """PyTorch facts this detector rests on: these writes reach the TorchFunctionMode as in-place calls."""
    import torch.nn.functional as F

    log = WriteLog()
    p = nn.Parameter(torch.rand(3))
    p.grad = torch.ones(3)
    with gradprobe.trace(detect=[], plugins=[log]):
        x = torch.rand(3)
        x += 1
        x[x > 1.5] = 0
        torch._foreach_add_([x], [x])
        F.relu(x, inplace=True)
        F.dropout(x, 0.5, True, True)  # `inplace` given by position, as nn.Dropout does
        F.relu(x)  # not a write
        p.data.add_(1)
        torch.optim.SGD([p], lr=0.1, foreach=True).step()
    assert log.funcs[:6] == ["add_", "__setitem__", "_foreach_add_", "relu", "dropout", "add_"]
    assert "_foreach_add_" in log.funcs[6:]


def test_foreach_optimizer_step_on_saved_parameter() -> None:
    """A foreach optimizer step (`_foreach_add_` over the parameters) is caught like a plain one."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, foreach=True)
    with traced(m) as t:
        out = m(torch.rand(2, 3))
        out.sum().backward(retain_graph=True)
        opt.step()
    assert codes(t)[:1] == ["GP301"] and "_foreach_add_" in t.findings[0].message
