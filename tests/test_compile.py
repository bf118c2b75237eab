"""torch.compile'd models and torch.func transforms: exact parts where possible, one notice, no crash."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import gradprobe
from gradprobe.hookspecs import hookimpl


class InPlaceNet(nn.Module):
    """Two linear layers with an in-place write between them (what the write watchers look at)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h.mul_(0.5)
        return self.fc2(torch.relu(h))


def _build() -> nn.Module:
    torch.manual_seed(0)
    return InPlaceNet()


def _two_losses(model: Any, x: torch.Tensor) -> None:
    out = model(x)
    loss_a = out[:, 0].pow(2).mean()
    loss_b = out[:, 1].abs().mean()
    loss_a.backward(retain_graph=True)
    loss_b.backward()


class WriteCounter:
    """A plugin that turns on the interceptor's in-place write watching and counts events."""

    gradprobe_name = "test.writes"

    def __init__(self) -> None:
        self.writes = 0

    @hookimpl
    def gradprobe_inplace_write(self, trace: Any, tensors: Any, func: Any, site: Any) -> None:
        self.writes += 1


def _compiled_run(backend: str, plugins: tuple[Any, ...] = ()) -> tuple[nn.Module, gradprobe.Trace, torch.Tensor]:
    torch._dynamo.reset()
    x = torch.randn(5, 4)
    model = _build()
    compiled = torch.compile(model, backend=backend)
    with gradprobe.trace(model, keep="tensors", on_finding="record", plugins=plugins) as t:
        _two_losses(compiled, x)
    return model, t, x


def _assert_exact(model: nn.Module, t: gradprobe.Trace, plain: nn.Module) -> None:
    assert [r.name for r in t.records] == ["loss_a", "loss_b"]
    for row, (_, p), (_, q) in zip(t.breakdown(), model.named_parameters(), plain.named_parameters()):
        assert row.check is True, row.leaf.name
        assert [part.record for part in row.parts] == [0, 1]
        assert torch.equal(p.grad, q.grad), row.leaf.name


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_parts_exact(backend: str) -> None:
    """Leaf hooks fire under torch.compile: parts sum to .grad, .grad equals an untraced compiled run."""
    model, t, x = _compiled_run(backend)
    torch._dynamo.reset()
    plain = _build()
    _two_losses(torch.compile(plain, backend=backend), x)
    _assert_exact(model, t, plain)


def test_compiled_region_turns_off_write_watching_with_one_notice() -> None:
    """Inside compiled code the per-op watchers are off (no graph break, no crash) and GP702 says so once."""
    counter = WriteCounter()
    _, t, _ = _compiled_run("aot_eager", plugins=(counter,))
    assert counter.writes == 0
    assert [f.code for f in t.findings] == ["GP702"]
    eager = WriteCounter()
    model = _build()
    with gradprobe.trace(model, on_finding="record", plugins=(eager,)) as t2:
        _two_losses(model, torch.randn(5, 4))
    assert eager.writes > 0 and not t2.findings


def test_backward_inside_compiled_function() -> None:
    """loss.backward() called inside a compiled function is recorded with its name, once."""
    torch._dynamo.reset()
    model = _build()

    @torch.compile(backend="aot_eager")
    def step(x: torch.Tensor) -> torch.Tensor:
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with gradprobe.trace(model, keep="tensors", on_finding="record") as t:
        step(torch.randn(5, 4))
    assert [r.name for r in t.records] == ["loss"]
    assert all(row.check for row in t.breakdown())


@pytest.mark.slow
def test_inductor_compiled_model_parts_exact() -> None:
    """The default (inductor) backend: parts still sum exactly to .grad (slow: C++ compilation)."""
    model, t, x = _compiled_run("inductor")
    torch._dynamo.reset()
    plain = _build()
    _two_losses(torch.compile(plain), x)
    _assert_exact(model, t, plain)


def test_torch_func_transforms_pass_through_with_one_notice() -> None:
    """grad / vmap over functional_call: results unchanged, no records for them, one GP701 notice."""
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi,)).pow(2).sum()

    expected = grad(loss)(params, x)
    with gradprobe.trace(model, on_finding="record") as t:
        got = grad(loss)(params, x)
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
        model(x).sum().backward()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert per_sample["weight"].shape == (4, 1, 3)
    assert len(t.records) == 1 and t.records[0].kind == "backward"
    assert [f.code for f in t.findings] == ["GP701"]
    assert t.findings[0].site is not None and t.findings[0].site.filename == __file__
