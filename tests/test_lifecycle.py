"""Entering and leaving a trace: hooks always removed, nothing kept alive, clear errors for misuse."""

from __future__ import annotations

import gc
import io
import weakref
from typing import Any

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
            left.append(f"{name}: module hook {[getattr(f, '__qualname__', f) for f in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]}")
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


def _left_installed(model: nn.Module) -> list[str]:
    """Everything gradprobe may install, process-wide, that is still installed (empty when clean)."""
    left = _hooks_left(model)
    if torch._C._len_torch_function_stack():
        left.append("torch-function mode")
    if torch.nn.modules.module._global_forward_hooks:
        left.append("global module forward hook")
    if torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
        left.append("saved-tensor hooks")
    if not torch.is_grad_enabled():
        left.append("grad mode off")
    return left


def _scrub(model: nn.Module) -> None:
    """Take off whatever an interrupt in an unguardable window left (so later iterations start clean)."""
    while torch._C._len_torch_function_stack():
        torch._C._pop_torch_function_stack()
    torch.nn.modules.module._global_forward_hooks.clear()
    while torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
        torch._C._autograd._pop_saved_tensors_default_hooks()
    for p in model.parameters():
        p._backward_hooks = None
        p._post_accumulate_grad_hooks = None
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    torch.set_grad_enabled(True)


# NOTE [the unguardable windows]: Python runs a signal handler at the entry of every function and
# after every call; one that raises at the entry of Trace.__exit__ (before its `try`), inside
# remove_all's own `except` clause, or between a `register_*_hook` call returning and `trace.own`
# taking its handle cannot be cleaned up by pure Python (capture/lifecycle.py). The test accepts a
# leak only when the handler saw the interrupt land exactly there, and counts those.
_WINDOWS = {
    ("__exit__", "lifecycle.py"),
    ("remove_all", "lifecycle.py"),
    ("remove_retrying", "recorder.py"),  # its very entry, before remove_all runs (NOTE [interrupts during cleanup])
    ("own", "lifecycle.py"),
    ("own", "recorder.py"),
    ("gradprobe_trace_start", "test_lifecycle.py"),
}


class _Owner:
    """A plugin installing every kind of hook through trace.own / trace.own_context, removing none itself."""

    gradprobe_name = "owner"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @gradprobe.hookimpl
    def gradprobe_trace_start(self, trace: gradprobe.Trace) -> None:
        with torch._C.DisableTorchFunction():  # gradprobe's own calls skip the interceptor
            trace.own(torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None))
            trace.own(self.model.register_forward_hook(lambda m, a, o: None))
            trace.own_context(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
            for p in self.model.parameters():
                trace.own(p.register_hook(lambda g: None))
                trace.own(p.register_post_accumulate_grad_hook(lambda p: None))

    @gradprobe.hookimpl
    def gradprobe_trace_end(self, trace: gradprobe.Trace) -> None:
        sum(range(2000))  # some time for interrupts to land in the plugins' trace_end


def _interrupt_loop(detect: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 steps, each cut by one KeyboardInterrupt at a different moment; nothing may stay installed."""
    import signal
    import time
    import traceback

    if not hasattr(signal, "setitimer"):
        pytest.skip("needs signal.setitimer")
    # Lenient: an interrupted backward leaves half-made records, which some detectors trip on (GP001
    # notices, printed below); here only what stays installed is checked.
    monkeypatch.delenv("GRADPROBE_STRICT_INTERNAL")
    internal: set[str] = set()
    model = MLP()
    x = torch.randn(4, 8)

    def run() -> None:
        t = gradprobe.trace(model, detect=detect, on_finding="record", plugins=[_Owner(model)])
        try:
            with t:
                model(x).pow(2).mean().backward()
        finally:
            internal.update(f.message.split(";")[0] for f in t.findings if f.code == "GP001")

    run()  # warm-up: the first trace loads the detectors
    times = []
    for _ in range(9):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    duration = sorted(times)[4]
    armed = [False]
    landed: list[tuple[str, str, int]] = []
    stacks: list[list[str]] = []
    current = [0]  # the iteration running

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False  # one interrupt per iteration
            landed.append((frame.f_code.co_name, frame.f_code.co_filename.rsplit("/", 1)[-1], current[0]))
            stacks.append(traceback.format_stack(frame)[-30:])
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, handler)
    interrupted = windows = 0
    seen: set[tuple[str, str]] = set()
    try:
        for i in range(900):  # 300 at least; more while the machine's load made too few land
            if i >= 300 and interrupted > 150:
                break
            delay = max(duration * ((i * 37) % 300) / 300, 1e-6)  # spread over the whole step
            armed[0], current[0] = True, i
            try:
                signal.setitimer(signal.ITIMER_REAL, delay)
                run()
                armed[0] = False
            except KeyboardInterrupt:
                interrupted += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
            armed[0] = False
            left = _left_installed(model)
            if left:
                where = landed[-1] if landed and landed[-1][2] == i else None
                assert where is not None and where[:2] in _WINDOWS, f"iteration {i}: {left} after an interrupt at {where}\n" + "".join(stacks[-1])
                windows += 1
                seen.add(where[:2])
                _scrub(model)
            model.zero_grad(set_to_none=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if _left_installed(model):
            _scrub(model)  # a failing run must not leave hooks to the tests after it
    assert interrupted > 150, f"only {interrupted} iterations were interrupted"
    assert windows <= 15 * i / 300, f"{windows} interrupts fell in the unguardable windows"  # 0-4 seen in 300
    run()  # and the next trace works
    assert _left_installed(model) == []
    print(f"\n{detect}: {interrupted}/300 interrupted, {windows} in unguardable windows {sorted(seen)}; GP001: {sorted(internal)}")


_UNRAISABLE = "ignore::pytest.PytestUnraisableExceptionWarning"  # interrupts landing in weakref callbacks


@pytest.mark.filterwarnings(_UNRAISABLE)
def test_interrupts_anywhere_leave_nothing_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """KeyboardInterrupts all over enter/forward/backward/exit leave no hook, mode, saved-tensor hook or grad-mode change."""
    _interrupt_loop("default", monkeypatch)


@pytest.mark.filterwarnings(_UNRAISABLE)
def test_interrupts_leave_nothing_installed_with_every_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with detect="all": every detector's global hooks come off too."""
    _interrupt_loop("all", monkeypatch)


@pytest.mark.parametrize("exc", [ZeroDivisionError, KeyboardInterrupt])
def test_owned_hooks_come_off_when_trace_end_raises(exc: type[BaseException]) -> None:
    """Hooks handed to trace.own / own_context come off even when a plugin's trace_end raises (or is interrupted)."""

    class Raiser:
        gradprobe_name = "raiser"

        @gradprobe.hookimpl(tryfirst=True)
        def gradprobe_trace_end(self, trace: gradprobe.Trace) -> None:
            raise exc("in trace_end")

    model = MLP()
    owner = _Owner(model)
    with pytest.raises(KeyboardInterrupt) if exc is KeyboardInterrupt else _nullcontext():
        with gradprobe.trace(model, plugins=[owner, Raiser], on_finding="record"):
            model(torch.randn(2, 8)).sum().backward()
    assert _left_installed(model) == []


def test_owned_context_handle_removes_once() -> None:
    """A plugin may remove an owned context itself; the trace's removal then pops nothing of anyone else's."""
    model = MLP()
    with gradprobe.trace(model) as t:
        handle = t.own_context(torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x))
        handle.remove()
        with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):  # the user's own pair
            model(torch.randn(2, 8)).sum().backward()
            handle.remove()
            assert torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
    assert _left_installed(model) == []


