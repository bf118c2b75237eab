"""The plugin manager a trace talks to.

# NOTE [one manager per trace]
# Each Trace owns a fresh pluggy.PluginManager: plugins given as classes are instantiated for that
# trace (per-trace state lives on the instance, never on a class or module), and a plugin that
# fails is unregistered from that trace only. Entry points are discovered once per process.

# NOTE [discovering installed plugins]
# Entry points of the "gradprobe" group are read and loaded once per process (reading package
# metadata costs milliseconds, a trace may be entered every training step). A plugin installed
# while the process runs (a notebook, a test) is seen after `gradprobe.refresh_plugins()`. An entry
# point that fails to load is remembered as such and reported as a GP000 finding by every trace,
# never raised: a broken third-party package must not stop anyone's training.

# NOTE [isolating plugins]
# pluggy calls all implementations in one go and lets the first exception escape. gradprobe must
# never break a training step because a plugin is buggy, so hooks are called one implementation at
# a time. GradProbeError is the one exception let through: it is how `on_finding="raise"` stops the
# user's code at a mistake.

# NOTE [internal errors] is in capture/failures.py.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import traceback
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

import pluggy

from gradprobe import hookspecs
from gradprobe.capture.failures import internal_error_finding, strict_internal
from gradprobe.exceptions import GradProbeError
from gradprobe.findings import Finding

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gradprobe.api.trace import Trace

__all__ = ["BUILTIN_PLUGINS", "PluginHost", "refresh_plugins"]

# Built-in plugins, registered under these names (what `disable=[...]` takes), in this order.
BUILTIN_PLUGINS: dict[str, str] = {
    "freed_graph": "gradprobe.detectors.freed_graph:FreedGraph",
    "nonleaf_grad": "gradprobe.detectors.nonleaf_grad:NonLeafGrad",
    "inplace_saved": "gradprobe.detectors.inplace:InplaceSaved",
    "stale_grad": "gradprobe.detectors.stale_grad:StaleGrad",
    "unreached": "gradprobe.detectors.unreached:Unreached",
    "nonfinite": "gradprobe.detectors.nonfinite:NonFinite",
    "nonfinite_modules": "gradprobe.detectors.nonfinite:NonFiniteModules",
    "decompose": "gradprobe.analysis.decompose_plugin:Decomposer",
    "report.calls": "gradprobe.report.sections:CallsSection",
    "report.breakdown": "gradprobe.report.sections:BreakdownSection",
    "report.decomposition": "gradprobe.report.decomposition:DecompositionSection",
    "report.findings": "gradprobe.report.sections:FindingsSection",
    "amp": "gradprobe.detectors.amp:AmpPlugin",
    "ddp": "gradprobe.detectors.ddp:DdpPlugin",
    "optimizer": "gradprobe.detectors.optimizer:OptimizerMismatch",
    "frozen_update": "gradprobe.detectors.frozen_update:FrozenUpdate",
    "kept_graph": "gradprobe.detectors.kept_graph:KeptGraph",
    "retained_graph": "gradprobe.detectors.retained_graph:RetainedGraph",
    "report.graph_tree": "gradprobe.report.graph_tree:GraphTreeSection",
}

Detect = Union[str, "Iterable[str]"]

_entry_point_cache: list[tuple[str, Any, str | None]] | None = None


class _Manager(pluggy.PluginManager):
    """pluggy's manager, minus a look at every dunder of every plugin at each registration.

    A trace registers its plugins afresh; pluggy inspects each name in ``dir(plugin)``, and the ~30
    names every object inherits made that ~0.3 ms per plugin per trace. Hook implementations are
    public methods (``gradprobe_*``, or any public name given ``specname=``).
    """

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if name.startswith("_"):
            return None
        if isinstance(plugin, ModuleType):
            return super().parse_hookimpl_opts(plugin, name)
        # A class's methods do not change between its instances: look each name up once per process.
        known = _CLASS_IMPLS.setdefault(type(plugin), {})
        if name not in known:
            known[name] = super().parse_hookimpl_opts(plugin, name)
        opts = known[name]
        return dict(opts) if opts is not None else None


# plugin class -> {attribute name: its hookimpl options, or None}
_CLASS_IMPLS: dict[type, dict[str, Any]] = {}


def refresh_plugins() -> list[str]:
    """Forget the installed plugins found so far and look for them again; return their names.

    gradprobe reads the ``gradprobe`` entry-point group once per process. Call this after
    installing (or removing) a plugin package in a running process, e.g. in a notebook::

        %pip install gradprobe-budget
        gradprobe.refresh_plugins()  # ['budget']
    """
    global _entry_point_cache
    _entry_point_cache = None
    importlib.invalidate_caches()
    return [name for name, _, _ in _entry_point_plugins()]


def _entry_point_plugins() -> list[tuple[str, Any, str | None]]:
    """``(name, plugin or None, why it failed to load or None)`` per installed plugin, read once."""
    global _entry_point_cache
    if _entry_point_cache is None:
        found: list[tuple[str, Any, str | None]] = []
        for ep in importlib.metadata.entry_points(group="gradprobe"):
            try:
                found.append((ep.name, ep.load(), None))
            except Exception as exc:  # a broken installed package must not break anyone's training
                found.append((ep.name, None, f"could not be loaded from {ep.value!r}: {type(exc).__name__}: {exc}"))
        _entry_point_cache = found
    return _entry_point_cache


def _load(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _is_detector(spec: str) -> bool:
    return spec.startswith("gradprobe.detectors.")


def _chosen_detectors(detect: Detect) -> set[str]:
    """Names of the built-in detectors ``trace(detect=...)`` selects."""
    detectors = {name: spec for name, spec in BUILTIN_PLUGINS.items() if _is_detector(spec)}
    if detect == "all":
        return set(detectors)
    if detect == "default":
        return {name for name, spec in detectors.items() if getattr(_load(spec), "default", True)}
    if isinstance(detect, str):
        raise ValueError(f"trace(detect=...) must be 'default', 'all' or detector names, got {detect!r}")
    chosen = set(detect)
    unknown = chosen - set(detectors)
    if unknown:
        raise ValueError(f"trace(detect=...) names no detector called {sorted(unknown)}; the detectors are {sorted(detectors)}")
    return chosen


def _plugin_name(plugin: Any) -> str:
    name = getattr(plugin, "gradprobe_name", None) or getattr(plugin, "__name__", None)
    return str(name or type(plugin).__name__)


class PluginHost:
    """Registers the built-in, entry-point and explicit plugins of one trace and calls them safely."""

    def __init__(
        self, trace: Trace, plugins: Iterable[Any] = (), disable: Iterable[str] = (), detect: Detect = "default"
    ) -> None:
        self._trace = trace
        self.failures: list[Finding] = []
        self.builtin: set[str] = set()  # names registered from BUILTIN_PLUGINS
        self._internal: set[str] = set()  # names already reported as internal errors
        self.pm = _Manager("gradprobe")
        self.pm.add_hookspecs(hookspecs)
        chosen = _chosen_detectors(detect)
        # (name, plugin, installed?) in call order: built-ins, then installed plugins, then trace(plugins=...)
        candidates: list[tuple[str, Any, bool]] = [
            (name, spec, False)
            for name, spec in BUILTIN_PLUGINS.items()
            if name in chosen or not _is_detector(spec)
        ]
        broken: dict[str, str] = {}
        for name, plugin, error in _entry_point_plugins():
            if error is None:
                candidates.append((name, plugin, True))
            else:
                broken[name] = error
        candidates += [(_plugin_name(p), p, False) for p in plugins]
        disabled = {disable} if isinstance(disable, str) else set(disable)
        known = set(BUILTIN_PLUGINS) | {name for name, _, _ in candidates} | set(broken)
        unknown = disabled - known
        if unknown:
            raise ValueError(
                f"trace(disable=...) names no plugin called {sorted(unknown)}; "
                f"the plugins of this trace are {sorted(known)}"
            )
        for name, error in broken.items():
            if name not in disabled:
                self._report(name, f"installed gradprobe plugin {name!r} {error}; it is left out", "load")
        # pluggy calls the last registered first: register in reverse so hooks run in candidate order.
        for name, plugin, installed in reversed(candidates):
            if name in disabled:
                continue
            if self.pm.has_plugin(name):
                raise ValueError(f"two gradprobe plugins are both named {name!r}; give one a gradprobe_name")
            if plugin == BUILTIN_PLUGINS.get(name):
                self.builtin.add(name)
            self._register(name, plugin, installed)

    def _register(self, name: str, plugin: Any, installed: bool) -> None:
        """Register one plugin; a class is instantiated here, so its state is this trace's alone."""
        try:
            if isinstance(plugin, str):
                plugin = _load(plugin)
            if inspect.isclass(plugin):
                plugin = plugin()
        except Exception as exc:
            self._fail(name, "__init__", exc)
            return
        unknown = [
            attr
            for attr in dir(plugin)
            if self.pm.parse_hookimpl_opts(plugin, attr) is not None and not hasattr(hookspecs, attr)
        ]
        try:
            if unknown:
                raise pluggy.PluginValidationError(
                    plugin,
                    f"gradprobe plugin {name!r} implements {unknown}, which are not gradprobe hooks; "
                    f"check the spelling against gradprobe.hookspecs ({_hook_names()})",
                )
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            if not installed:
                raise  # the user's own plugin: a mistake to fix now, before any training runs
            self._report(name, f"installed gradprobe plugin {name!r} is invalid: {exc}; it is left out", "load")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]

    def implemented(self, hook_name: str) -> bool:
        """Whether any registered plugin implements ``hook_name`` (to skip costly event preparation)."""
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call every implementation of ``hook_name``; return their non-None results in order."""
        results: list[Any] = []
        caller = getattr(self.pm.hook, hook_name)
        # the order pluggy itself would call them in (last registered first, tryfirst/trylast honoured)
        for impl in reversed(caller.get_hookimpls()):
            args = {name: kwargs[name] for name in impl.argnames}
            try:
                result = impl.function(**args)
            except GradProbeError:
                raise
            except Exception as exc:  # a buggy plugin must not break the training step
                self._fail(impl.plugin_name, hook_name, exc)
                continue
            if result is not None:
                results.append(result)
        return results

    def _fail(self, name: str, hook_name: str, exc: Exception) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        if name in self.builtin:
            self.internal_error(name, hook_name, exc)
            return
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {frame.filename}:{frame.lineno}" if frame else ""
        self._report(
            name,
            f"gradprobe plugin {name!r} raised {type(exc).__name__}: {exc}{where} in {hook_name}; "
            "it is switched off for the rest of this trace",
            hook_name,
        )

    def internal_error(self, name: str, hook_name: str, exc: Exception) -> None:
        """Report a bug in gradprobe's own ``name`` (a GP001 notice, once per name; NOTE [internal errors]).

        Raises:
            Exception: ``exc`` itself, under ``GRADPROBE_STRICT_INTERNAL=1``.
        """
        if strict_internal():
            raise exc
        if name in self._internal:
            return
        self._internal.add(name)
        finding = internal_error_finding(name, hook_name, exc, _is_detector(BUILTIN_PLUGINS.get(name, "")))
        self.failures.append(finding)
        trace = self._trace
        trace._add_finding(finding, policy="record" if trace.on_finding == "record" else "warn")

    def _report(self, name: str, message: str, hook_name: str) -> None:
        finding = Finding(
            code="GP000",
            kind="plugin_error",
            severity="warning",
            message=message,
            fix=f"fix the plugin, or leave it out with trace(..., disable=[{name!r}])",
            plugin=name,
            data={"hook": hook_name},
        )
        self.failures.append(finding)
        self._trace._add_finding(finding, policy="record")


def _hook_names() -> str:
    return ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("gradprobe_")))
