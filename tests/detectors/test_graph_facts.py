"""PyTorch facts the freed-graph walk rests on (private APIs: keep these as regression tests)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.capture.graph import iter_nodes, saved_slots, saved_state


def test_walk_never_runs_unpack_hooks() -> None:
    """Asking a node about its saved tensors runs no saved-tensor unpack hook, before or after the free."""
    unpacked = []
    a = torch.rand(3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: unpacked.append(1) or t):
        y = (a.sigmoid() * a).sum()
    states = [saved_state(n) for n in iter_nodes([y.grad_fn])]
    assert "live" in states and unpacked == []
    y.backward()
    assert unpacked  # the backward itself unpacked
    unpacked.clear()
    states = [saved_state(n) for n in iter_nodes([y.grad_fn])]
    assert "freed" in states and unpacked == []


def test_saved_slots_are_cached_per_type() -> None:
    """MulBackward0 has `self` and `other` slots; AddBackward0 has none that hold tensors."""
    a = torch.rand(3, requires_grad=True)
    assert saved_slots((a * a).grad_fn) == ("other", "self")
    assert saved_slots((a + a).grad_fn) == ()


def test_custom_function_nodes() -> None:
    """A custom autograd.Function that saved a tensor reads as live, then "maybe freed" (its backward decides)."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            (x,) = ctx.saved_tensors
            return g * 2

    a = torch.rand(3, requires_grad=True)
    y = Double.apply(a)
    assert saved_state(y.grad_fn) == "live"
    y.sum().backward()
    assert saved_state(y.grad_fn) == "maybe_freed"
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()


def test_released_custom_function_that_saved_nothing_runs_again() -> None:
    """A custom Function that saved nothing also reads "maybe freed" after a backward, yet runs again.

    This is why a released custom node alone never makes gradprobe predict GP101.
    """

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            return g * 2

    a = torch.rand(3, requires_grad=True)
    y = Scale.apply(a)
    y.sum().backward()
    assert saved_state(y.grad_fn) == "maybe_freed"
    y.sum().backward()
    a.grad = None
    with gradprobe.trace(on_finding="raise"):
        z = Scale.apply(a)
        z.sum().backward()
        z.sum().backward()  # no GP101: PyTorch runs it


def test_no_references_to_the_graph_after_exit() -> None:
    """With every detector on, the user's tensors are collectable once the trace exits."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 1))
    with gradprobe.trace(m, detect="all", on_finding="record"):
        hidden = m[1](m[0](torch.rand(2, 3)))
        loss = m[2](hidden).sum()
        loss.backward(retain_graph=True)
        ref = weakref.ref(hidden)
    del hidden, loss
    gc.collect()
    assert ref() is None
