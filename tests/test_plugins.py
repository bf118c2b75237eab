"""The plugin host: order, per-trace instances, disable, entry points, and isolation of failing plugins."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from models import MLP
from rich.console import Console

import gradprobe
from gradprobe.capture import host as _plugins
from gradprobe.capture import plugin_catalog as _catalog
from gradprobe.findings import Finding

HOOKS = [
    "gradprobe_trace_start",
    "gradprobe_before_backward",
    "gradprobe_after_backward",
    "gradprobe_grad_read",
    "gradprobe_inplace_write",
    "gradprobe_trace_end",
    "gradprobe_collect_findings",
    "gradprobe_report_sections",
]


def error_finding(message: str = "planted error") -> Finding:
    return Finding(code="T001", kind="test", severity="error", message=message, plugin="planted")


class Recorder:
    """Appends (its label, hook) to a shared log for every hook."""

    def __init__(self, label: str, log: list[tuple[str, str]]) -> None:
        self.gradprobe_name = label
        self.log = log

    @gradprobe.hookimpl
    def gradprobe_trace_start(self, trace: Any) -> None:
        self.log.append((self.gradprobe_name, "trace_start"))

    @gradprobe.hookimpl
    def gradprobe_after_backward(self, trace: Any, record: Any, error: Any) -> None:
        self.log.append((self.gradprobe_name, "after_backward"))


def step(model: MLP, x: torch.Tensor, read_nonleaf: bool = False) -> None:
    """One training step that exercises every hook: a backward, a non-leaf .grad read, an in-place write."""
    h = model.fc1(x)
    h.retain_grad()
    out = model.fc2(torch.relu(h))
    out = out * 1.0
    out.add_(0.0)  # in-place write, after which the graph is still valid
    out.pow(2).mean().backward()
    if read_nonleaf:
        assert h.grad is not None


@pytest.fixture(autouse=True)
def no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests here see only the built-in and explicit plugins, whatever happens to be installed."""
    monkeypatch.setattr(_catalog, "_entry_point_cache", [])


def test_builtins_are_registered_through_the_manager() -> None:
    """Built-in report sections and detectors are plugins with the names disable= takes."""
    t = gradprobe.trace(MLP(), detect="all")
    assert set(_plugins.BUILTIN_PLUGINS) <= set(t.plugin_names)
    default = set(gradprobe.trace(MLP()).plugin_names)
    assert {"report.calls", "report.breakdown", "report.findings", "freed_graph", "inplace_saved"} <= default
    assert "nonfinite_modules" not in default  # opt-in: trace(detect="all")


