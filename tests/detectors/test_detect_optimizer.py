"""GP801 / GP802 optimizer and GP803 frozen_update: the optimizer and the model disagree; clean twins."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers import codes
from torch import nn

import gradprobe


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno  # type: ignore[union-attr]


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, **options: object) -> gradprobe.Trace:
    with gradprobe.trace(model, on_finding="record", **options) as t:  # type: ignore[arg-type]
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(5, 4)).pow(2).mean().backward()
            opt.step()
    return t


def test_optimizer_built_on_a_model_replaced_since() -> None:
    """`opt` built, then `model = Net()` again: GP801 at the step, naming the line that built `opt`."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    built = _line() - 1
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 4)).pow(2).mean().backward()
            opt.step()
            step = _line() - 1
    (finding,) = [f for f in t.findings if f.code == "GP801"]
    assert finding.severity == "error" and finding.site is not None and finding.site.lineno == step
    assert [r.lineno for r in finding.related] == [built]
    assert "`opt.step()` updates nothing" in finding.message and "`model.0.weight`" in finding.message
    assert codes(t) == ["GP801"]


def test_optimizer_on_a_deep_copy() -> None:
    """The optimizer steps a `copy.deepcopy` of the model that is trained: GP801."""
    model = _net()
    opt = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=0.1)
    assert codes(_train(model, opt)) == ["GP801"]


def test_optimizer_on_the_trained_model_is_clean() -> None:
    """The twin: the optimizer built from the model that is trained."""
    model = _net()
    assert codes(_train(model, torch.optim.SGD(model.parameters(), lr=0.1))) == []


def test_layer_replaced_after_the_optimizer() -> None:
    """`model[2] = nn.Linear(...)` after building the optimizer: its parameters get gradients no step uses (GP802)."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[2] = nn.Linear(8, 2)
    (finding,) = [f for f in _train(model, opt).findings if f.code == "GP802"]
    assert finding.data["leaves"] == ["model.2.weight", "model.2.bias"]


def test_layer_replaced_before_the_optimizer_is_clean() -> None:
    """The twin: the layer replaced first, then the optimizer built."""
    model = _net()
    model[2] = nn.Linear(8, 2)
    assert codes(_train(model, torch.optim.SGD(model.parameters(), lr=0.1))) == []


def test_two_optimizers_together_cover_the_model_is_clean() -> None:
    """A GAN-style pair of optimizers over two halves: no finding."""
    model = _net()
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(3):
            opt_a.zero_grad()
            opt_b.zero_grad()
            model(torch.randn(5, 4)).pow(2).mean().backward()
            opt_a.step()
            opt_b.step()
    assert codes(t) == []


def test_no_optimizer_step_in_the_trace_is_clean() -> None:
    """A trace with backward calls and no optimizer step (a test, a gradient check): nothing to say."""
    model = _net()
    with gradprobe.trace(model, on_finding="record") as t:
        model(torch.randn(5, 4)).sum().backward()
    assert codes(t) == []


def frozen_run(set_to_none: bool, detect: object = "all") -> gradprobe.Trace:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
    model[0].requires_grad_(False)  # freeze the first layer mid-training
    with gradprobe.trace(model, on_finding="record", detect=detect) as t:  # type: ignore[arg-type]
        for _ in range(2):
            opt.zero_grad(set_to_none=set_to_none)
            model(torch.randn(5, 4)).pow(2).mean().backward()
            opt.step()
    return t


def test_frozen_parameters_still_moved_by_momentum() -> None:
    """Frozen with `.grad` still zeros (set_to_none=False): momentum and weight decay move it (GP803)."""
    t = frozen_run(set_to_none=False)
    (finding,) = [f for f in t.findings if f.code == "GP803"]
    assert set(finding.data["leaves"]) == {"model.0.weight", "model.0.bias"}
    assert "p.grad = None" in finding.fix


def test_frozen_parameters_with_grad_none_are_clean() -> None:
    """The twin: zero_grad(set_to_none=True) leaves the frozen parameters alone."""
    assert codes(frozen_run(set_to_none=True)) == []


def test_frozen_update_is_opt_in() -> None:
    """frozen_update is not in the default set (a pass over the optimizer's parameters per step)."""
    assert "GP803" not in codes(frozen_run(set_to_none=False, detect="default"))


def test_step_hooks_come_off_and_raise_policy_stops_at_the_step() -> None:
    """The global optimizer-step hooks are removed on exit; on_finding="raise" raises GP801 from the step."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    model = _net()
    opt = torch.optim.SGD(_net().parameters(), lr=0.1)
    with pytest.raises(gradprobe.GradProbeError, match="GP801"):
        with gradprobe.trace(model, on_finding="raise"):
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
    assert not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks
    opt.step()  # after the trace: nothing of gradprobe's runs


def test_internal_error_in_a_step_callback_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a step callback becomes one GP001 notice (outside strict mode); the step still runs."""
    from gradprobe.detectors.kept_graph import KeptGraph

    def broken(self: object, trace: object, event: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(KeptGraph, "_on_step", broken)
    monkeypatch.setenv("GRADPROBE_STRICT_INTERNAL", "0")
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    t = _train(model, opt)
    assert [f.code for f in t.findings] == ["GP001"] and "kept_graph" in t.findings[0].message
    assert not torch.equal(before, model[0].weight)
