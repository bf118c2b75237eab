"""Entering and leaving a trace: hooks always removed, nothing kept alive, clear errors for misuse."""

from __future__ import annotations

import gc
import io
import weakref

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import gradprobe
from gradprobe import GradProbeWarning, TraceStateError, TraceTargetError
from models import MLP, TinyFPNDetector


def _hooks_left(model: nn.Module) -> list[str]:
    left = []
    for name, p in model.named_parameters():
        if p._backward_hooks:
            left.append(f"{name}: tensor hook")
        if getattr(p, "_post_accumulate_grad_hooks", None):
            left.append(f"{name}: post-accumulate hook")
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            left.append(f"{name}: module hook")
    return left


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [None, Boom, KeyboardInterrupt])
def test_every_hook_is_removed_on_exit(exc: type[BaseException] | None) -> None:
    """Normal exit, an exception and KeyboardInterrupt all leave no hook and no mode behind."""
    model = TinyFPNDetector()
    modes_before = len(_get_current_function_mode_stack())
    with pytest.raises(exc) if exc else _nullcontext():
        with gradprobe.trace(model, detect="all") if _has_detect() else gradprobe.trace(model) as t:
            losses = model.losses(torch.randn(2, 3, 8, 8))
            losses["cls"].backward(retain_graph=True)
            if exc:
                raise exc()
            losses["box"].backward()
    assert _hooks_left(model) == []
    assert len(_get_current_function_mode_stack()) == modes_before
    assert not t.active
    assert t.records  # what was recorded before the exception is kept


def _has_detect() -> bool:
    import inspect

    return "detect" in inspect.signature(gradprobe.trace).parameters


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def test_root_prehooks_are_removed_after_each_call() -> None:
    """The prehook that binds a backward to its record is removed when the call returns."""
    w = torch.randn(3, requires_grad=True)
    loss = (w * 2).sum()
    with gradprobe.trace(w):
        loss.backward(retain_graph=True)
    assert not loss.grad_fn._backward_pre_hooks if hasattr(loss.grad_fn, "_backward_pre_hooks") else True
    hits = []
    loss.grad_fn.register_prehook(lambda g: hits.append(1))
    loss.backward()
    assert hits == [1]


def test_trace_keeps_no_graph_or_tensor_alive() -> None:
    """After exit, the user's graph, activations and (once dropped) parameters can be freed."""
    model = MLP()
    x = torch.randn(4, 8)
    with gradprobe.trace(model, keep="tensors") as t:
        hidden = model.fc1(x)
        loss = model.fc2(torch.relu(hidden)).sum()
        loss.backward(retain_graph=True)
    hidden_ref = weakref.ref(hidden)
    node_ref = weakref.ref(loss)
    weight_ref = weakref.ref(model.fc1.weight)
    del hidden, loss, model
    gc.collect()
    assert hidden_ref() is None
    assert node_ref() is None
    assert weight_ref() is None
    assert t.leaves[0].tensor is None
    assert t.breakdown()  # the numbers survive the tensors


def test_every_leaf_trace_keeps_nothing_alive() -> None:
    """trace() of every leaf holds leaves by weak reference only."""
    w = torch.randn(3, requires_grad=True)
    with gradprobe.trace() as t:
        (w * 2).sum().backward()
    ref = weakref.ref(w)
    del w
    gc.collect()
    assert ref() is None
    assert len(t.leaves) == 1


def test_reentering_a_finished_trace_is_refused() -> None:
    """A trace records one block; entering it again raises a clear TraceStateError."""
    t = gradprobe.trace(MLP())
    with t:
        pass
    with pytest.raises(TraceStateError, match="finished"):
        with t:
            pass
    assert issubclass(TraceStateError, RuntimeError)


def test_entering_an_active_trace_is_refused() -> None:
    t = gradprobe.trace(MLP())
    with t:
        with pytest.raises(TraceStateError, match="already active"):
            t.__enter__()


def test_bad_targets_get_clear_errors() -> None:
    """trace("model"), non-leaf tensors and tensors without grad are refused with the fix."""
    with pytest.raises(TraceTargetError, match=r"cannot trace str 'model'.*nn\.Module"):
        gradprobe.trace("model")
    with pytest.raises(TypeError):
        gradprobe.trace(3.0)
    weights = torch.randn(3)
    with pytest.raises(TraceTargetError, match=r"`weights` does not require grad.*requires_grad_\(\)"):
        gradprobe.trace(weights)
    leaf = torch.randn(3, requires_grad=True)
    doubled = leaf * 2
    with pytest.raises(TraceTargetError, match=r"`doubled` is not a leaf tensor \(made by MulBackward0\).*retain_grad"):
        gradprobe.trace(doubled)
    with pytest.raises(ValueError, match="keep"):
        gradprobe.trace(leaf, keep="all")
    with pytest.raises(ValueError, match="on_finding"):
        gradprobe.trace(leaf, on_finding="explode")


def test_module_without_trainable_parameters_warns() -> None:
    """A frozen module is not silently ignored."""
    frozen = MLP().requires_grad_(False)
    with pytest.warns(GradProbeWarning, match="no parameters that require grad"):
        gradprobe.trace(frozen, nn.CrossEntropyLoss())


def test_parameters_generator_is_named_from_the_frame() -> None:
    """trace(model.parameters()) names parameters by the module found in the caller's frame."""
    model = MLP()
    t = gradprobe.trace(model.parameters())
    assert [leaf.name for leaf in t.leaves][:2] == ["model.fc1.weight", "model.fc1.bias"]


def test_two_modules_get_prefixed_names() -> None:
    """With several modules, parameter names carry the variable name of their module."""
    encoder, head = MLP(), nn.Linear(4, 2)
    t = gradprobe.trace(encoder, head)
    assert [leaf.name for leaf in t.leaves][-2:] == ["head.weight", "head.bias"]
    assert t.leaves[0].name == "encoder.fc1.weight"


def test_report_on_exit_and_rendering() -> None:
    """report=True prints the calls table and the breakdown with names, shares and checks."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=100)
    model = MLP()
    with gradprobe.trace(model, report=True, console=console):
        out = model(torch.randn(3, 8))
        loss_main = out.pow(2).mean()
        loss_aux = out.abs().mean()
        loss_main.backward(retain_graph=True)
        loss_aux.backward()
    text = buffer.getvalue()
    assert "2 backward calls" in text
    assert "loss_main" in text and "loss_aux" in text
    assert "fc1.weight" in text and "✓" in text and "%" in text
    assert "test_lifecycle.py" in text
    assert "No findings." in text


def test_trace_is_a_rich_renderable_and_repr() -> None:
    model = MLP()
    with gradprobe.trace(model) as t:
        model(torch.randn(2, 8)).sum().backward()
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(t)
    assert "Gradient breakdown" in buffer.getvalue()
    assert repr(t) == "<gradprobe.Trace done: 1 backward calls, 4 leaves, 0 findings>"


def test_a_locals_dict_the_user_holds_is_left_alone() -> None:
    """Releasing frame snapshots never empties a locals() dict the user (or a debugger) holds."""
    w = torch.randn(3, requires_grad=True)
    mine = locals()
    with gradprobe.trace() as t:
        (w * 2).sum().backward()
    assert "w" in mine and mine["w"] is w
    assert t.leaves[0].name == "w"
