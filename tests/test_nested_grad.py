"""torch.autograd.grad nested in a custom Function's backward: no parts of the outer backward, no findings."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gradprobe

pytest_plugins = ["pytester"]


class Product(torch.autograd.Function):
    """``x * w`` whose backward computes its vector-Jacobian product with a nested autograd.grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            gx, gw = torch.autograd.grad(x * w, (x, w), g)
        return gx, gw


class Adjoint(torch.autograd.Function):
    """An adjoint-solver shape: the backward makes many vjps through a module's parameters."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, f: nn.Module, steps: int, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.f, ctx.steps = f, steps
        ctx.save_for_backward(h)
        with torch.no_grad():
            for _ in range(steps):
                h = h + 0.1 * f(h)
        return h

    @staticmethod
    def backward(ctx, a: torch.Tensor) -> tuple[object, ...]:  # type: ignore[override]
        (h,) = ctx.saved_tensors
        params = tuple(ctx.f.parameters())
        total = [torch.zeros_like(p) for p in params]
        for _ in range(ctx.steps):
            with torch.enable_grad():
                hh = h.detach().requires_grad_()
                out = hh + 0.1 * ctx.f(hh)
                ga, *gp = torch.autograd.grad(out, (hh, *params), a)
            a = ga
            total = [t + g for t, g in zip(total, gp)]
        return (a, None, None, *total)


def _product_step(w: torch.Tensor, x: torch.Tensor) -> None:
    y = Product.apply(x, w).sum()
    y.backward()


def _adjoint_step(f: nn.Module, h0: torch.Tensor) -> None:
    z = Adjoint.apply(h0, f, 20, *f.parameters())
    loss = z.pow(2).sum()
    loss.backward()


def test_torch_mode_does_not_see_the_nested_call_and_its_task_is_new() -> None:
    """Torch facts: a TorchFunctionMode misses the nested grad; its hooks run under a task id nobody bound."""
    seen: list[str] = []
    tasks: list[int] = []

    class Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func in (torch.autograd.grad, torch.Tensor.backward, torch.autograd.backward):
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    w = nn.Parameter(torch.randn(3))
    w.register_hook(lambda g: tasks.append(torch._C._current_graph_task_id()))
    with Seen():
        _product_step(w, torch.randn(3))
    assert seen == ["backward"]
    assert len(tasks) == 2 and tasks[0] != tasks[1], "the nested vjp fires w's hook under its own task id"


@pytest.mark.parametrize("keep", ["stats", "tensors"])
@pytest.mark.parametrize("targeted", [True, False], ids=["targets", "every_leaf"])
def test_nested_grad_is_no_part_of_the_outer_backward(keep: str, targeted: bool) -> None:
    """One record, one part per leaf, parts add up to .grad (Σ ✓), no NaN statistics, no finding."""
    x = torch.randn(3)
    plain = nn.Parameter(torch.ones(3))
    _product_step(plain, x)
    w = nn.Parameter(torch.ones(3))
    with gradprobe.trace(*([w] if targeted else []), keep=keep, on_finding="record") as t:  # type: ignore[arg-type]
        _product_step(w, x)
    assert [r.name for r in t.records] == ["y"]
    assert [f for f in t.findings if f.severity != "info"] == []
    (row,) = [r for r in t.breakdown() if r.leaf.name == "w"]
    assert row.check is True and [p.record for p in row.parts] == [0]
    assert all(p.finite for p in row.parts)
    assert torch.equal(w.grad, plain.grad)
    if keep == "tensors":
        assert torch.equal(row.parts[0].tensor, w.grad)


@pytest.mark.parametrize("keep", ["stats", "tensors"])
@pytest.mark.parametrize("targeted", [True, False], ids=["targets", "every_leaf"])
def test_adjoint_solver_many_vjps(keep: str, targeted: bool) -> None:
    """20 nested vjps per backward over two steps: two records, one part per (record, parameter), no finding."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    f = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    f.load_state_dict(ref.state_dict())
    h0 = torch.randn(2, 4)
    for _ in range(2):
        ref.zero_grad()
        _adjoint_step(ref, h0)
    with gradprobe.trace(*([f] if targeted else []), keep=keep, on_finding="record") as t:  # type: ignore[arg-type]
        for _ in range(2):
            f.zero_grad()
            _adjoint_step(f, h0)
        assert t._recorder._by_task == {} and t._recorder._ignored == {}, "nothing kept after each backward"
    assert [r.name for r in t.records] == ["loss", "loss"]
    assert [f for f in t.findings if f.severity != "info"] == []
    rows = {row.leaf.name.rsplit(".", 2)[-2] + "." + row.leaf.name.rsplit(".", 1)[-1]: row for row in t.breakdown()}
    for name, p in f.named_parameters():
        row = rows[name]
        assert row.check is True, name
        assert [part.record for part in row.parts] == [0, 1], name
        assert all(part.finite for part in row.parts), name
        assert torch.equal(p.grad, dict(ref.named_parameters())[name].grad), name


