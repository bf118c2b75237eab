"""Graph walks that cannot crash: list-valued, optional and unreadable saved slots, CopySlices, custom nodes."""

from __future__ import annotations

import pytest
import torch
from helpers import codes
from torch import nn

import gradprobe
from gradprobe.capture.graph import iter_nodes, saved_state


@pytest.mark.parametrize("index", ["arange", "list"])
def test_advanced_indexing_freed_graph_is_predicted(index: str) -> None:
    """After `logp[torch.arange(n), y]` / `x[[2, 0, 3]]` is freed: GP101, no GP000, freed_graph stays on."""
    x = torch.rand(5, 3, requires_grad=True)
    with gradprobe.trace(x, on_finding="record") as t:
        if index == "arange":
            logp = x.log_softmax(-1)
            loss = -logp[torch.arange(5), torch.tensor([0, 1, 2, 0, 1])].mean()
        else:
            loss = x[[2, 0, 3]].pow(2).sum()
        loss.backward()
        with pytest.raises(RuntimeError, match="second time"):
            loss.backward()
        assert "freed_graph" in t.plugin_names
    assert codes(t) == ["GP101"]


def test_fact_list_slots_raise_through_raw_once_freed() -> None:
    """PyTorch fact: `IndexBackward0._raw_saved_indices` raises once freed; saved_state says "freed"."""
    x = torch.rand(5, 3, requires_grad=True)
    y = x[[2, 0, 3]]
    assert saved_state(y.grad_fn) == "live"
    y.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.grad_fn._raw_saved_indices
    assert saved_state(y.grad_fn) == "freed"


def test_copyslices_is_walked_without_error() -> None:
    """`h[0].mul_(w)` wraps a node CopySlices does not expose: the walk skips it and never raises."""
    w = torch.rand(3, requires_grad=True)
    v = torch.rand((), requires_grad=True)
    h = w * 2
    h[0].mul_(v)
    assert type(h.grad_fn).__name__ == "CopySlices"
    assert not hasattr(h.grad_fn, "_raw_saved_self")
    assert [saved_state(n) for n in iter_nodes([h.grad_fn])]  # no exception
    with gradprobe.trace(w, v, on_finding="record") as t:
        loss = h.sum()
        loss.backward(retain_graph=True)
        loss.backward()
    assert codes(t) == []


def test_copyslices_freed_graph_predicted_through_reachable_nodes() -> None:
    """A second backward through a graph with CopySlices: predicted through the nodes that are reachable."""
    w = torch.rand(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        h = w.sigmoid() * 1
        h[0].mul_(3.0)
        loss = h.sum()
        loss.backward()
        with pytest.raises(RuntimeError, match="second time"):
            loss.backward()
    assert "GP101" in codes(t) and "GP000" not in codes(t)


class Unreadable:
    """Stands in for an extension node whose saved slots raise something unexpected."""

    next_functions = ()

    @property
    def _raw_saved_self(self):  # type: ignore[no-untyped-def]
        raise TypeError("not a SavedTensor")

    @property
    def _saved_self(self):  # type: ignore[no-untyped-def]
        raise TypeError("not a SavedTensor")


def test_unreadable_slot_is_skipped() -> None:
    """A slot that raises anything but PyTorch's two known errors is skipped: "none", never an exception."""
    assert saved_state(Unreadable()) == "none"


def test_optional_slot_undefined_is_none() -> None:
    """An optional saved tensor that was never defined (layer_norm without weight) is not a live slot."""
    x = torch.rand(2, 4, requires_grad=True)
    y = nn.functional.layer_norm(x, (4,))
    assert saved_state(y.grad_fn) == "live"
    y.sum().backward()
    assert saved_state(y.grad_fn) == "freed"


def test_custom_function_stale_and_hooked() -> None:
    """Custom autograd.Function nodes: stale after an in-place write to what they saved; GP302 names it."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            (x,) = ctx.saved_tensors
            return 2 * g * x

    w = torch.rand(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        h = w * 1
        y = Square.apply(h)
        assert saved_state(y.grad_fn) == "live"
        h.add_(1)
        assert saved_state(y.grad_fn) == "stale"
        with pytest.raises(RuntimeError, match="inplace"):
            y.sum().backward()
    assert codes(t) == ["GP302"] and "add_" in t.findings[0].message