def test_hooks_run_builtins_then_installed_then_explicit_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Call order: built-ins, installed plugins, then trace(plugins=[...]) in the order given."""
    log: list[tuple[str, str]] = []
    monkeypatch.setattr(_catalog, "_entry_point_cache", [("installed", Recorder("installed", log), None)])
    model = MLP()
    with gradprobe.trace(model, plugins=[Recorder("first", log), Recorder("second", log)]):
        model(torch.randn(3, 8)).sum().backward()
    assert log == [
        ("installed", "trace_start"),
        ("first", "trace_start"),
        ("second", "trace_start"),
        ("installed", "after_backward"),
        ("first", "after_backward"),
        ("second", "after_backward"),
    ]


def test_tryfirst_is_honoured() -> None:
    """A hookimpl marked tryfirst runs before the others, as in pluggy."""
    log: list[str] = []

    class Late:
        @gradprobe.hookimpl
        def gradprobe_trace_start(self, trace: Any) -> None:
            log.append("late")

    class Early:
        @gradprobe.hookimpl(tryfirst=True)
        def gradprobe_trace_start(self, trace: Any) -> None:
            log.append("early")

    with gradprobe.trace(MLP(), plugins=[Late, Early]):
        pass
    assert log == ["early", "late"]


def test_class_plugin_is_instantiated_per_trace() -> None:
    """A plugin class gets a fresh instance in every trace, so per-trace state never leaks."""
    instances: list[Any] = []

    class Counting:
        def __init__(self) -> None:
            self.calls = 0
            instances.append(self)

        @gradprobe.hookimpl
        def gradprobe_after_backward(self, trace: Any, record: Any, error: Any) -> None:
            self.calls += 1

    model = MLP()
    for _ in range(2):
        model.zero_grad()
        with gradprobe.trace(model, plugins=[Counting]):
            model(torch.randn(3, 8)).sum().backward()
    assert len(instances) == 2 and instances[0] is not instances[1]
    assert [i.calls for i in instances] == [1, 1]
    assert "Counting" in gradprobe.trace(model, plugins=[Counting]).plugin_names


def test_disable_leaves_out_a_builtin() -> None:
    """disable=[name] leaves out a built-in plugin, and the report loses its section."""
    model = MLP()
    with gradprobe.trace(model, disable=["report.breakdown"]) as t:
        model(torch.randn(3, 8)).sum().backward()
    assert "report.breakdown" not in t.plugin_names and "report.calls" in t.plugin_names
    out = io.StringIO()
    t.report(Console(file=out, width=120))
    assert "Gradient breakdown" not in out.getvalue() and "No findings" in out.getvalue()


def test_disable_accepts_a_single_name() -> None:
    """disable="name" means that one plugin, not its letters."""
    assert "report.calls" not in gradprobe.trace(MLP(), disable="report.calls").plugin_names


def test_disable_of_an_unknown_name_is_a_clear_error() -> None:
    """A misspelt name in disable= raises, listing the plugins there are."""
    with pytest.raises(ValueError, match=r"names no plugin called \['nonfinit'\].*report\.calls"):
        gradprobe.trace(MLP(), disable=["nonfinit"])


def test_two_plugins_with_one_name_are_refused() -> None:
    """Two plugins of the same name cannot both be registered (disable= would be ambiguous)."""
    with pytest.raises(ValueError, match="both named 'twin'"):
        gradprobe.trace(MLP(), plugins=[Recorder("twin", []), Recorder("twin", [])])


def test_misspelt_hook_in_an_explicit_plugin_raises() -> None:
    """A hookimpl that is not a gradprobe hook is a mistake reported at trace(), not silently ignored."""

    class Typo:
        @gradprobe.hookimpl
        def gradprobe_colect_findings(self, trace: Any) -> None:
            pass

    with pytest.raises(Exception, match="gradprobe_colect_findings.*not gradprobe hooks"):
        gradprobe.trace(MLP(), plugins=[Typo])


def _raiser(hook: str) -> type:
    """A plugin class that raises in ``hook`` (and watches .grad reads / writes so they are emitted)."""
    argnames = {
        "gradprobe_trace_start": "trace",
        "gradprobe_trace_end": "trace",
        "gradprobe_before_backward": "trace, call",
        "gradprobe_after_backward": "trace, record, error",
        "gradprobe_grad_read": "trace, tensor, site",
        "gradprobe_inplace_write": "trace, tensors, func, site",
        "gradprobe_collect_findings": "trace",
        "gradprobe_report_sections": "trace",
    }[hook]
    namespace: dict[str, Any] = {}
    exec(f"def {hook}(self, {argnames}):\n    raise ZeroDivisionError('bug in {hook}')", namespace)
    return type("Buggy", (), {hook: gradprobe.hookimpl(namespace[hook]), "gradprobe_name": "buggy"})


@pytest.mark.parametrize("hook", HOOKS)
def test_a_raising_plugin_never_breaks_the_step(hook: str) -> None:
    """A plugin raising in any hook: gradients are bitwise those of plain autograd, and a GP000 finding names it."""
    model, x = MLP(), torch.randn(5, 8)
    step(model, x, read_nonleaf=True)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with gradprobe.trace(model, plugins=[_raiser(hook)], on_finding="record") as t:
        step(model, x, read_nonleaf=True)
        step(model, x, read_nonleaf=True)  # the plugin is off by now: no second finding
        model.zero_grad(set_to_none=True)
        step(model, x, read_nonleaf=True)
    t.report(Console(file=io.StringIO(), width=100))
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.grad, e)
    failures = [f for f in t.findings if f.code == "GP000"]
    assert len(failures) == 1, t.findings
    (failure,) = failures
    assert failure.plugin == "buggy" and failure.severity == "warning"
    assert "'buggy' raised ZeroDivisionError: bug in" in failure.message and hook in failure.message
    assert "disable=['buggy']" in failure.fix
    assert "buggy" not in t.plugin_names


def test_a_raising_plugin_does_not_stop_the_others() -> None:
    """The plugins after a failing one still run in the same hook call."""
    log: list[tuple[str, str]] = []
    model = MLP()
    with gradprobe.trace(model, plugins=[_raiser("gradprobe_after_backward"), Recorder("after", log)]):
        model(torch.randn(3, 8)).sum().backward()
    assert ("after", "after_backward") in log


def test_a_plugin_class_that_fails_to_instantiate_is_a_finding() -> None:
    """A plugin whose __init__ raises is left out, with a GP000 finding; the trace runs."""

    class Broken:
        def __init__(self) -> None:
            raise OSError("no config file")

    model = MLP()
    with gradprobe.trace(model, plugins=[Broken], on_finding="record") as t:
        model(torch.randn(3, 8)).sum().backward()
    assert [(f.code, f.plugin) for f in t.findings] == [("GP000", "Broken")]
    assert "OSError: no config file" in t.findings[0].message


def test_gradprobe_error_from_emit_passes_through() -> None:
    """A plugin's error finding under on_finding="raise" stops the step before the backward runs."""

    class Stopper:
        @gradprobe.hookimpl
        def gradprobe_before_backward(self, trace: Any, call: Any) -> None:
            trace.emit(error_finding("stop here"))

    model = MLP()
    with pytest.raises(gradprobe.GradProbeError, match="stop here") as info:
        with gradprobe.trace(model, plugins=[Stopper], on_finding="raise"):
            model(torch.randn(3, 8)).sum().backward()
    assert info.value.finding is not None and info.value.finding.code == "T001"
    assert all(p.grad is None for p in model.parameters())  # raised before PyTorch ran the backward


