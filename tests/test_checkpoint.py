"""torch.utils.checkpoint: recomputation during backward adds no records and no second parts."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import gradprobe
from gradprobe.capture.checkpoint import checkpoint_leaves


class Checkpointed(nn.Module):
    """A stem, a checkpointed block and two heads (two losses, two backward calls)."""

    def __init__(self, reentrant: bool, how: str = "module") -> None:
        super().__init__()
        self.reentrant, self.how = reentrant, how
        self.stem = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head_a, self.head_b = nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.stem(x))
        if self.how == "module":
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        elif self.how == "lambda":
            h = checkpoint(lambda z: self.block(z), h, use_reentrant=self.reentrant)
        elif self.how == "partial":
            h = checkpoint(functools.partial(self.block.forward), h, use_reentrant=self.reentrant)
        else:
            h = checkpoint_sequential(self.block, 2, h, use_reentrant=self.reentrant)
        return self.head_a(h).pow(2).mean(), self.head_b(h).sin().mean()


def _step(model: nn.Module, x: torch.Tensor) -> None:
    loss_a, loss_b = model(x)
    loss_a.backward(retain_graph=True)
    loss_b.backward()


def _fresh(reentrant: bool, how: str = "module") -> Checkpointed:
    torch.manual_seed(0)
    return Checkpointed(reentrant, how)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("every_leaf", [False, True], ids=["targets", "every_leaf"])
def test_parts_sum_exactly_and_match_untraced(reentrant: bool, every_leaf: bool) -> None:
    """Two records, one part per (call, leaf), parts sum to .grad bitwise, .grad equals an untraced run."""
    x = torch.randn(6, 4)
    plain = _fresh(reentrant)
    _step(plain, x)
    model = _fresh(reentrant)
    with gradprobe.trace(*(() if every_leaf else (model,)), keep="tensors", on_finding="record") as t:
        _step(model, x)
    assert [r.name for r in t.records] == ["loss_a", "loss_b"]
    rows = {row.leaf.name.removeprefix("model."): row for row in t.breakdown()}  # one name either way
    names = [n for n, p in model.named_parameters()]
    assert sorted(rows) == sorted(names), "every parameter, including those inside the checkpoint, is recorded"
    for name, p_plain in plain.named_parameters():
        row = rows[name]
        assert row.check is True, name
        expected_calls = [1] if name.startswith("head_b") else [0] if name.startswith("head_a") else [0, 1]
        assert [part.record for part in row.parts] == expected_calls, name
        assert torch.equal(dict(model.named_parameters())[name].grad, p_plain.grad), name


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_parts_equal_each_loss_alone(reentrant: bool) -> None:
    """The part recorded for loss_a is what loss_a alone gives (PyTorch as the oracle)."""
    x = torch.randn(6, 4)
    oracle = _fresh(reentrant)
    loss_a, _ = oracle(x)
    loss_a.backward()
    model = _fresh(reentrant)
    with gradprobe.trace(model, keep="tensors", on_finding="record") as t:
        _step(model, x)
    for row in t.breakdown():
        alone = dict(oracle.named_parameters())[row.leaf.name.removeprefix("model.")].grad
        part = row.part(0)
        if alone is None:
            assert part is None
        else:
            assert torch.allclose(part.tensor, alone, rtol=0, atol=1e-7), row.leaf.name


@pytest.mark.parametrize("how", ["lambda", "partial", "sequential"])
def test_every_leaf_finds_parameters_behind_reentrant_callables(how: str) -> None:
    """Every-leaf discovery sees the block's parameters through lambdas, partials and checkpoint_sequential."""
    model = _fresh(True, how)
    with gradprobe.trace(on_finding="record") as t:
        _step(model, torch.randn(6, 4))
    found = {leaf.name.split(".", 1)[-1] for leaf in t.leaves}
    assert {n for n, _ in model.block.named_parameters(prefix="block")} <= found


def test_checkpoint_leaves_ignores_other_nodes() -> None:
    """checkpoint_leaves returns None for a node that is not a reentrant checkpoint."""
    w = torch.ones(2, requires_grad=True)
    assert checkpoint_leaves((w * 2).sum().grad_fn) is None


def test_no_hooks_left_after_checkpointed_trace() -> None:
    """After the trace, the parameters carry no gradprobe hooks."""
    model = _fresh(True)
    with gradprobe.trace(model, on_finding="record"):
        _step(model, torch.randn(6, 4))
    for p in model.parameters():
        assert not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None)