@pytest.mark.parametrize(
    "options",
    [{}, {"detect": "all"}, {"keep": "tensors"}, {"report": True}, {"decompose": True}],
    ids=["default", "detect-all", "keep-tensors", "report", "decompose"],
)
def test_a_dropped_trace_leaves_no_cyclic_garbage(options: dict[str, Any]) -> None:
    """NOTE [no cycles]: a finished trace, its ledger and its plugins are freed by reference counting
    when the user drops it, without waiting for the cyclic garbage collector."""
    model = TinyFPNDetector()
    x = torch.randn(2, 3, 16, 16)

    def one_step() -> weakref.ref[Any]:
        with gradprobe.trace(model, on_finding="record", console=Console(file=io.StringIO()), **options) as t:
            losses = model.losses(x)
            losses["cls"].backward(retain_graph=True)
            losses["box"].backward()
        t.breakdown()
        t.findings  # noqa: B018
        return weakref.ref(t)

    one_step()  # first trace of this plugin set: pluggy registers it once per process
    was = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        ref = one_step()
        assert ref() is None  # freed at once, by reference counting
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        garbage = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("gradprobe")]
        assert not garbage, f"{found} objects in reference cycles, gradprobe's: {garbage}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()


def test_hook_entries_leave_the_users_hooks_and_order_alone() -> None:
    """NOTE [hook entries]: gradprobe's entries sit between the user's hooks in registration order,
    the user's handles keep working, and exit leaves exactly the user's hooks."""
    w = nn.Parameter(torch.randn(3))
    calls: list[str] = []
    before = w.register_hook(lambda g: calls.append("before"))
    post_before = w.register_post_accumulate_grad_hook(lambda p: calls.append("post-before"))
    with gradprobe.trace(w) as t:
        after = w.register_hook(lambda g: calls.append("after"))
        (w * 2).sum().backward()
        assert len(w._backward_hooks) == 3 and len(w._post_accumulate_grad_hooks) == 2
    assert calls == ["before", "after", "post-before"] and t.breakdown()[0].check is True
    assert len(w._backward_hooks) == 2 and len(w._post_accumulate_grad_hooks) == 1
    for handle in (before, after, post_before):
        handle.remove()
    assert not w._backward_hooks and not w._post_accumulate_grad_hooks


def test_a_tensor_subclass_gets_its_hooks_through_the_public_api() -> None:
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(4).as_subclass(Tagged).requires_grad_()
    with gradprobe.trace(x) as t:
        (x * 3).sum().backward()
    assert t.breakdown()[0].parts[0].norm == pytest.approx(6.0)
    assert not x._backward_hooks and not x._post_accumulate_grad_hooks
