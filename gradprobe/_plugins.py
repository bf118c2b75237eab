"""The plugin manager a trace talks to.

# NOTE [one manager per trace]
# Each Trace owns a fresh pluggy.PluginManager: plugins given as classes are instantiated for that
# trace (per-trace state lives on the instance, never on a class or module), and a plugin that
# fails is unregistered from that trace only. Entry points are discovered once per process.

# NOTE [isolating plugins]
# pluggy calls all implementations in one go and lets the first exception escape. gradprobe must
# never break a training step because a plugin is buggy, so hooks are called one implementation at
# a time. GradProbeError is the one exception let through: it is how `on_finding="raise"` stops the
# user's code at a mistake.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import traceback
from typing import TYPE_CHECKING, Any

import pluggy

from gradprobe import hookspecs
from gradprobe.exceptions import GradProbeError
from gradprobe.findings import Finding

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gradprobe._trace import Trace

__all__ = ["BUILTIN_PLUGINS", "PluginHost"]

# Built-in plugins, registered under these names (what `disable=[...]` takes), in this order.
BUILTIN_PLUGINS: dict[str, str] = {
    "report.calls": "gradprobe.report._sections:CallsSection",
    "report.breakdown": "gradprobe.report._sections:BreakdownSection",
    "report.findings": "gradprobe.report._sections:FindingsSection",
}

_entry_point_cache: list[tuple[str, Any]] | None = None


class _Manager(pluggy.PluginManager):
    """pluggy's manager, minus a look at every dunder of every plugin at each registration.

    A trace registers its plugins afresh; pluggy inspects each name in ``dir(plugin)``, and the ~30
    names every object inherits made that ~0.3 ms per plugin per trace. Hook implementations are
    public methods (``gradprobe_*``, or any public name given ``specname=``).
    """

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if name.startswith("_"):
            return None
        return super().parse_hookimpl_opts(plugin, name)


def _entry_point_plugins() -> list[tuple[str, Any]]:
    global _entry_point_cache
    if _entry_point_cache is None:
        found = []
        for ep in importlib.metadata.entry_points(group="gradprobe"):
            found.append((ep.name, ep.load()))
        _entry_point_cache = found
    return _entry_point_cache


def _load(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _instantiate(plugin: Any) -> Any:
    return plugin() if inspect.isclass(plugin) else plugin


def _plugin_name(plugin: Any) -> str:
    name = getattr(plugin, "gradprobe_name", None) or getattr(plugin, "__name__", None)
    return str(name or type(plugin).__name__)


class PluginHost:
    """Registers the built-in, entry-point and explicit plugins of one trace and calls them safely."""

    def __init__(self, trace: Trace, plugins: Iterable[Any] = (), disable: Iterable[str] = ()) -> None:
        self._trace = trace
        self.pm = _Manager("gradprobe")
        self.pm.add_hookspecs(hookspecs)
        candidates: list[tuple[str, Any]] = [(name, spec) for name, spec in BUILTIN_PLUGINS.items()]
        candidates += _entry_point_plugins()
        candidates += [(_plugin_name(p), p) for p in plugins]
        disabled = set(disable)
        known = {name for name, _ in candidates}
        unknown = disabled - known
        if unknown:
            raise ValueError(
                f"trace(disable=...) names no plugin called {sorted(unknown)}; "
                f"the plugins of this trace are {sorted(known)}"
            )
        # pluggy calls the last registered first: register in reverse so hooks run in candidate order
        # (built-ins, then installed plugins, then trace(plugins=...)).
        for name, plugin in reversed(candidates):
            if name in disabled:
                continue
            if isinstance(plugin, str):
                plugin = _load(plugin)
            if self.pm.has_plugin(name):
                raise ValueError(f"two gradprobe plugins are both named {name!r}; give one a gradprobe_name")
            self.pm.register(_instantiate(plugin), name=name)
        self.failures: list[Finding] = []

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
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {frame.filename}:{frame.lineno}" if frame else ""
        finding = Finding(
            code="GP000",
            kind="plugin_error",
            severity="warning",
            message=(
                f"gradprobe plugin {name!r} raised {type(exc).__name__}: {exc}{where} in {hook_name}; "
                "it is switched off for the rest of this trace"
            ),
            fix=f"fix the plugin, or leave it out with trace(..., disable=[{name!r}])",
            plugin=name,
        )
        self.failures.append(finding)
        self._trace._add_finding(finding, policy="record")
