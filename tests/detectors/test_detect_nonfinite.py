"""nonfinite / nonfinite_modules: no hooks left on reused inputs, no trace kept alive, no other thread's backwards."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import torch
from torch import nn

import gradprobe
from gradprobe import Trace


def _hooks(t: torch.Tensor) -> int:
    return len(t._backward_hooks or {})


def _plugin(t: Trace) -> object:
    return t._plugins.get_plugin("nonfinite_modules")


class Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def test_reused_leaf_input_keeps_no_hook_and_step_time_stays_flat() -> None:
    """200 traces over one leaf input: no hook left on it after each, and the last steps are not slower."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(4, 8, requires_grad=True)  # a leaf input reused by every step
    times = []
    for _ in range(200):
        start = time.perf_counter()
        with gradprobe.trace(model, detect="all", on_finding="record") as t:
            for _ in range(2):  # two steps in one trace: still one hook on x, gone at the end
                model.zero_grad()
                x.grad = None
                model(x).sum().backward()
                assert _hooks(x) <= 1
        times.append(time.perf_counter() - start)
        assert _hooks(x) == 0
        assert [f.code for f in t.findings if f.severity != "info"] == []
    first, last = sorted(times[10:40])[15], sorted(times[-30:])[15]  # medians, after warm-up
    assert last < 3 * first, (first, last)


def test_nothing_keeps_the_trace_alive_after_exit() -> None:
    """Graphs the user keeps (with the plugin's tensor hooks) hold the trace only weakly; late hooks record nothing."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(2, 3, requires_grad=True)
    # only this plugin: inplace_saved's pack hooks on the kept graph hold their trace (not this module's)
    with gradprobe.trace(model, detect=["nonfinite_modules"], on_finding="record") as t:
        model(x).sum().backward()
        kept = model(x).sum()  # a graph still alive after the trace, its tensors hooked
    plugin = _plugin(t)
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None
    kept.backward()  # after the trace: the hooks left on the kept graph do nothing
    assert plugin._flags == []  # type: ignore[attr-defined]
    assert not torch.nn.modules.module._global_forward_hooks and _hooks(x) == 0


def test_other_threads_backwards_are_not_recorded() -> None:
    """A second thread's forward/backward (another model) adds no record through NonFiniteModules."""
    mine = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    other = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    started, go = threading.Event(), threading.Event()

    def train_other() -> None:
        started.set()
        go.wait(10)
        for _ in range(20):
            other(torch.randn(2, 3)).sum().backward()

    worker = threading.Thread(target=train_other)
    worker.start()
    started.wait(10)
    with gradprobe.trace(mine, detect="all", on_finding="record") as t:
        go.set()
        loss = mine(torch.randn(2, 3)).sum()
        worker.join()
        loss.backward()
        flags = list(_plugin(t)._flags)  # type: ignore[attr-defined]
    assert [r.name for r in t.records] == ["loss"]
    assert flags and {record.index for record, *_ in flags} == {0}


def test_gp602_still_found_with_a_reused_leaf_input() -> None:
    """A real NaN (sqrt(0)) in a later trace over the same leaf input: GP602 names the module."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 3), Sqrt(), nn.Linear(3, 1))
    x = torch.rand(2, 3, requires_grad=True)
    with torch.no_grad():
        m[2].weight.fill_(0.5)
        m[2].bias.fill_(0.1)
    with gradprobe.trace(m, detect="all", on_finding="record") as clean:
        m(x).sum().backward()
    assert [f.code for f in clean.findings if f.severity != "info"] == []
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.zero_()
    with gradprobe.trace(m, detect="all", on_finding="record") as t:
        loss = m(x).sum()
        loss.backward()
    (finding,) = [f for f in t.findings if f.code == "GP602"]
    assert "`m.3`" in finding.message and "`loss`" in finding.message
    assert _hooks(x) == 0


def test_a_failing_module_hook_never_reaches_the_users_backward(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A bug inside the plugin's tensor hook: the backward and .grad are unaffected, it becomes GP001."""
    from gradprobe.detectors.nonfinite import NonFiniteModules

    monkeypatch.delenv("GRADPROBE_STRICT_INTERNAL")  # what users get (the suite re-raises internal errors)

    def broken(self, trace, roles, grad):  # type: ignore[no-untyped-def]
        raise RuntimeError("planted")

    monkeypatch.setattr(NonFiniteModules, "flag", broken)
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    with gradprobe.trace(m, detect="all", on_finding="record") as t:
        m(torch.rand(2, 3)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert [f.code for f in t.findings if f.plugin == "nonfinite_modules"] == ["GP001"]