def test_emit_under_record_only_records() -> None:
    """The same plugin under on_finding="record" lets the step run and keeps the finding."""

    class Stopper:
        @gradprobe.hookimpl
        def gradprobe_before_backward(self, trace: Any, call: Any) -> None:
            trace.emit(error_finding())

    model = MLP()
    with gradprobe.trace(model, plugins=[Stopper], on_finding="record") as t:
        model(torch.randn(3, 8)).sum().backward()
    assert [f.code for f in t.findings] == ["T001"]
    assert all(p.grad is not None for p in model.parameters())


def test_installed_plugin_that_fails_to_load_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken installed package is reported in every trace, never raised; disable= silences it."""

    class Fake:
        name, group, value = "broken", "gradprobe", "nowhere:Plugin"

        def load(self) -> Any:
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(_catalog.importlib.metadata, "entry_points", lambda group: [Fake()])
    assert gradprobe.refresh_plugins() == ["broken"]
    with gradprobe.trace(MLP(), on_finding="record") as t:
        pass
    assert [(f.code, f.plugin) for f in t.findings] == [("GP000", "broken")]
    assert "could not be loaded from 'nowhere:Plugin'" in t.findings[0].message
    with gradprobe.trace(MLP(), on_finding="record", disable=["broken"]) as quiet:
        pass
    assert quiet.findings == []


def test_entry_points_are_read_once_until_refreshed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry points are discovered once per process; refresh_plugins() looks again."""
    calls: list[str] = []

    def entry_points(group: str) -> list[Any]:
        calls.append(group)
        return []

    monkeypatch.setattr(_catalog.importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(_catalog, "_entry_point_cache", None)
    for _ in range(3):
        gradprobe.trace(MLP())
    assert calls == ["gradprobe"]
    assert gradprobe.refresh_plugins() == []
    gradprobe.trace(MLP())
    assert calls == ["gradprobe", "gradprobe"]


def test_report_section_plugin_appears_in_the_report() -> None:
    """A plugin's report section is rendered after the built-in ones."""

    class Section:
        @gradprobe.hookimpl
        def gradprobe_report_sections(self, trace: Any) -> list[str]:
            return [f"custom section: {len(trace.records)} calls"]

    model = MLP()
    with gradprobe.trace(model, plugins=[Section]) as t:
        model(torch.randn(3, 8)).sum().backward()
    out = io.StringIO()
    t.report(Console(file=out, width=120))
    text = out.getvalue()
    assert "custom section: 1 calls" in text and text.index("No findings") < text.index("custom section")


def _break_builtin(monkeypatch: pytest.MonkeyPatch, strict: bool) -> None:
    """Make the built-in stale_grad detector raise in every after_backward; strict or lenient mode."""
    from gradprobe.capture.failures import STRICT_ENV
    from gradprobe.detectors.stale_grad import StaleGrad

    @gradprobe.hookimpl
    def gradprobe_after_backward(self: Any, trace: Any, record: Any, error: Any) -> None:
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(StaleGrad, "gradprobe_after_backward", gradprobe_after_backward)
    if strict:
        monkeypatch.setenv(STRICT_ENV, "1")
    else:
        monkeypatch.delenv(STRICT_ENV, raising=False)


def test_a_raising_builtin_is_one_internal_error_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A built-in that raises: one GP001 warning asking for a report, gradients unchanged, the others run."""
    _break_builtin(monkeypatch, strict=False)
    model, x = MLP(), torch.randn(5, 8)
    step(model, x)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with pytest.warns(gradprobe.GradProbeWarning) as caught:
        with gradprobe.trace(model) as t:
            step(model, x)
            step(model, x)  # stale_grad is off by now: no second notice
            model.zero_grad(set_to_none=True)
            step(model, x)
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.grad, e)
    notices = [f for f in t.findings if f.code == "GP001"]
    assert [(f.plugin, f.severity, f.kind) for f in notices] == [("stale_grad", "warning", "internal_error")]
    message = notices[0].message
    assert "internal error in gradprobe's stale_grad detector (ZeroDivisionError: planted bug at " in message
    assert "test_plugins.py" in message and "gradprobe_after_backward" in message
    assert "the gradprobe issue tracker" in message and "gradients are unchanged" in message
    assert not [f for f in t.findings if f.code == "GP000"]
    assert sum("GP001" in str(w.message) for w in caught) == 1
    assert "stale_grad" not in t.plugin_names and "unreached" in t.plugin_names


def test_a_raising_builtin_is_only_recorded_under_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """on_finding="record" keeps the GP001 notice in t.findings (and the report) without a warning."""
    import warnings

    _break_builtin(monkeypatch, strict=False)
    model = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradprobe.trace(model, on_finding="record") as t:
            step(model, torch.randn(5, 8))
    assert [f.code for f in t.findings] == ["GP001"]
    buffer = io.StringIO()
    t.report(Console(file=buffer, width=200))
    assert "GP001" in buffer.getvalue()


def test_a_raising_builtin_fails_gradprobes_own_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under GRADPROBE_STRICT_INTERNAL=1 (the test suite's setting) the built-in's error is re-raised, hooks off."""
    from test_lifecycle import _hooks_left

    _break_builtin(monkeypatch, strict=True)
    model = MLP()
    with pytest.raises(ZeroDivisionError, match="planted bug"):
        with gradprobe.trace(model) as t:
            step(model, torch.randn(5, 8))
    assert not t.active and _hooks_left(model) == []
    assert torch._C._len_torch_function_stack() == 0


def test_the_suite_runs_strict() -> None:
    """tests/conftest.py sets GRADPROBE_STRICT_INTERNAL=1 for the whole suite and its subprocesses."""
    from gradprobe.capture.failures import strict_internal

    assert strict_internal()


def test_third_party_plugins_stay_lenient_under_strict() -> None:
    """The strict switch is about gradprobe's own code: a third-party plugin's error is still a GP000 finding."""
    model = MLP()
    with gradprobe.trace(model, plugins=[_raiser("gradprobe_after_backward")], on_finding="record") as t:
        step(model, torch.randn(5, 8))
    assert [f.code for f in t.findings] == ["GP000"]


def test_a_cached_plugin_set_calls_hooks_in_pluggys_order() -> None:
    """The second trace of a plugin set (built from the cached recipe, no pluggy) calls the hooks of
    fresh instances in exactly the order pluggy gave the first (tryfirst, normal, trylast)."""
    log: list[tuple[int, str]] = []
    instances: list[Any] = []

    def plugin(label: str, **opts: Any) -> type:
        class P:
            gradprobe_name = label

            def __init__(self) -> None:
                instances.append(self)

            @gradprobe.hookimpl(**opts)
            def gradprobe_trace_start(self, trace: Any) -> None:
                log.append((id(self), label))

        return P

    plugins = [plugin("a", trylast=True), plugin("b"), plugin("c", tryfirst=True), plugin("d"), plugin("e", trylast=True)]
    _plugins._RECIPES.clear()
    orders = []
    for _ in range(3):
        log.clear()
        with gradprobe.trace(MLP(), plugins=plugins, detect=()):
            pass
        orders.append([label for _, label in log])
    assert len(_plugins._RECIPES) == 1  # built once, reused by the second and third trace
    assert orders[0] == orders[1] == orders[2]
    assert orders[0][:3] == ["c", "b", "d"] and set(orders[0][3:]) == {"a", "e"}
    assert len(instances) == 15 and len({id(i) for i in instances}) == 15  # fresh instances each trace


def test_a_plugin_instance_is_not_cached_and_a_failed_set_is_tried_afresh() -> None:
    """A set with a plugin *instance* goes through pluggy every time; so does one that failed."""
    _plugins._RECIPES.clear()
    with gradprobe.trace(MLP(), plugins=[Recorder("inst", [])]):
        pass
    assert not _plugins._RECIPES

    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("boom")

    for _ in range(2):
        with gradprobe.trace(MLP(), plugins=[Broken], on_finding="record") as t:
            pass
        assert [f.code for f in t.findings] == ["GP000"]
    assert not _plugins._RECIPES
