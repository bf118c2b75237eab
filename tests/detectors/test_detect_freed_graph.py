"""freed_graph: the missing-retain_graph mistake, predicted before PyTorch raises."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import codes, problems
from models import Discriminator, Generator
from torch import nn

import gradprobe
from gradprobe.capture.graph import nodes_to_run, saved_state


def test_notebook_warns_at_first_backward_and_predicts_the_second() -> None:
    """`d.backward(); e.backward()`: GP102 at d.backward() names e; GP101 at e.backward() names d's line."""
    a = torch.rand(1, 4, requires_grad=True)
    with gradprobe.trace(a, on_finding="record") as t:
        b = a**2
        c = b * 2
        d = c.mean()
        e = c.sum()
        d.backward()
        line_d = d_line = _line() - 1
        with pytest.raises(RuntimeError, match="second time"):
            e.backward()
        line_e = _line() - 1
    early, late = problems(t)
    assert early.code == "GP102" and early.site.lineno == line_d
    assert "`e`" in early.message and "`c`" in early.message
    assert late.code == "GP101" and late.severity == "error" and late.site.lineno == line_e
    assert f":{line_d}" in late.message and "retain_graph=True" in late.fix
    roles = {r.role.split(" ")[0]: r.lineno for r in late.related}
    assert roles["freed"] == line_d and roles["created"] == line_d - 3  # `c = b * 2`


def test_raise_policy_raises_gradprobe_error_before_pytorch() -> None:
    """With on_finding="raise", the second backward raises GradProbeError at the user's line, not PyTorch's error."""
    a = torch.rand(1, 4, requires_grad=True)
    with pytest.raises(gradprobe.GradProbeError) as info:
        with gradprobe.trace(a, on_finding="raise"):
            c = (a**2) * 2
            d, e = c.mean(), c.sum()
            with pytest.warns(gradprobe.GradProbeWarning, match="will raise"):
                d.backward()
            e.backward()
    assert info.value.finding.code == "GP101"
    assert info.value.finding.site.filename == __file__
    assert a.grad is not None and torch.equal(a.grad, 4 * a.detach() / 4)  # only d's gradient arrived


def test_retain_graph_twin_is_clean() -> None:
    """`d.backward(retain_graph=True); e.backward()` works and gives no finding."""
    a = torch.rand(1, 4, requires_grad=True)
    with gradprobe.trace(a, on_finding="record") as t:
        c = (a**2) * 2
        d, e = c.mean(), c.sum()
        d.backward(retain_graph=True)
        e.backward()
    assert codes(t) == []


def test_path_through_nodes_without_saved_tensors_does_not_fail() -> None:
    """Sharing only AddBackward0 / SumBackward0 nodes: PyTorch does not raise and gradprobe does not predict it."""
    a = torch.rand(3, requires_grad=True)
    with gradprobe.trace(a, on_finding="record") as t:
        s = a + 1
        s.sum().backward()
        (s + 2).sum().backward()
    assert codes(t) == []


def test_multiply_by_python_float_holds_saved_tensors() -> None:
    """`x * 2.0` saves the wrapped scalar: a second backward through it raises, and is predicted."""
    a = torch.rand(3, requires_grad=True)
    s = a * 2.0
    assert saved_state(s.grad_fn) == "live"
    s.sum().backward()
    assert saved_state(s.grad_fn) == "freed"
    with pytest.raises(RuntimeError, match="second time"):
        s.sum().backward()
    assert saved_state((a + 1).grad_fn) == "none"


def test_inputs_prune_the_prediction() -> None:
    """A backward with inputs= only runs the nodes that reach the inputs: a freed branch elsewhere is fine."""
    a = torch.rand(3, requires_grad=True)
    b = torch.rand(3, requires_grad=True)
    with gradprobe.trace(a, b, on_finding="record") as t:
        ea = a.exp()
        ea.sum().backward()  # frees ExpBackward0 of a
        loss = (ea + b.sin()).sum()
        loss.backward(inputs=[b])  # does not run ExpBackward0
        torch.autograd.grad((ea * 1 + b.sin()).sum(), [b])
    assert codes(t) == []
    nodes = nodes_to_run([loss.grad_fn], [b])
    assert all(type(n).__name__ != "ExpBackward0" for n in nodes)


def rnn_steps(detach: bool) -> gradprobe.Trace:
    cell = nn.RNNCell(3, 4)
    opt = torch.optim.SGD(cell.parameters(), lr=0.1)
    with gradprobe.trace(cell, on_finding="record") as t:
        h = torch.zeros(2, 4)
        for _ in range(3):
            if detach:
                h = h.detach()
            h = cell(torch.rand(2, 3), h)
            loss = h.pow(2).mean()
            opt.zero_grad()
            try:
                loss.backward()
            except RuntimeError:
                break
            opt.step()
    return t