def test_nested_reentrant_backward_still_counts() -> None:
    """A backward nested in a Function (a reentrant checkpoint) still adds its part to the outer record."""
    from torch.utils.checkpoint import checkpoint

    lin = nn.Linear(3, 3)
    with gradprobe.trace(lin, keep="tensors", on_finding="record") as t:
        loss = checkpoint(lin, torch.randn(2, 3, requires_grad=True), use_reentrant=True).sum()
        loss.backward()
    assert [r.name for r in t.records] == ["loss"]
    for row in t.breakdown():
        assert row.check is True and [p.record for p in row.parts] == [0]


def test_nested_grad_in_a_backward_on_another_thread() -> None:
    """An unseen backward on another thread gets its record; its nested vjps add nothing to it."""
    w = nn.Parameter(torch.ones(3))
    with gradprobe.trace(w, keep="tensors", on_finding="record") as t:
        worker = threading.Thread(target=_product_step, args=(w, torch.randn(3)))
        worker.start()
        worker.join()
    assert len(t.records) == 1 and t.records[0].kind == "backward" and not t.records[0].seen
    (row,) = t.breakdown()
    assert row.check is True and len(row.parts) == 1
    assert [f for f in t.findings if f.severity != "info"] == []


def test_gp601_names_each_leaf_once() -> None:
    """A NaN in a leaf with two parts in one backward (inside and outside a reentrant checkpoint): named once."""
    from torch.utils.checkpoint import checkpoint

    w = nn.Parameter(torch.tensor([0.0, 1.0, 2.0]))
    with gradprobe.trace(w, on_finding="record") as t:
        inside = checkpoint(lambda v: (v * w).sqrt(), torch.ones(3, requires_grad=True), use_reentrant=True)
        loss = (inside + w.sqrt()).sum()
        loss.backward()
    (row,) = t.breakdown()
    assert len(row.parts) == 2, "two parts of one record: the premise of the test"
    (finding,) = [f for f in t.findings if f.code == "GP601"]
    assert finding.data["leaves"] == ["w"]
    assert finding.message.count("`w`") == 1


def test_pytest_strict_run_of_a_nested_grad_suite(pytester: pytest.Pytester) -> None:
    """`pytest --gradprobe-strict` over a test whose Function's backward calls autograd.grad: it passes."""
    pytester.makepyfile(
        test_adjoint="""
        import torch

        class Product(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w):
                ctx.save_for_backward(x, w)
                return x * w

            @staticmethod
            def backward(ctx, g):
                x, w = ctx.saved_tensors
                with torch.enable_grad():
                    x = x.detach().requires_grad_()
                    return torch.autograd.grad(x * w, (x, w), g)

        def test_vjp():
            w = torch.nn.Parameter(torch.ones(3))
            for _ in range(3):
                Product.apply(torch.randn(3), w).sum().backward()
        """
    )
    result = pytester.runpytest("--gradprobe-strict", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*GP601*")
