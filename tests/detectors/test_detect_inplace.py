"""inplace_saved: a backward through a tensor written in place after autograd saved it (GP302)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from helpers import codes, problems
from torch import nn

import gradprobe


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno  # type: ignore[union-attr]


def test_on_by_default() -> None:
    """The in-place detector is part of the default set."""
    assert "inplace_saved" in gradprobe.trace().plugin_names


@pytest.mark.parametrize("detect", ["default", "all"])
def test_write_never_backwarded_through_is_fine(detect: str) -> None:
    """`logged = h.pow(2); h.mul_(.5); h.sum().backward()` works in PyTorch: no finding, no error."""
    w = torch.rand(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="raise", detect=detect) as t:
        h = w * 2
        logged = h.pow(2)  # saves h, but nobody backwards it
        h.mul_(0.5)
        h.sum().backward()
    assert t.findings == [] and torch.equal(w.grad, torch.ones(3))
    del logged


def test_relu_inplace_after_sigmoid_raises_at_the_backward_naming_the_write() -> None:
    """ReLU(inplace=True) overwrites sigmoid's saved output: GradProbeError at the backward, before PyTorch."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.ReLU(inplace=True))
    with pytest.raises(gradprobe.GradProbeError) as info:
        with gradprobe.trace(m, on_finding="raise"):
            y = m(torch.rand(2, 3))
            write = _line() - 1
            y.sum().backward()
    back = write + 2
    finding = info.value.finding
    assert finding.code == "GP302" and finding.site.lineno == back and finding.site.filename == __file__
    assert any(r.lineno == write and "relu" in r.role for r in finding.related)
    assert f":{write}" in finding.message and "SigmoidBackward0" in finding.message
    assert "inplace=False" in finding.fix
    assert all(p.grad is None for p in m.parameters())  # the engine never started


@pytest.mark.parametrize("policy", ["record", "warn"])
def test_pytorchs_error_still_comes_through(policy: str) -> None:
    """Under record / warn the finding is recorded and PyTorch's own RuntimeError follows, unchanged."""
    w = torch.rand(3, requires_grad=True)

    def run() -> None:
        z = w.exp()
        z += 1
        z.sum().backward()

    with pytest.raises(RuntimeError) as plain:
        run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradprobe.trace(w, on_finding=policy) as t:
            with pytest.raises(RuntimeError) as traced:
                run()
    assert type(traced.value) is type(plain.value) and str(traced.value) == str(plain.value)
    assert not isinstance(traced.value, gradprobe.GradProbeError)
    assert codes(t) == ["GP302"] and "`z += 1` (add_)" in t.findings[0].message


@pytest.mark.parametrize(
    ("write", "fix"),
    [
        ("iadd", "`z = z + 1` instead of `z += 1`"),
        ("mask", "`z = z.clone()`, then `z[...] = ...`"),
        ("method", "`z = z.mul(...)` instead of `z.mul_(...)`"),
        ("copy", "`z = src.clone()` instead of `z.copy_(src)`"),
        ("relu", "torch.relu(z)"),
    ],
)
def test_writes_to_saved_tensors_name_the_write_and_a_valid_fix(write: str, fix: str) -> None:
    """`z += 1`, `z[mask] = 0`, `z.mul_(2)`, `z.copy_(...)`, `z.relu_()` on a saved tensor: the line and the fix."""
    w = torch.rand(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        z = w.exp()  # saves its result
        if write == "iadd":
            z += 1
        elif write == "mask":
            z[z > 1.5] = 0
        elif write == "method":
            z.mul_(2)
        elif write == "copy":
            z.copy_(torch.ones(3))
        else:
            z.relu_()
        line = _line() - 1 if write == "relu" else None
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()
    (finding,) = problems(t)
    assert finding.code == "GP302" and finding.severity == "error"
    assert fix in finding.fix, finding.fix
    assert ".iadd(" not in finding.fix and ".setitem(" not in finding.fix and ".copy(" not in finding.fix
    if line is not None:
        assert any(r.lineno == line for r in finding.related)


def test_optimizer_step_between_backwards() -> None:
    """opt.step() between two backwards through one graph: GP302 names the step's line and says reorder."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    with gradprobe.trace(m, on_finding="record") as t:
        out = m(torch.rand(2, 3))
        out.pow(2).mean().backward(retain_graph=True)
        opt.step()
        step = _line() - 1
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.abs().mean().backward()
    (finding,) = problems(t)
    assert finding.code == "GP302" and any(r.lineno == step for r in finding.related)
    assert "optimizer.step()" in finding.fix and "(Adam.step)" in finding.message
    assert "`m.2.weight`" in finding.message or "`m.2.bias`" in finding.message


def test_foreach_optimizer_step_on_saved_parameter() -> None:
    """A foreach optimizer step (`_foreach_add_` over the parameters) is named like a plain one: the step."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, foreach=True)
    with gradprobe.trace(m, on_finding="record") as t:
        out = m(torch.rand(2, 3))
        out.sum().backward(retain_graph=True)
        opt.step()
        with pytest.raises(RuntimeError, match="inplace"):
            out.sum().backward()
    assert codes(t) == ["GP302"] and "(SGD.step)" in t.findings[0].message
    assert "optimizer.step()" in t.findings[0].fix


@pytest.mark.parametrize("detect", ["default", "all"])
def test_clean_multi_task_step_with_optimizer(detect: str) -> None:
    """`la.backward(retain_graph=True); lb.backward(); opt.step()` in a loop: nothing to say."""
    torch.manual_seed(0)
    body, ha, hb = nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 1), nn.Linear(8, 1)
    opt = torch.optim.Adam([*body.parameters(), *ha.parameters(), *hb.parameters()], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradprobe.GradProbeWarning)
        t = _multi_task(body, ha, hb, opt, detect)
    assert codes(t) == []


