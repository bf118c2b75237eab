"""A user's own saved-tensor machinery, opened outside the trace, keeps working exactly as untraced."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import pytest
import torch
import torch.utils.checkpoint
from helpers import codes
from torch import nn

import gradprobe
from gradprobe.capture.graph import iter_nodes


class Counting:
    """A user's saved_tensors_hooks pair that counts its calls (and round-trips through a copy)."""

    def __init__(self) -> None:
        self.packs = 0
        self.unpacks = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.packs += 1
        return t.clone()

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        self.unpacks += 1
        return t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _step(m: nn.Module, x: torch.Tensor, mutate: bool = False) -> set[str]:
    """One step; returns the names of the unpack hooks the forward's saved tensors got."""
    out = m(x)
    hooks = set()
    for node in iter_nodes([out.grad_fn]):
        for name in dir(node):
            if name.startswith("_raw_saved_"):
                raw = getattr(node, name)
                hook = getattr(raw, "unpack_hook", None)
                if hook is not None:
                    hooks.add(hook.__qualname__)
    if mutate:  # allowed under allow_mutation_on_saved_tensors
        h = m[1](m[0](x))
        loss = (h * h).sum()
        h.mul_(2)
        loss.backward()
    out.pow(2).sum().backward()
    return hooks


CONTEXTS: dict[str, Callable[[Counting], Any]] = {
    "saved_tensors_hooks": lambda c: c.hooks(),
    "save_on_cpu": lambda c: torch.autograd.graph.save_on_cpu(),
    "allow_mutation_on_saved_tensors": lambda c: torch.autograd.graph.allow_mutation_on_saved_tensors(),
}


@pytest.mark.parametrize("detect", ["default", "all"])
@pytest.mark.parametrize("name", list(CONTEXTS))
@pytest.mark.parametrize("policy", ["raise", "record"])
def test_user_hooks_opened_outside_the_trace(name: str, policy: str, detect: str) -> None:
    """Gradients bitwise equal to untraced, the user's hooks called as often, no finding."""
    x = torch.rand(3, 4)
    mutate = name == "allow_mutation_on_saved_tensors"
    runs = []
    for traced in (False, True):
        m, counter = _model(), Counting()
        with CONTEXTS[name](counter):
            cm = gradprobe.trace(m, on_finding=policy, detect=detect) if traced else contextlib.nullcontext()
            with cm as t:
                hooks = _step(m, x, mutate)
        runs.append(([p.grad.clone() for p in m.parameters()], counter.packs, counter.unpacks, t, hooks))
    (plain, packs, unpacks, _, hooks), (grads, tpacks, tunpacks, t, thooks) = runs
    assert hooks and thooks == hooks  # the user's hooks, not gradprobe's, hold the saved tensors
    assert all(torch.equal(a, b) for a, b in zip(plain, grads))
    assert (tpacks, tunpacks) == (packs, unpacks)
    if name == "saved_tensors_hooks":
        assert packs > 0 and unpacks > 0
    assert codes(t) == []


@pytest.mark.parametrize("detect", ["default", "all"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_outside_and_inside_the_trace(reentrant: bool, detect: str) -> None:
    """torch.utils.checkpoint: same gradients traced and untraced, no finding."""
    x = torch.rand(3, 4, requires_grad=True)
    results = []
    for traced in (False, True):
        m = _model()
        cm = gradprobe.trace(m, on_finding="raise", detect=detect) if traced else contextlib.nullcontext()
        with cm as t:
            h = torch.utils.checkpoint.checkpoint(m[:4], x, use_reentrant=reentrant)
            m[4](h).pow(2).sum().backward()
        results.append(([p.grad.clone() for p in m.parameters()], t))
    (plain, _), (grads, t) = results
    assert all(torch.equal(a, b) for a, b in zip(plain, grads))
    assert codes(t) == []


@pytest.mark.parametrize("detect", ["default", "all"])
def test_user_hooks_see_the_same_tensors_with_an_inplace_error(detect: str) -> None:
    """A real in-place mistake under the user's hooks: the user's unpack hook decides, as untraced."""
    w = torch.rand(3, requires_grad=True)
    outcomes = []
    for traced in (False, True):
        counter = Counting()
        with counter.hooks():
            cm = gradprobe.trace(w, on_finding="raise", detect=detect) if traced else contextlib.nullcontext()
            with cm:
                z = w.exp()
                z += 1  # the user's pack hook saved a clone: PyTorch sees nothing wrong
                z.sum().backward()
        outcomes.append((w.grad.clone(), counter.packs, counter.unpacks))
        w.grad = None
    assert torch.equal(outcomes[0][0], outcomes[1][0]) and outcomes[0][1:] == outcomes[1][1:]


@pytest.mark.parametrize("detect", ["default", "all"])
def test_trace_opened_inside_a_checkpointed_function(detect: str) -> None:
    """Checkpoint's own saved-tensor hooks are opened outside a trace entered inside the function: untouched."""
    x = torch.rand(3, 4, requires_grad=True)
    grads = []
    for traced in (False, True):
        m = _model()

        def body(inp: torch.Tensor, m: nn.Module = m, traced: bool = traced) -> torch.Tensor:
            cm = gradprobe.trace(m, on_finding="raise", detect=detect) if traced else contextlib.nullcontext()
            with cm:
                return m[:4](inp)

        h = torch.utils.checkpoint.checkpoint(body, x, use_reentrant=False)
        m[4](h).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
