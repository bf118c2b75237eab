"""Item 3 of issue 12: a loss cut from the model, with the line where the graph was cut (GP501/GP502/GP505)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import codes
from torch import nn

import gradprobe


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno  # type: ignore[union-attr]


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def test_prediction_detached_then_forced_to_require_grad() -> None:
    """`pred = model(x).detach(); pred.requires_grad = True`: GP505 (error) at the backward, naming the detach line."""
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        pred = model(torch.randn(5, 4)).detach()
        cut = _line() - 1
        pred.requires_grad = True
        forced = _line() - 1
        loss = F.mse_loss(pred, torch.zeros(5, 1))
        loss.backward()
        call = _line() - 1
    (finding,) = [f for f in t.findings if f.code == "GP505"]
    assert finding.severity == "error" and finding.site is not None and finding.site.lineno == call
    assert [r.lineno for r in finding.related] == [cut, forced]
    assert "`pred`" in finding.message and ".detach()" in finding.message
    assert codes(t) == ["GP505", "GP503"]


def test_prediction_through_numpy() -> None:
    """A prediction through NumPy and back, made to require grad: GP505 names the round trip."""
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        pred = torch.from_numpy(np.asarray(model(torch.randn(5, 4)).detach().numpy()))
        pred.requires_grad_()
        F.mse_loss(pred, torch.zeros(5, 1)).backward()
    (finding,) = [f for f in t.findings if f.code == "GP505"]
    assert "NumPy" in finding.message or ".detach()" in finding.message


def test_prediction_kept_in_the_graph_is_clean() -> None:
    """The twin: the loss computed from the model's output itself."""
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        pred = model(torch.randn(5, 4))
        F.mse_loss(pred, torch.zeros(5, 1)).backward()
    assert codes(t) == []


def test_gradient_with_respect_to_an_input_is_clean() -> None:
    """An adversarial-example step (`x.detach().requires_grad_()`, grad w.r.t. x) reaches the model too: clean."""
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        x = torch.randn(5, 4).detach().requires_grad_()
        loss = model(x).pow(2).mean()
        loss.backward()
        (gx,) = torch.autograd.grad(model(x).sum(), x)
    assert codes(t) == []


def test_other_models_loss_is_not_a_cut() -> None:
    """A backward of a loss of another (untraced) model reaches no traced parameter, but nothing was cut."""
    model, other = _net(), _net()
    with gradprobe.trace(model, on_finding="record") as t:
        model(torch.randn(5, 4)).sum().backward()
        other(torch.randn(5, 4)).sum().backward()
    assert "GP505" not in codes(t)


def test_loss_rebuilt_from_item_with_requires_grad() -> None:
    """`torch.tensor(loss.item(), requires_grad=True)`: GP502 at the backward with the `.item()` line."""
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        out = model(torch.randn(5, 4))
        loss = torch.tensor(out.pow(2).mean().item(), requires_grad=True)
        cut = _line() - 1
        loss.backward()
    (finding,) = [f for f in t.findings if f.code == "GP502"]
    assert ".item()" in finding.message and [r.lineno for r in finding.related][:1] == [cut]


def test_loss_cut_in_a_helper_without_requires_grad() -> None:
    """The loss without a graph raises PyTorch's error; GP501 comes first, with the cut line."""
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        out = model(torch.randn(5, 4))
        loss = out.data.mean()
        cut = _line() - 1
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
    (finding,) = [f for f in t.findings if f.code == "GP501"]
    assert [r.lineno for r in finding.related] == [cut]