def _multi_task(body: nn.Module, ha: nn.Module, hb: nn.Module, opt: torch.optim.Optimizer, detect: str) -> gradprobe.Trace:
    with gradprobe.trace(body, ha, hb, on_finding="raise", detect=detect) as t:
        for _ in range(3):
            f = body(torch.rand(3, 4))
            la, lb = ha(f).mean(), hb(f).pow(2).mean()
            la.backward(retain_graph=True)
            lb.backward()
            opt.step()
            opt.zero_grad()
    return t


@pytest.mark.parametrize("detect", ["default", "all"])
def test_gradcheck_inside_a_trace(detect: str) -> None:
    """gradcheck perturbs its inputs in place around graphs it never backwards: no finding, no error."""
    x = torch.rand(4, dtype=torch.double, requires_grad=True)
    with gradprobe.trace(x, on_finding="raise", detect=detect) as t:
        assert torch.autograd.gradcheck(lambda a: (a.sin() * a).sum(), (x,))
        assert torch.autograd.gradgradcheck(lambda a: (a.sin() * a).sum(), (x,))
    assert codes(t) == []


def _leaf_view_write() -> None:
    w = torch.rand(3, requires_grad=True)
    y = (w * w).sum()  # saves w
    w[0].mul_(2)
    y.backward()


def _overlapping_write() -> None:
    a = torch.rand(1, requires_grad=True)
    s = a.exp()  # saves s
    s.expand(3).add_(1)
    s.sum().backward()


@pytest.mark.parametrize("detect", ["default", "all"])
@pytest.mark.parametrize("write", [_leaf_view_write, _overlapping_write])
def test_pytorchs_immediate_errors_pass_untouched(write, detect: str) -> None:  # type: ignore[no-untyped-def]
    """PyTorch's own errors at the write (leaf view, overlapping memory) come through, same type and text."""
    with pytest.raises(Exception) as plain:
        write()
    with pytest.raises(Exception) as traced:
        with gradprobe.trace(on_finding="raise", detect=detect):
            write()
    assert type(traced.value) is type(plain.value) and str(traced.value) == str(plain.value)


def test_write_through_a_view_copyslices() -> None:
    """`h[0].mul_(3.0)` (a CopySlices node) on exp's saved output: GP302 names that line."""
    w = torch.rand(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        h = w.exp()
        h[0].mul_(3.0)
        line = _line() - 1
        with pytest.raises(RuntimeError, match="inplace"):
            h.sum().backward()
    (finding,) = problems(t)
    assert finding.code == "GP302" and any(r.lineno == line for r in finding.related)


def test_gradients_bitwise_identical() -> None:
    """With the detector on, gradients equal an untraced run bit for bit (also with in-place ReLU)."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2), nn.Sigmoid())
    x = torch.rand(5, 4)
    m(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with gradprobe.trace(m, on_finding="raise"):
        m(x).pow(2).sum().backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(m.parameters(), expected))


class WriteLog:
    """Records which functions the interceptor reports as in-place writes."""

    def __init__(self) -> None:
        self.funcs: list[str] = []

    @gradprobe.hookimpl
    def gradprobe_inplace_write(self, trace, tensors, func, site) -> None:  # type: ignore[no-untyped-def]
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
    # an optimizer step is one announced write of its parameters (NOTE [writes inside an optimizer step])
    assert log.funcs[6:] == ["step"]


def test_fact_reading_a_saved_slot_is_pytorchs_version_check() -> None:
    """PyTorch fact: `_saved_<x>` raises the backward's own message after an in-place write; `_raw_` does not."""
    w = torch.rand(3, requires_grad=True)
    h = w * 2
    node = h.pow(2).grad_fn
    h.mul_(0.5)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation.*is at version 1; expected version 0"):
        node._saved_self
    assert node._raw_saved_self.unpack_hook is None and node._raw_saved_self.data._version == 1


def test_writes_are_watched_again_after_an_optimizer_step_that_raised() -> None:
    """NOTE [writes inside an optimizer step]: a step that raises does not leave write watching off."""

    class Failing(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            super().step(closure)
            raise ValueError("boom")

    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = Failing(m.parameters(), lr=0.1)
    with gradprobe.trace(m, on_finding="record") as t:
        m(torch.rand(2, 3)).sum().backward()
        with pytest.raises(ValueError, match="boom"):
            opt.step()
        x = torch.rand(2, 3, requires_grad=True)
        y = x.sigmoid()
        m(torch.rand(2, 3)).sum().backward()  # the next backward turns watching back on
        y.mul_(2)
        write = _line() - 1
        with pytest.raises(RuntimeError, match="inplace"):
            y.sum().backward()
    (finding,) = problems(t)
    assert finding.code == "GP302" and any(r.lineno == write for r in finding.related)