def test_rnn_hidden_state_carried_without_detach() -> None:
    """An RNN state carried across iterations: GP101 says to detach `h`, and that a step ran in between."""
    t = rnn_steps(detach=False)
    (finding,) = problems(t)
    assert finding.code == "GP101"
    assert "h = h.detach()" in finding.fix
    assert "optimizer.step()" in finding.fix


def test_rnn_hidden_state_detached_is_clean() -> None:
    """The same loop with `h = h.detach()` gives no finding."""
    assert codes(rnn_steps(detach=True)) == []


def gan_step(detach: bool) -> gradprobe.Trace:
    G, D = Generator(), Discriminator()
    opt_d = torch.optim.SGD(D.parameters(), lr=0.1)
    # no G optimizer in this short program: G's gradients from the D step would be GP802 (optimizer)
    with gradprobe.trace(G, D, on_finding="record", disable=["optimizer"]) as t:
        fake = G(torch.rand(4, 4))
        d_loss = D(torch.rand(4, 6)).mean() - D(fake.detach() if detach else fake).mean()
        d_loss.backward()
        opt_d.step()
        g_loss = -D(fake).mean()
        try:
            g_loss.backward()
        except RuntimeError:
            pass
    return t


def test_gan_discriminator_step_without_detach() -> None:
    """The D step backpropagates into G's graph: the G step's backward is predicted to fail; fix: fake.detach()."""
    (finding,) = problems(gan_step(detach=False))
    assert finding.code == "GP101" and "fake.detach()" in finding.fix


def test_gan_discriminator_step_with_detach_is_clean() -> None:
    """With `D(fake.detach())` in the D step there is no finding."""
    assert codes(gan_step(detach=True)) == []


def test_running_total_of_losses() -> None:
    """`total_loss += loss` keeps each step's graph: warned once at the loss backward, fix says `.item()`."""
    m = nn.Linear(3, 1)
    with gradprobe.trace(m, on_finding="record") as t:
        total_loss = 0
        for _ in range(3):
            loss = m(torch.rand(2, 3)).pow(2).mean()
            total_loss += loss
            loss.backward()
        with pytest.raises(RuntimeError, match="second time"):
            total_loss.backward()
    assert codes(t) == ["GP102", "GP101"]
    assert all("total_loss += loss.item()" in f.fix for f in problems(t))


def test_running_total_of_numbers_is_clean() -> None:
    """`total_loss += loss.item()` gives no finding."""
    m = nn.Linear(3, 1)
    with gradprobe.trace(m, on_finding="record") as t:
        total_loss = 0.0
        for _ in range(3):
            loss = m(torch.rand(2, 3)).pow(2).mean()
            total_loss += loss.item()
            loss.backward()
    assert codes(t) == []


def test_named_root_outside_the_frame_is_warned_about() -> None:
    """A loss named with t.name (not a local of the backward's frame) still gets the early warning."""
    a = torch.rand(3, requires_grad=True)
    with gradprobe.trace(a, on_finding="record") as t:
        c = a.exp()
        holder = {"aux": t.name(c.mean(), "aux")}
        c.sum().backward()
        (finding,) = problems(t)  # during the trace: a warning
        assert finding.code == "GP102" and "`aux`" in finding.message
    (finding,) = t.findings  # `aux` was never backwarded: the prediction did not happen
    assert finding.code == "GP102" and finding.severity == "info" and "`aux`" in finding.message
    del holder


def test_warn_policy_points_at_user_line() -> None:
    """The warning is attributed to the user's file and line, not to torch or gradprobe."""
    a = torch.rand(2, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradprobe.trace(a):
            c = a.exp()
            d, e = c.sum(), c.mean()
            d.backward()
            line = _line() - 1
    (w,) = [w for w in caught if issubclass(w.category, gradprobe.GradProbeWarning)]
    assert w.filename == __file__ and w.lineno == line


def test_disable_switches_it_off() -> None:
    """`disable=["freed_graph"]` leaves the detector out."""
    a = torch.rand(2, requires_grad=True)
    with gradprobe.trace(a, on_finding="record", disable=["freed_graph"]) as t:
        c = a.exp()
        c.sum().backward()
        with pytest.raises(RuntimeError):
            c.mean().backward()
    assert codes(t) == []


def _line() -> int:
    import sys

    return sys._getframe(1).f_lineno
