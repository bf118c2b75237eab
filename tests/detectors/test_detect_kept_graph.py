"""GP111 kept_graph: tensors with a grad_fn carried across optimizer steps; each case has a clean twin."""

from __future__ import annotations

import inspect

import torch
from helpers import codes
from torch import nn

import gradprobe


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno  # type: ignore[union-attr]


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def _gp111(t: gradprobe.Trace) -> list[gradprobe.Finding]:
    return [f for f in t.findings if f.code == "GP111"]


def test_running_total_after_step() -> None:
    """`total_loss += loss` after the step: GP111 at that line, nodes per step, fix `loss.item()`."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        total_loss = 0
        for _ in range(4):
            opt.zero_grad()
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            total_loss += loss
            line = _line() - 1
    (finding,) = _gp111(t)
    assert finding.site is not None and finding.site.lineno == line
    assert "`total_loss`" in finding.message and finding.data["nodes_per_step"] > 0
    assert "total_loss += loss.item()" in finding.fix
    assert codes(t) == ["GP111"]


def test_running_total_of_numbers_is_clean() -> None:
    """The twin: `total_loss += loss.item()` keeps no graph."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        total_loss = 0.0
        for _ in range(4):
            opt.zero_grad()
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            total_loss += loss.item()
    assert codes(t) == []


def evaluate(model: nn.Module, batches: int, no_grad: bool, opt: torch.optim.Optimizer) -> None:
    """A training step, then validation batches summed into `val_loss` (with or without no_grad)."""
    val_loss = torch.zeros(())
    for _ in range(batches):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        if no_grad:
            with torch.no_grad():
                val_loss = val_loss + model(torch.randn(64, 8)).abs().mean()
        else:
            val_loss = val_loss + model(torch.randn(64, 8)).abs().mean()


def test_validation_sum_with_grad_holds_activations() -> None:
    """`val_loss = val_loss + ...` without no_grad: the graphs were never backwarded, so their saved bytes count."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        evaluate(model, 4, no_grad=False, opt=opt)
    (finding,) = _gp111(t)
    assert finding.data["bytes"] > 0 and finding.data["bytes_per_step"] >= 64 * 16 * 4
    assert "`val_loss`" in finding.message and "KB" in finding.message
    assert finding.site is not None and "val_loss = val_loss +" in finding.site.source


def test_validation_sum_under_no_grad_is_clean() -> None:
    """The twin: the same loop under torch.no_grad() carries no graph."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        evaluate(model, 4, no_grad=True, opt=opt)
    assert codes(t) == []


def test_list_of_losses_for_logging() -> None:
    """`losses.append(loss)` for logging: GP111 at the append line, fix `.item()`."""
    model, opt = _model()
    history: dict[str, list[torch.Tensor]] = {"loss": []}
    with gradprobe.trace(model, on_finding="record") as t:
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            losses.append(loss)
            line = _line() - 1
            history["loss"].append(loss)
            opt.step()
    found = {f.data["name"]: f for f in _gp111(t)}
    assert set(found) == {"losses", "history['loss']"}
    assert found["losses"].site is not None and found["losses"].site.lineno == line
    assert "losses.append(loss.item())" in found["losses"].fix


def test_list_of_detached_losses_is_clean() -> None:
    """The twin: appending `loss.detach()` / `loss.item()` keeps no graph."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        losses, numbers = [], []
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            losses.append(loss.detach())
            numbers.append(loss.item())
            opt.step()
    assert codes(t) == []


def test_exponential_average_of_the_loss() -> None:
    """`ema = 0.9 * ema + 0.1 * loss` chains two nodes a step: still found."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        ema = torch.zeros(())
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            ema = 0.9 * ema + 0.1 * loss
    assert [f.data["name"] for f in _gp111(t)] == ["ema"]


def test_one_finding_per_name_and_no_references_kept() -> None:
    """Said once however long the loop; the detector holds no tensor of the user's after the trace."""
    import gc
    import weakref

    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        total = 0
        for _ in range(6):
            opt.zero_grad()
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            total += loss
    assert len(_gp111(t)) == 1
    ref = weakref.ref(total)
    del total, loss
    gc.collect()
    assert ref() is None


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    """A helper that steps and returns the loss (with its graph)."""
    opt.zero_grad()
    loss = model(torch.randn(16, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    return loss


def test_running_total_in_the_caller_of_the_step() -> None:
    """The step happens in a helper, the running total in its caller: still found, at the caller's line."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        epoch_loss = 0
        for _ in range(4):
            epoch_loss += train_step(model, opt)
            line = _line() - 1
    (finding,) = _gp111(t)
    assert finding.data["name"] == "epoch_loss" and finding.site is not None and finding.site.lineno == line


def test_returned_loss_summed_as_number_is_clean() -> None:
    """The twin: `epoch_loss += train_step(...).item()`."""
    model, opt = _model()
    with gradprobe.trace(model, on_finding="record") as t:
        epoch_loss = 0.0
        for _ in range(4):
            epoch_loss += train_step(model, opt).item()
    assert codes(t) == []
